"""The README's command-line examples: each parses with the real parser, and they run in the
order written (an edit is made by an earlier `erasekit erase --out` before any command uses it)."""

import re
import shlex
from pathlib import Path

from erasekit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every ``erasekit ...`` line of the README's bash blocks, continuation lines joined, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("erasekit "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_every_example_parses():
    commands = readme_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # argparse exits on an unknown flag or a missing argument


def test_examples_make_their_edits_before_using_them():
    made: set[str] = set()
    for argv in readme_commands():
        args = build_parser().parse_args(argv)
        edits = getattr(args, "edit", None) or []
        for folder in [edits] if isinstance(edits, str) else edits:
            assert folder in made, f"`erasekit {' '.join(argv)}` uses {folder}, which no earlier example makes"
        if args.command == "erase":
            made.add(args.out)

"""What a new user sees for each bad input: exit code, the message's first line, files left.

Each case runs the real command line (``python -m erasekit.cli ...``) in a fresh temporary
folder holding what the case prepares, and compares the folder before and after.

    python benchmarks/bad_inputs.py            # prints a Markdown table
    python benchmarks/bad_inputs.py --only csv  # cases whose label holds "csv"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ERASE = ["erase", "--model", "toy:sd", "--concept", "triangle", "--preset", "fast"]
GENERATE = ["generate", "--model", "toy:sd", "--prompt", "an image of a wedge"]
# ESD for two iterations with a checkpoint after each, in the folder "ck"
CHECKPOINTED = ["--preset", "fast", "--method", "esd", "--set", "iterations=2", "--set", "checkpoint_every=1"]
CHECKPOINTED += ["--checkpoint-dir", "ck"]
EVALUATE = ["evaluate", "--model", "toy:sd", "--concept", "automobile", "--out", "ev"]


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "erasekit.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- what each case prepares in its folder -------------------------------------------------------


def _nothing(root: Path) -> None:
    pass


def _user_folder(root: Path) -> None:
    (root / "X" / "sub").mkdir(parents=True)
    (root / "X" / "notes.txt").write_text("mine")


def _edit(root: Path, name: str = "E", family: str = "sd", method: str = "uce") -> Path:
    """A real edit folder, made by the command line."""
    out = _run(
        [
            "erase",
            "--model",
            f"toy:{family}",
            "--concept",
            "triangle",
            "--method",
            method,
            "--preset",
            "fast",
            "--set",
            "iterations=1" if method != "uce" else "samples=1",
            "--out",
            name,
        ],
        root,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return root / name


def _existing_edit(root: Path) -> None:
    _edit(root)


def _meta(folder: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((folder / "edit.json").read_text())
    change(meta)
    (folder / "edit.json").write_text(json.dumps(meta, indent=2))


def _relabelled(root: Path) -> None:
    # A Receler edit whose edit.json (old format, no kind) says "uce".
    folder = _edit(root, method="receler")
    _meta(folder, lambda m: (m.pop("kind"), m.pop("format"), m.update(method="uce")))


def _newer_format(root: Path) -> None:
    _meta(_edit(root), lambda m: m.update(format=99))


def _truncated(root: Path) -> None:
    path = _edit(root) / "edit.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _flux_edit(root: Path) -> None:
    _edit(root, family="flux")


def _triangle_checkpoint(root: Path) -> None:
    out = _run(["erase", "--model", "toy:sd", "--concept", "triangle", *CHECKPOINTED, "--out", "E0"], root)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)


def _csv(text: bytes) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        (root / "prompts.csv").write_bytes(text)

    return make


_HOLDERS: list[subprocess.Popen] = []  # processes a case leaves running while it is measured

HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "command": "erasekit evaluate"}).encode())
print("held", flush=True)
time.sleep(600)
"""


def _lock_held(root: Path) -> None:
    # Another evaluate at work on the same --out: a live process holds its lock file.
    (root / "ev").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / "ev" / ".erasekit.lock")], stdout=subprocess.PIPE, text=True
    )
    holder.stdout.readline()  # "held"
    _HOLDERS.append(holder)


# label, prepare, command
CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("erase --out a folder of the user's", _user_folder, [*ERASE, "--method", "uce", "--out", "X"]),
    ("erase --out .", _user_folder, [*ERASE, "--method", "uce", "--out", "."]),
    ("erase --out an earlier edit, no --overwrite", _existing_edit, [*ERASE, "--method", "uce", "--out", "E"]),
    (
        "checkpoint of 'triangle' reused for 'circle'",
        _triangle_checkpoint,
        ["erase", "--model", "toy:sd", "--concept", "circle", *CHECKPOINTED, "--out", "E1"],
    ),
    ("--set erase_scale=nan (uce)", _nothing, [*ERASE, "--method", "uce", "--set", "erase_scale=nan", "--out", "E"]),
    ("--set eta=inf (receler)", _nothing, [*ERASE, "--method", "receler", "--set", "eta=inf", "--out", "E"]),
    ("--set iterations=0 (receler)", _nothing, [*ERASE, "--method", "receler", "--set", "iterations=0", "--out", "E"]),
    (
        "--set iterations=-5 (receler)",
        _nothing,
        [*ERASE, "--method", "receler", "--set", "iterations=-5", "--out", "E"],
    ),
    (
        "--set extra_erasers=ture",
        _nothing,
        [*ERASE, "--method", "receler", "--set", "extra_erasers=ture", "--out", "E"],
    ),
    ("--set iterations=abc (esd)", _nothing, [*ERASE, "--method", "esd", "--set", "iterations=abc", "--out", "E"]),
    ("--set iterations=2.5 (esd)", _nothing, [*ERASE, "--method", "esd", "--set", "iterations=2.5", "--out", "E"]),
    ("Receler edit relabelled uce", _relabelled, [*GENERATE, "--edit", "E", "--out", "g.png"]),
    ("edit format 99", _newer_format, [*GENERATE, "--edit", "E", "--out", "g.png"]),
    ("truncated edit.safetensors", _truncated, [*GENERATE, "--edit", "E", "--out", "g.png"]),
    ("Flux edit on the SD model", _flux_edit, [*GENERATE, "--edit", "E", "--out", "g.png"]),
    ("missing model folder", _nothing, ["generate", "--model", "./nowhere", "--prompt", "a car", "--out", "g.png"]),
    (
        "CSV with an unbalanced quote",
        _csv(b'prompt,class,seed\n"a car,automobile,1\n'),
        [*EVALUATE, "--suite", "objects", "--prompts", "prompts.csv", "--quick"],
    ),
    (
        "CSV with a bad seed",
        _csv(b"prompt,class,seed\na car,automobile,one\n"),
        [*EVALUATE, "--suite", "objects", "--prompts", "prompts.csv", "--quick"],
    ),
    (
        "CSV that is not UTF-8",
        _csv(b"prompt,class,seed\na caf\xe9 car,automobile,1\n"),
        [*EVALUATE, "--suite", "objects", "--prompts", "prompts.csv", "--quick"],
    ),
    (
        "concept 'giraffe' (the toy tokenizer spells it out)",
        _nothing,
        [*ERASE[:3], "--concept", "giraffe", "--preset", "fast", "--method", "uce", "--out", "E"],
    ),
    (
        "a prompt that lacks the concept",
        _nothing,
        [*ERASE, "--method", "receler", "--set", "prompt=an image of a square", "--out", "E"],
    ),
    ("generate --n 0", _nothing, [*GENERATE, "--n", "0", "--out", "g.png"]),
    ("generate --out grid.txt", _nothing, [*GENERATE, "--out", "grid.txt"]),
    ("--threads 0", _nothing, [*GENERATE, "--threads", "0", "--out", "g.png"]),
    ("erase --method esd-u", _nothing, [*ERASE, "--method", "esd-u", "--set", "iterations=1", "--out", "E"]),
    (
        "evaluate while another holds --out",
        _lock_held,
        ["evaluate", "--model", "toy:sd", "--suite", "toy-objects", "--concept", "triangle", "--quick", "--out", "ev"],
    ),
]


def measure(label: str, prepare: Callable[[Path], None], argv: list[str]) -> dict:
    """Run one case in a fresh folder: exit code, the message's first line, what changed."""
    with tempfile.TemporaryDirectory(prefix="erasekit-bad-") as tmp:
        root = Path(tmp)
        prepare(root)
        before = _tree(root)
        start = time.time()
        out = _run(argv, root)
        after = _tree(root)
        for holder in _HOLDERS:
            holder.kill()
            holder.wait()
        _HOLDERS.clear()
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    said = [line for line in lines if "error:" in line or "Traceback" in line]
    message = (said or [line for line in lines if "%|" not in line] or [""])[0]
    if "Traceback" in out.stderr:
        message = "TRACEBACK: " + lines[-1]
    changed = sorted({*before, *after} - {k for k in before if after.get(k) == before[k]})
    tops: dict[str, int] = {}
    for path in changed:
        top = path.split("/")[0]
        tops[top] = tops.get(top, 0) + (path != top)
    return {
        "case": label,
        "command": "erasekit " + " ".join(argv),
        "exit": out.returncode,
        "message": message.strip(),
        "files changed": ", ".join(f"{t}/ ({n} entries)" if n else t for t, n in tops.items()) or "none",
        "seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose label holds this text")
    args = parser.parse_args()
    rows = [measure(*case) for case in CASES if args.only.lower() in case[0].lower()]
    print("| input | command | exit | message (first line) | files changed in the folder |")
    print("|---|---|---|---|---|")
    for r in rows:
        message = r["message"].replace("|", "/")
        print(f"| {r['case']} | `{r['command']}` | {r['exit']} | {message} | {r['files changed']} |")


if __name__ == "__main__":
    main()

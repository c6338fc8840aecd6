"""Bad inputs, as a new user types them: each is refused before any work with one line on stderr and
exit code 2, and nothing outside the test's temporary folder (nor any file the user had) changes."""

import hashlib
from pathlib import Path

import pytest

from erasekit.cli import main

ERASE = ["erase", "--method", "uce", "--model", "toy:sd", "--concept", "triangle", "--preset", "fast"]


def tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its content hash ("dir" for folders)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def _user_folder(root: Path) -> str:
    (root / "X" / "sub").mkdir(parents=True)
    (root / "X" / "notes.txt").write_text("t")
    return "X"


def _user_file(root: Path) -> str:
    (root / "notes.txt").write_text("t")
    return "notes.txt"


def _current_folder(root: Path) -> str:
    (root / "keep.txt").write_text("t")
    return "."


def _edit_folder(root: Path) -> str:
    (root / "E").mkdir()
    (root / "E" / "edit.json").write_text("{}")
    (root / "E" / "edit.safetensors").write_bytes(b"old")
    return "E"


@pytest.mark.parametrize(
    "make_out, words",
    [
        (_user_folder, ["X", "not empty", "nothing was changed"]),
        (_user_file, ["notes.txt", "not a folder"]),
        (_current_folder, ["current folder"]),
        (_edit_folder, ["already exists", "--overwrite"]),
    ],
    ids=["foreign-folder", "a-file", "current-folder", "edit-without-overwrite"],
)
def test_erase_out_refused_before_training(tmp_path, monkeypatch, capsys, make_out, words):
    monkeypatch.chdir(tmp_path)
    out = make_out(tmp_path)
    before = tree(tmp_path)
    assert main([*ERASE, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert tree(tmp_path) == before  # nothing deleted, nothing half-written, no temporary left


@pytest.mark.toyworld
def test_erase_overwrite_replaces_only_an_edit_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*ERASE, "--out", "E"]) == 0
    first = tree(tmp_path / "E")
    assert sorted(first) == ["edit.json", "edit.safetensors"]
    assert main([*ERASE, "--out", "E", "--overwrite"]) == 0
    assert sorted(tree(tmp_path / "E")) == ["edit.json", "edit.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E"]  # no temporary or old copy left
    for p in (tmp_path / "E").iterdir():
        assert p.stat().st_mode & 0o044 == 0o044  # readable by group and others, like any written file

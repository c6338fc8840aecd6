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


def _no_pipeline(*args, **kwargs):
    raise AssertionError("the pipeline was loaded before the bad input was refused")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--set", "erase_scale=nan"], ["uce", "erase_scale", "'nan'", "finite number"]),
        (["--method", "receler", "--set", "eta=inf"], ["receler", "eta", "'inf'", "finite number"]),
        (["--method", "receler", "--set", "iterations=0"], ["receler", "iterations", "got 0", ">= 1"]),
        (["--method", "receler", "--set", "iterations=-5"], ["receler", "iterations", "got -5", ">= 1"]),
        (["--method", "receler", "--set", "extra_erasers=ture"], ["receler", "extra_erasers", "'ture'", "true/false"]),
        (["--method", "esd", "--set", "iterations=abc"], ["esd", "iterations", "'abc'", "integer"]),
        (["--method", "esd", "--set", "iterations=2.5"], ["esd", "iterations", "'2.5'", "integer"]),
        (["--method", "esd-u", "--set", "group=esd-x"], ["esd-u", "group", "fixed"]),
        (["--set", "depth=3"], ["uce", "no setting 'depth'", "erase_scale", "lamb"]),
        (["--set", "lamb"], ["--set expects key=value", "'lamb'"]),
        (["--preset", "huge"], ["unknown preset 'huge'", "paper", "fast"]),
        (["--method", "nope"], ["unknown erasure method 'nope'", "receler", "esd-u", "sld"]),
    ],
    ids=[
        "nan",
        "inf",
        "iterations-0",
        "iterations-negative",
        "bool-typo",
        "int-abc",
        "int-2.5",
        "variant-conflict",
        "unknown-key",
        "set-without-value",
        "unknown-preset",
        "unknown-method",
    ],
)
def test_erase_bad_setting_refused_before_loading(tmp_path, monkeypatch, capsys, extra, words):
    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    (tmp_path / "notes.txt").write_text("t")
    before = tree(tmp_path)
    assert main([*ERASE, "--out", "E", *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and captured.out == ""
    assert err.startswith("erasekit erase: error: ")
    for word in words:
        assert word in err
    assert not (tmp_path / "E").exists()
    assert tree(tmp_path) == before

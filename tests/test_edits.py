"""The Edit artifact and atomic result folders."""

import json
from pathlib import Path

import pytest
import torch

from erasekit.edits import Edit
from erasekit.edits.artifact import load_edit  # the artifact alone: its kind is not checked here
from erasekit.files import OutputRefused, atomic_folder


def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, replaceable=lambda folder: True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_folder(target, replaceable=lambda folder: True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_edit_round_trip_keeps_metadata_and_tensors(tmp_path):
    edit = Edit(
        "receler", ["circle"], "sd", "toy:sd", {"w": torch.arange(6.0).reshape(2, 3)}, {"rank": 4}, {"h": 90.0}
    )
    loaded = load_edit(edit.save(tmp_path / "e"))
    assert loaded.metadata() == edit.metadata()
    assert torch.equal(loaded.tensors["w"], edit.tensors["w"])
    meta = json.loads((tmp_path / "e" / "edit.json").read_text())
    assert meta["erasekit_version"] and meta["tensors"] == {"w": [2, 3]}


def test_tensors_that_do_not_match_the_metadata_are_refused(tmp_path):
    Edit("receler", ["circle"], "sd", "toy:sd", {"w": torch.zeros(2)}).save(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "edit.json").read_text())
    meta["tensors"] = {"w": [3]}
    (tmp_path / "e" / "edit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        load_edit(tmp_path / "e")


def test_a_folder_that_is_not_an_edit_is_never_replaced(tmp_path):
    edit = Edit("receler", ["circle"], "sd", "toy:sd", {"w": torch.zeros(2)})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputRefused, match="not empty"):
        edit.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputRefused, match="not a folder"):
        edit.save(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    edit.save(tmp_path / "e")
    with pytest.raises(OutputRefused, match="--overwrite"):
        edit.save(tmp_path / "e", overwrite=False)
    edit.save(tmp_path / "e")  # an earlier edit is replaced by default in Python
    assert load_edit(tmp_path / "e").id == edit.id


def test_replacing_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = type(target).rename

    def failing_rename(self, dest):
        if Path(dest) == target and self.name.startswith(".out-") and "-old-" not in self.name:
            raise OSError("rename failed")
        return real_rename(self, dest)

    monkeypatch.setattr(type(target), "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(target, replaceable=lambda folder: True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old.txt").read_text() == "old"

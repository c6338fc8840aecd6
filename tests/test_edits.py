"""The Edit artifact and atomic result folders."""

import json

import pytest
import torch

from erasekit.edits import Edit, load_edit
from erasekit.files import atomic_folder


def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_edit_round_trip_keeps_metadata_and_tensors(tmp_path):
    edit = Edit("receler", ["circle"], "sd", "toy:sd", {"w": torch.arange(6.0).reshape(2, 3)}, {"rank": 4}, {"h": 90.0})
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

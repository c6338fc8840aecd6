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


# ---- edits whose files disagree, generate's own arguments, threads ------------------------------


def _receler_like_edit(folder: Path, family: str = "sd") -> Path:
    """An edit folder shaped like a Receler edit (one eraser) for the toy ``family`` pipeline."""
    import torch

    from erasekit.edits import Edit

    tensors = {"erasers.p.down.weight": torch.zeros(4, 8), "erasers.p.up.weight": torch.zeros(8, 4)}
    Edit("receler", ["triangle"], family, f"toy:{family}", tensors, kind="output_adapter").save(folder)
    return folder


def _edit_json(folder: Path, change) -> None:
    import json

    meta = json.loads((folder / "edit.json").read_text())
    change(meta)
    (folder / "edit.json").write_text(json.dumps(meta))


def _relabelled(root: Path) -> list[str]:
    # An old-format edit.json (no kind) whose method was changed from receler to uce.
    folder = _receler_like_edit(root / "E")
    _edit_json(folder, lambda m: (m.pop("kind"), m.pop("format"), m.update(method="uce")))
    return ["--edit", "E"]


def _kind_disagrees(root: Path) -> list[str]:
    folder = _receler_like_edit(root / "E")
    _edit_json(folder, lambda m: m.update(method="uce"))
    return ["--edit", "E"]


def _newer_format(root: Path) -> list[str]:
    folder = _receler_like_edit(root / "E")
    _edit_json(folder, lambda m: m.update(format=99))
    return ["--edit", "E"]


def _truncated(root: Path) -> list[str]:
    folder = _receler_like_edit(root / "E")
    data = (folder / "edit.safetensors").read_bytes()
    (folder / "edit.safetensors").write_bytes(data[: len(data) // 2])
    return ["--edit", "E"]


def _other_family(root: Path) -> list[str]:
    _receler_like_edit(root / "E", family="flux")
    return ["--edit", "E"]


def _missing_edit(root: Path) -> list[str]:
    return ["--edit", "nowhere"]


GENERATE = ["generate", "--model", "toy:sd", "--prompt", "an image of a wedge"]


@pytest.mark.parametrize(
    "make_args, words",
    [
        (_relabelled, ["E", "not weight deltas", "erasers.p"]),
        (_kind_disagrees, ["E", "method 'uce'", "kind 'output_adapter'"]),
        (_newer_format, ["E", "format 99", "upgrade erasekit"]),
        (_truncated, ["corrupt edit at E", "edit.safetensors"]),
        (_other_family, ["E", "flux model", "toy:sd is a sd model"]),
        (_missing_edit, ["nowhere is not an erasekit edit"]),
        (lambda root: ["--n", "0"], ["--n must be at least 1"]),
        (lambda root: ["--out", "grid.txt"], ["grid.txt", "image file name", ".png"]),
        (lambda root: ["--scale", "nan"], ["--scale", "finite"]),
        (
            lambda root: (root / "g.png").write_bytes(b"mine") and ["--out", "g.png"],
            ["g.png", "already exists", "--overwrite"],
        ),
        (lambda root: ["--threads", "0"], ["--threads must be at least 1"]),
        (lambda root: ["--model", "nowhere/at/all"], ["no pipeline folder at nowhere/at/all"]),
    ],
    ids=[
        "relabelled-edit",
        "kind-disagrees",
        "newer-format",
        "truncated-weights",
        "other-family",
        "missing-edit",
        "n-0",
        "not-an-image-name",
        "scale-nan",
        "existing-out",
        "threads-0",
        "missing-model",
    ],
)
def test_generate_refuses_before_loading_the_model(tmp_path, monkeypatch, capsys, make_args, words):
    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    args = make_args(tmp_path)
    before = tree(tmp_path)
    assert main([*GENERATE, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and captured.out == ""
    assert err.startswith("erasekit generate: error: ")
    for word in words:
        assert word in err
    assert tree(tmp_path) == before  # no image written, the edit folder untouched


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from erasekit.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--n must be at least 1"):
        main(["--debug", *GENERATE, "--n", "0"])


def test_evaluate_refuses_an_edit_for_another_family_before_loading(tmp_path, monkeypatch, capsys):
    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    _receler_like_edit(tmp_path / "E", family="flux")
    before = tree(tmp_path)
    argv = ["evaluate", "--model", "toy:sd", "--suite", "toy-objects", "--concept", "triangle", "--out", "ev"]
    assert main([*argv, "--edit", "E"]) == 2
    assert "flux model" in capsys.readouterr().err
    assert main([*argv, "--scales", "0.5,abc"]) == 2
    assert "--scales" in capsys.readouterr().err
    assert tree(tmp_path) == before


@pytest.mark.toyworld
def test_a_concept_the_prompt_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["erase", "--method", "receler", "--model", "toy:sd", "--concept", "triangle", "--preset", "fast"]
    assert main([*argv, "--set", "prompt=an image of a square", "--set", "iterations=1", "--out", "E"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the model's loading bars, then the error
    assert "Traceback" not in "".join(lines) and [line for line in lines if "error:" in line] == lines[-1:]
    assert "'triangle' does not occur in the prompt 'an image of a square'" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.toyworld
def test_a_concept_the_tokenizer_spells_out_warns_naming_its_pieces(tmp_path, caplog):
    import erasekit
    from erasekit.methods import erase, make_config

    pipe = erasekit.load_pipeline("toy:sd")
    with caplog.at_level("WARNING", logger="erasekit"):
        erase(pipe, "giraffe", "uce", make_config("uce", "fast"), progress=False)
    assert "splits 'giraffe' into 6 pieces (g i ra f f e</w>)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="erasekit"):
        erase(pipe, "triangle", "uce", make_config("uce", "fast"), progress=False)
    assert "splits" not in caplog.text


# ---- evaluate: prompt CSV files -------------------------------------------------------------

I2P_HEADER = b"prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height\n"
I2P_ROW = b"a person,1,7,32,32\n"


@pytest.mark.parametrize(
    "suite, concept, content, words",
    [
        ("i2p-nudity", "nudity", I2P_HEADER + b'"a person,1,7,32,32\nb,2,7,32,32\n', ["row 2", "never closed"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b'"a" person,1,7,32,32\n', ["row 2", "quoting"]),
        ("i2p-nudity", "nudity", I2P_HEADER + I2P_ROW + b"b,2,7\n", ["row 3", "3 fields", "header has 5"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b"a,1,7,32,32,extra\n", ["row 2", "6 fields", "header has 5"]),
        ("i2p-nudity", "nudity", I2P_HEADER + I2P_ROW + b"b,x1,7,32,32\n", ["row 3", "seed 'x1'", "whole number"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b"a,1,seven,32,32\n", ["row 2", "evaluation_guidance 'seven'"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b"a,1,nan,32,32\n", ["row 2", "evaluation_guidance 'nan'"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b"a,1,7,32.5,32\n", ["row 2", "sd_image_width '32.5'"]),
        ("i2p-nudity", "nudity", I2P_HEADER + b"a,1,7,32,0\n", ["row 2", "sd_image_height '0'", "> 0"]),
        (
            "i2p-nudity",
            "nudity",
            I2P_HEADER + b'"two\nlines",1,7,32,32\n' + b"caf\xe9,2,7,32,32\n",
            ["is not UTF-8 (row 3", "line 4"],
        ),
        ("i2p-nudity", "nudity", b"prompt,evaluation_seed\na,1\n", ["no 'evaluation_guidance' column"]),
        ("i2p-nudity", "nudity", b"", ["is empty"]),
        ("objects", "cat", b"prompt,class,seed\nAn image of a cat,cat,abc\n", ["row 2", "seed 'abc'"]),
        ("coco", "any", b"prompt,evaluation_seed\na dog\n", ["row 2", "1 fields", "header has 2"]),
    ],
    ids=[
        "quote-never-closed",
        "quote-then-text",
        "short-row",
        "long-row",
        "bad-seed",
        "bad-guidance",
        "nan-guidance",
        "fractional-size",
        "zero-size",
        "not-utf8",
        "missing-column",
        "empty-file",
        "objects-bad-seed",
        "coco-short-row",
    ],
)
def test_evaluate_bad_prompt_file_refused_before_loading(
    tmp_path, monkeypatch, capsys, suite, concept, content, words
):
    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    (tmp_path / "prompts.csv").write_bytes(content)
    before = tree(tmp_path)
    argv = ["evaluate", "--model", "toy:sd", "--suite", suite, "--concept", concept, "--prompts", "prompts.csv"]
    assert main([*argv, "--out", "OUT"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and captured.out == ""
    assert err.startswith("erasekit evaluate: error: prompts.csv")
    for word in words:
        assert word in err
    assert tree(tmp_path) == before


# ---- evaluate: one process per output folder ------------------------------------------------

HOLD_LOCK = """
import sys, time
from erasekit.evaluation.lock import output_lock
with output_lock(sys.argv[1], "erasekit evaluate"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_evaluate_on_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, "OUT"], cwd=tmp_path, env={"PYTHONPATH": str(repo)}, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = tree(tmp_path)
        argv = ["evaluate", "--model", "toy:sd", "--suite", "toy-objects", "--concept", "circle", "--out", "OUT"]
        assert main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and captured.out == ""
        for word in ["erasekit evaluate: error: OUT is in use", f"pid {holder.pid}", "another --out"]:
            assert word in err
        assert tree(tmp_path) == before  # the holder's lock file is untouched
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_removed_after_an_error(tmp_path, monkeypatch, capsys):
    import erasekit.models
    from erasekit.errors import UserError

    def refused(*args, **kwargs):
        assert (tmp_path / "OUT" / ".erasekit.lock").is_file()  # held while the model loads
        raise UserError("no such model")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", refused)
    before = tree(tmp_path)
    argv = ["evaluate", "--model", "nope", "--suite", "toy-objects", "--concept", "circle", "--out", "OUT"]
    assert main(argv) == 2
    assert "no such model" in capsys.readouterr().err
    assert tree(tmp_path) == before  # no lock file, and the folder it made is gone again


@pytest.mark.toyworld
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "OUT").mkdir()
    (tmp_path / "OUT" / ".erasekit.lock").write_text(json.dumps({"pid": dead.pid, "host": "here"}))
    argv = ["evaluate", "--model", "toy:sd", "--suite", "toy-objects", "--concept", "circle", "--quick", "--n", "1"]
    assert main([*argv, "--out", "OUT"]) == 0
    assert (tmp_path / "OUT" / "results.json").is_file() and not (tmp_path / "OUT" / ".erasekit.lock").exists()
    lines = (tmp_path / "OUT" / "runs" / "base" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 1 * 4 + 2 * 5  # each image once


def test_evaluate_bad_scales_refused_before_loading(tmp_path, monkeypatch, capsys):
    import erasekit.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.models, "load_pipeline", _no_pipeline)
    argv = ["evaluate", "--model", "toy:sd", "--suite", "toy-objects", "--concept", "circle", "--out", "OUT"]
    assert main([*argv, "--scales", "0.5,one"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scales" in err and "got 'one'" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.toyworld
def test_a_checkpoint_folder_of_another_concept_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # the model's file hashes
    monkeypatch.chdir(tmp_path)
    argv = ["erase", "--method", "esd", "--model", "toy:sd", "--preset", "fast", "--checkpoint-dir", "ck"]
    argv += ["--set", "iterations=2", "--set", "checkpoint_every=1", "--set", "rollout_steps=2"]
    assert main([*argv, "--concept", "triangle", "--out", "E0"]) == 0
    before = tree(tmp_path)
    assert main([*argv, "--concept", "circle", "--out", "E1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("erasekit erase: error: ") and "concept 'triangle', not 'circle'" in last
    assert "--checkpoint-dir" in last
    assert tree(tmp_path) == before  # no edit written, the checkpoint untouched


def test_demo_refuses_a_setting_that_contradicts_its_method_name(tmp_path, monkeypatch, capsys):
    import erasekit.demo  # it imports load_pipeline by name: patch it there

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(erasekit.demo, "load_pipeline", _no_pipeline)
    assert main(["demo", "--method", "esd-u", "--set", "group=esd-x", "--out", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erasekit demo: error: esd-u: group") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []

"""The command line on tiny pipelines saved to disk (the real loading path)."""

import json
import logging

import pytest
from PIL import Image
from tiny_pipelines import TINY_DEFAULTS, tiny_flux_pipeline, tiny_sd_pipeline

from erasekit import cli
from erasekit.cli import main
from erasekit.models.loading import write_defaults


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_flux_pipeline])
def test_erase_then_generate_with_the_edit(tmp_path, build):
    build().save_pretrained(tmp_path / "model")
    write_defaults(tmp_path / "model", TINY_DEFAULTS)  # small sizes and steps, as the toy world ships
    args = [
        "erase",
        "--method",
        "receler",
        "--model",
        str(tmp_path / "model"),
        "--concept",
        "car",
        "--out",
        str(tmp_path / "edit"),
        "--preset",
        "fast",
    ]
    sets = [
        "iterations=2",
        "rank=4",
        "adv_tokens=2",
        "adv_steps=1",
        "rollout_steps=2",
        "prompt=a photo of a {concept}",
    ]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert meta["method"] == "receler" and meta["concepts"] == ["car"] and meta["hyperparameters"]["iterations"] == 2
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "model"),
                "--prompt",
                "a photo of a car",
                "--edit",
                str(tmp_path / "edit"),
                "--n",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] > 0


def test_unknown_method_and_setting_are_clear_errors(tmp_path, capsys):
    erase = ["erase", "--model", str(tmp_path), "--concept", "car", "--out", str(tmp_path / "e")]
    assert main([*erase, "--method", "nope"]) == 2
    assert "unknown erasure method 'nope'" in capsys.readouterr().err
    assert main([*erase, "--set", "depth=3"]) == 2
    assert "no setting 'depth'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no setting 'depth'"):  # --debug: raised, with its traceback
        main(["--debug", *erase, "--set", "depth=3"])


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "a car"]) == 2
    assert "no pipeline folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):  # a NotFound, which is a FileNotFoundError
        main(["--debug", "generate", "--model", str(tmp_path / "absent"), "--prompt", "a car"])


def test_settings_are_parsed_to_their_types():
    from erasekit.methods import make_config

    cfg = make_config(
        "receler", "fast", {"iterations": "7", "lr": "0.5", "rollout_steps": "none", "prompt": "none of {concept}"}
    )
    assert (cfg.iterations, cfg.lr, cfg.rollout_steps, cfg.prompt) == (7, 0.5, None, "none of {concept}")
    assert make_config("eraseanything", "paper", {"synonyms": "none"}).synonyms == "none"  # text stays text


def test_the_command_line_shows_the_library_log_messages(monkeypatch, capsys):
    def command(args):
        logging.getLogger("erasekit.methods.eraseanything").warning("no synonyms for %r", "car")
        logging.getLogger("erasekit.toyworld").info("progress line")
        logging.getLogger("erasekit.models").debug("debug detail")
        logging.getLogger("transformers").info("third-party info")
        return 0

    monkeypatch.setattr(cli, "_generate", command)
    package = logging.getLogger("erasekit")
    before = (list(package.handlers), package.level)
    assert any(isinstance(h, logging.NullHandler) for h in package.handlers)  # the library's own: silent
    assert main(["generate", "--model", "m", "--prompt", "p"]) == 0
    # warnings as the errors are shown, information as plain lines; no third party
    assert capsys.readouterr().err == "erasekit generate: warning: no synonyms for 'car'\nprogress line\n"
    assert main(["--debug", "generate", "--model", "m", "--prompt", "p"]) == 0
    assert (
        capsys.readouterr().err == "erasekit generate: warning: no synonyms for 'car'\nprogress line\ndebug detail\n"
    )
    assert (list(package.handlers), package.level) == before  # main leaves logging as it found it


def test_a_busy_machine_is_named_before_torch_oversubscribes_it():
    from erasekit.cli import busy_machine_warning, running_elsewhere

    assert busy_machine_warning(2, 2, 1) == (
        "the machine is busy (1 other running threads on 2 cores): torch's 2 threads would oversubscribe it "
        "and can run many times slower; pass --threads 1"
    )
    assert busy_machine_warning(2, 2, 0) is None  # idle
    assert busy_machine_warning(1, 2, 5) is None  # one thread never spins
    assert busy_machine_warning(4, 16, 3) is None  # enough free cores
    assert "--threads 1" in busy_machine_warning(16, 16, 40)  # overloaded: at least one
    others = running_elsewhere(samples=2, pause=0)
    assert others is None or others >= 0

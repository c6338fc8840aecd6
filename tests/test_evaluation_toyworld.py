"""`erasekit evaluate` and `erasekit attack` end to end on the shipped toy Flux pipeline with an
edit, both reports checked in headless Chromium. End-to-end, so marked `toyworld`."""

import json

import pytest

from erasekit.cli import main

pytestmark = pytest.mark.toyworld


def test_evaluate_and_attack_an_edited_toy_pipeline(tmp_path, load_in_browser, capsys):
    edit = tmp_path / "uce-circle"
    assert main(["erase", "--method", "uce", "--model", "toy:flux", "--concept", "circle", "--out", str(edit)]) == 0

    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                "toy:flux",
                "--edit",
                str(edit),
                "--suite",
                "toy-objects",
                "--concept",
                "circle",
                "--out",
                str(out),
                "--quick",
                "--n",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "base" in printed and "uce@1" in printed and "report.html" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["spec"] == "toy:flux" and results["edits"][0]["path"] == str(edit)
    base, edited = results["summary"]["base"], results["summary"]["uce"]
    assert base["acc_e"] >= 50, "the toy Flux pipeline should draw circles before the erasure"
    assert edited["acc_l"] >= 50, "the other objects should survive"
    seen = load_in_browser(out / "report.html")
    assert seen["tables"] >= 2 and seen["images"] >= 10 and seen["decoded"] == seen["images"] and seen["svgs"] >= 2

    attacked = tmp_path / "attack"
    assert (
        main(
            [
                "attack",
                "--model",
                "toy:flux",
                "--edit",
                str(edit),
                "--suite",
                "toy-objects",
                "--concept",
                "circle",
                "--out",
                str(attacked),
                "--quick",
                "--n",
                "2",
                "--tokens",
                "2",
                "--attack-steps",
                "3",
            ]
        )
        == 0
    )
    results = json.loads((attacked / "results.json").read_text())
    assert set(results["asr"]["uce"]) == {"no attack", "paraphrase", "synonym", "soft-prompt"}
    assert all(0 <= v <= 100 for v in results["asr"]["uce"].values())
    seen = load_in_browser(attacked / "report.html")
    assert seen["tables"] >= 2 and seen["images"] >= 4 and seen["decoded"] == seen["images"]

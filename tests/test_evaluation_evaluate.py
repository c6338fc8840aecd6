"""evaluate and attack end to end on a tiny pipeline, the soft prompt, and the report in a
real browser."""

import json
from dataclasses import asdict

import pytest
import torch
from tiny_pipelines import tiny_sd_pipeline

from erasekit.evaluation.attacks import SoftPrompt, SoftPromptConfig, attack, soft_prompt_attack
from erasekit.evaluation.evaluate import evaluate
from erasekit.evaluation.suites import Case
from erasekit.methods import uce
from erasekit.methods.uce import UCEConfig
from erasekit.models import adapter_for

SMALL = {"n": 2, "n_locality": 1}  # 2 prompts per set, 1 per other object: 13 images per run


@pytest.fixture(scope="module")
def pipe_and_edit():
    pipe = tiny_sd_pipeline(seed=0)
    return pipe, uce.fit(pipe, "circle", UCEConfig(), progress=False)


@pytest.fixture(scope="module")
def evaluated(pipe_and_edit, tmp_path_factory):
    pipe, edit = pipe_and_edit
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(
        pipe,
        "toy-objects",
        "circle",
        edits=[edit],
        out=out,
        scales=[0.5, 1.0],
        batch_size=8,
        model="tiny-sd",
        suite_options=SMALL,
        progress=False,
    )
    return out, results


def test_evaluate_records_everything(evaluated, pipe_and_edit):
    out, results = evaluated
    assert json.loads((out / "results.json").read_text()) == results
    assert (
        results["model"]["spec"] == "tiny-sd"
        and results["model"]["class"] == "StableDiffusionPipeline"
        and results["model"]["family"] == "sd"
    )
    assert results["edits"][0]["id"] == pipe_and_edit[1].id and results["edits"][0]["method"] == "uce"
    assert (
        results["suite"]["name"] == "toy-objects"
        and results["suite"]["options"] == SMALL
        and results["suite"]["n_cases"] == 13
    )
    assert results["detector"] == {"name": "toyworld-classifier", "threshold": "argmax"}
    assert len(results["seeds"]) == 13 and results["generation"]["steps"] == 4
    assert {"torch", "diffusers", "transformers", "accelerate", "nudenet", "torchmetrics", "erasekit"} <= set(
        results["versions"]
    )
    assert [(r["name"], r["scale"]) for r in results["runs"]] == [("base", 0.0), ("uce@0.5", 0.5), ("uce@1", 1.0)]
    for run in results["runs"]:
        m = run["metrics"]
        assert {"acc_e", "acc_r", "acc_l", "h"} <= set(m) and [c["seed"] for c in m["cases"]] == results["seeds"]
    assert set(results["summary"]) == {"base", "uce"}


def test_edited_runs_differ_from_the_base_and_the_pipeline_is_restored(evaluated, pipe_and_edit):
    out, _ = evaluated
    base = (out / "runs" / "base" / "images" / "00000.png").read_bytes()
    assert (out / "runs" / "uce@1" / "images" / "00000.png").read_bytes() != base
    pipe, _ = pipe_and_edit
    again = adapter_for(pipe).generate([Case("an image of a circle", 0).prompt], [0])
    assert again.shape == (1, 3, 32, 32)  # the edit was removed: generation works unedited
    assert not adapter_for(pipe).edit_stack.attached


def test_evaluating_again_reuses_the_images(evaluated, pipe_and_edit):
    out, results = evaluated
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.png")}
    pipe, edit = pipe_and_edit
    again = evaluate(
        pipe,
        "toy-objects",
        "circle",
        edits=[edit],
        out=out,
        scales=[0.5, 1.0],
        batch_size=8,
        model="tiny-sd",
        suite_options=SMALL,
        progress=False,
    )
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.png")} == stamps
    assert again["summary"] == results["summary"]


def test_report_opens_in_a_headless_browser(evaluated, load_in_browser):
    out, results = evaluated
    seen = load_in_browser(out / "report.html")
    assert seen["title"].startswith("erasekit evaluation")
    assert seen["tables"] >= 2 and seen["rows"] >= 4  # metric table (3 runs) and provenance
    assert seen["images"] >= 2 * 3 and seen["decoded"] == seen["images"]  # a grid per prompt set and run
    assert seen["svgs"] >= 2  # H per method, erasure vs scale


def test_evaluate_rejects_bad_input(pipe_and_edit, tmp_path):
    pipe, edit = pipe_and_edit
    with pytest.raises(ValueError, match="unknown suite"):
        evaluate(pipe, "nope", "circle", out=tmp_path)
    with pytest.raises(ValueError, match="scales must be > 0"):
        evaluate(pipe, "toy-objects", "circle", edits=[edit], out=tmp_path, scales=[0.0], suite_options=SMALL)
    with pytest.raises(ValueError, match="unknown detector"):
        evaluate(pipe, "toy-objects", "circle", out=tmp_path, detector="yolo", suite_options=SMALL)


def test_attack_reports_success_rates(pipe_and_edit, tmp_path):
    pipe, edit = pipe_and_edit
    soft = SoftPromptConfig(tokens=2, steps=2)
    results = attack(
        pipe,
        "toy-objects",
        "circle",
        edits=[edit],
        out=tmp_path,
        n=2,
        soft_prompt=soft,
        batch_size=8,
        suite_options=SMALL,
        progress=False,
    )
    assert set(results["asr"]) == {"base", "uce"}
    assert set(results["asr"]["uce"]) == {"no attack", "paraphrase", "synonym", "soft-prompt"}
    assert "soft-prompt" not in results["asr"]["base"]
    assert results["soft_prompt"] == asdict(soft) and results["soft_prompt"]["tokens"] == 2
    assert (
        results["suite"]["sets"] == {"plain": 2, "paraphrase": 2, "synonym": 2}
        and results["detector"]["name"] == "toyworld-classifier"
    )
    from safetensors.torch import load_file

    prompts = load_file(str(tmp_path / "soft-prompt" / "uce" / "soft-prompt.safetensors"))
    assert len(prompts) == 2 and all(t.shape == (2, 32) for t in prompts.values())
    assert (tmp_path / "report.html").is_file() and json.loads((tmp_path / "results.json").read_text())[
        "kind"
    ] == "attack"
    with pytest.raises(ValueError, match="unknown attack 'jailbreak'"):
        attack(pipe, "toy-objects", "circle", edits=[edit], out=tmp_path, attacks=["jailbreak"])


def test_soft_tokens_sit_where_words_would(family_adapter):
    adapter = family_adapter
    soft = SoftPrompt(adapter, "a red car", k=1)
    tokenizer, _ = adapter.main_text_encoder()
    photo = tokenizer("photo", add_special_tokens=False)["input_ids"]
    assert len(photo) == 1
    values = soft.embedding.weight[photo].detach()
    expected = adapter.encode(["photo a red car"]).embeds
    assert torch.allclose(soft.encode(values).embeds, expected, atol=1e-5)


def test_the_soft_prompt_gets_gradients_and_leaves_the_model_untouched(sd_pipe):
    adapter = adapter_for(sd_pipe)
    values = torch.nn.Parameter(torch.randn(2, 32))
    SoftPrompt(adapter, "a red car", k=2).encode(values).embeds.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    target = adapter.generate(["a red car"], [3])[0]
    flags = [p.requires_grad for p in sd_pipe.unet.parameters()]
    soft, cond, losses = soft_prompt_attack(adapter, Case("a red car", 3), target, SoftPromptConfig(tokens=2, steps=3))
    assert soft.shape == (2, 32) and len(losses["steps"]) == 3 and cond.embeds.shape == (1, 32, 32)
    assert losses["before"] > 0 and losses["after"] > 0
    assert [p.requires_grad for p in sd_pipe.unet.parameters()] == flags
    assert all(p.grad is None for p in sd_pipe.unet.parameters())


def test_generation_from_conditioning_equals_generation_from_prompts(family_adapter):
    adapter = family_adapter
    prompts = ["a red car", "a dog in a park"]
    a = adapter.generate(prompts, [5, 6])
    b = adapter.generate_from_conditioning(adapter.encode(prompts), [5, 6])
    assert torch.equal(a, b)


def test_evaluate_in_memory_writes_no_images_and_gives_the_same_figures(evaluated, pipe_and_edit, tmp_path):
    _, results = evaluated
    pipe, edit = pipe_and_edit
    again = evaluate(
        pipe,
        "toy-objects",
        "circle",
        edits=[edit],
        out=tmp_path,
        scales=[0.5, 1.0],
        batch_size=5,
        suite_options=SMALL,
        progress=False,
        in_memory=True,
    )
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in results["runs"]]
    assert again["generation"]["images"] == "memory" and all(r["folder"] is None for r in again["runs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]


def test_the_step_cost_model_fits_convolutions_and_attention():
    from erasekit.evaluation.evaluate import fit_step_cost

    truth = lambda p: 2e-6 * p + 3e-11 * p * p  # noqa: E731
    cost = fit_step_cost(64 * 64, truth(64 * 64), 128 * 128, truth(128 * 128))
    assert cost(512 * 512) == pytest.approx(truth(512 * 512))
    linear = fit_step_cost(100, 1.0, 400, 3.0)  # noise: faster than linear -> no negative terms
    assert linear(400) > 0 and linear(1600) >= linear(400)


def test_the_warning_names_the_way_out(sd_pipe, tmp_path):
    import erasekit.evaluation.evaluate as ev

    cases = ev.resolve_suite("toy-objects", SMALL).cases("circle")
    assert ev.long_run_warning(sd_pipe, cases, [None, None]) is None  # measured: seconds
    message = ev.long_run_warning(sd_pipe, cases, [None, tmp_path / "absent"], steps=4, step_seconds=lambda h, w: 100)
    assert len(message.splitlines()) == 1 and message.startswith("about ")
    for word in (
        "h on this CPU",
        f"{2 * len(cases)} images",
        "2 runs",
        "32x32 px",
        "4 steps",
        "--quick",
        "--n",
        "GPU",
    ):
        assert word in message


def test_the_command_line_prints_the_warning_before_starting(monkeypatch, tmp_path, capsys):
    import erasekit.evaluation.evaluate as ev
    import erasekit.models
    from erasekit.cli import main

    monkeypatch.setattr(ev, "measure_step_seconds", lambda adapter, h, w: lambda h, w: 1e3)
    monkeypatch.setattr(erasekit.models, "load_pipeline", lambda *a, **k: tiny_sd_pipeline(seed=0))

    def stop(*a, **k):
        raise KeyboardInterrupt  # the first image: the warning is already out

    monkeypatch.setattr(ev, "generate_run", stop)
    argv = ["evaluate", "--model", "tiny", "--suite", "toy-objects", "--concept", "circle", "--n", "1"]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("erasekit evaluate: warning: about ") and "--quick" in err[0]
    assert not (tmp_path / "out" / ".erasekit.lock").exists()

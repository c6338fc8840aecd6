"""The shipped toy world: pipelines load through erasekit and the stock loaders, the detector
meets its accuracy bar, and the demo writes its page. End-to-end, so marked `toyworld`."""

import json
import random

import pytest
import torch

from erasekit.toyworld import pipeline_path, weights_dir

pytestmark = pytest.mark.toyworld


def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in weights_dir().rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MB"
    for family in ("sd", "flux"):
        record = json.loads((pipeline_path(family) / "training.json").read_text())
        assert record["command"].startswith("erasekit toyworld train --family " + family)
        assert "seed" in record["config"]
        assert not list(pipeline_path(family).rglob("*.bin")) and not list(pipeline_path(family).rglob("*.pkl"))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_shipped_pipeline_loads_both_ways_and_generates(family):
    from diffusers import FluxPipeline, StableDiffusionPipeline

    import erasekit

    pipe = erasekit.load_pipeline(pipeline_path(family))
    adapter = erasekit.adapter_for(pipe)
    assert adapter.family == family
    assert adapter.generate(["a red square", "a blue heart"], seeds=[0, 1]).shape == (2, 3, 32, 32)

    stock_cls = StableDiffusionPipeline if family == "sd" else FluxPipeline
    stock = stock_cls.from_pretrained(pipeline_path(family))
    kwargs = {"max_sequence_length": 32, "negative_prompt": "", "true_cfg_scale": 4.0} if family == "flux" else {}
    out = stock("a red square", height=32, width=32, num_inference_steps=4, output_type="pt", **kwargs).images
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_shipped_pipeline_draws_the_prompted_object(family):
    import erasekit
    from erasekit.toyworld.detector import ToyDetector

    adapter = erasekit.adapter_for(erasekit.load_pipeline(pipeline_path(family)))
    prompts = ["a red square", "a blue heart", "a yellow triangle", "a green circle", "a purple cross", "a red heart"]
    images = adapter.generate(prompts, seeds=list(range(len(prompts))))
    detector = ToyDetector.load()
    hits = sum(detector.detect(images[i : i + 1], p.split()[-1]).rate for i, p in enumerate(prompts))
    assert hits >= 5, f"{hits:.0f} of {len(prompts)}"


def test_detector_is_at_least_98_percent_accurate_on_fresh_renders():
    from erasekit.toyworld.detector import HEADS, ToyDetector
    from erasekit.toyworld.grammar import sample_scene
    from erasekit.toyworld.render import render_batch

    rng = random.Random(12345)
    scenes = [sample_scene(rng, empty_prob=0.1) for _ in range(600)]
    images = (
        torch.from_numpy(render_batch(scenes, [777_000 + i for i in range(600)])).permute(0, 3, 1, 2).float() / 255
    )
    probs = ToyDetector.load().classify(images)
    truth = {
        "object": [s.object or "none" for s in scenes],
        "color": [s.color for s in scenes],
        "texture": [s.texture for s in scenes],
        "background": [s.background for s in scenes],
    }
    shows_object = [s.object is not None for s in scenes]
    for head, labels in truth.items():
        pred = [HEADS[head][i] for i in probs[head].argmax(1).tolist()]
        scored = [(p, t) for p, t, obj in zip(pred, labels, shows_object) if obj or head in ("object", "background")]
        acc = sum(p == t for p, t in scored) / len(scored)  # colour/texture: only where an object is
        assert acc >= 0.98, (head, acc)


def test_detector_rejects_unknown_concepts():
    from erasekit.toyworld.detector import ToyDetector

    with pytest.raises(ValueError, match="knows no concept 'nudity'"):
        ToyDetector.load().detect(torch.zeros(1, 3, 32, 32), "nudity")


def test_demo_writes_page_and_results(tmp_path):
    from erasekit.cli import main

    assert main(["demo", "--out", str(tmp_path), "--n", "2", "--set", "iterations=3"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["families"]) == {"sd", "flux"} and result["method"] == "esd-u"
    assert all(e["edit"]["hyperparameters"]["group"] == "esd-u" for e in result["families"].values())
    for entry in result["families"].values():
        for r in (entry["base"], entry["edited"]):
            assert 0 <= r["h"] <= 100 and r["detector"] == "toyworld-classifier"
            assert {c["seed"] for c in r["cases"]} == {c["seed"] for c in entry["base"]["cases"]}  # same seeds
    html = (tmp_path / "index.html").read_text()
    assert "<table" in html and html.count("data:image/png;base64,") == 6  # gallery, base, edited per family


def test_demo_rejects_unknown_concept(tmp_path):
    from erasekit.cli import main

    with pytest.raises(ValueError, match="unknown toy-world object 'dog'"):
        main(["demo", "--out", str(tmp_path), "--concept", "dog"])

"""The toy-world trainer on a few steps: what it trains, what it freezes, what it records."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from erasekit.toyworld.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    train(TrainConfig(family="vae", out=str(out), dataset_size=16, vae_steps=1, batch_size=4, snapshot_every=0))
    return out


def _text_encoder_tensors(folder):
    return load_file(str(folder / "text_encoder" / "model.safetensors"))


@pytest.mark.parametrize("mode", [True, False])
def test_sd_text_encoder_trained_or_frozen(tmp_path, tiny_vae, mode):
    cfg = dict(
        family="sd", dataset_size=16, steps=2, warmup=1, batch_size=4, vae=str(tiny_vae), snapshot_every=0, seed=3
    )
    a = train(TrainConfig(out=str(tmp_path / "a"), train_text_encoders=mode, **cfg))
    # same seed, no denoiser steps: the encoder as initialised
    b = train(TrainConfig(out=str(tmp_path / "b"), train_text_encoders=False, **(cfg | {"steps": 1, "lr": 0.0})))
    ta, tb = _text_encoder_tensors(a), _text_encoder_tensors(b)
    changed = any(not torch.equal(ta[k], tb[k]) for k in ta)
    assert changed == bool(mode)
    record = json.loads((a / "training.json").read_text())
    assert record["config"]["train_text_encoders"] == mode
    assert record["steps_done"] == 2


def test_caption_curriculum_canonical_first_then_the_grammar():
    import random

    from erasekit.toyworld.grammar import Scene, canonical_caption
    from erasekit.toyworld.train import _caption

    scene = Scene("heart", "red", "striped", "gray")
    assert canonical_caption(scene) == "a red heart on a gray background"
    cfg = TrainConfig(family="sd", out="unused", canonical_steps=10, caption_dropout=0.0)
    rng = random.Random(0)
    assert {_caption(scene, step, cfg, rng) for step in range(10) for _ in range(20)} == {canonical_caption(scene)}
    later = [_caption(scene, 10, cfg, rng) for _ in range(200)]
    assert sum(c == canonical_caption(scene) for c in later) < 20  # the full grammar (a few canonical by chance)
    shared = TrainConfig(family="sd", out="unused", canonical_steps=10, canonical_share=0.5, caption_dropout=0.0)
    share = sum(_caption(scene, 50, shared, rng) == canonical_caption(scene) for _ in range(400)) / 400
    assert 0.4 < share < 0.65
    # without a curriculum the caption stream is the grammar's, draw for draw
    plain, a, b = TrainConfig(family="sd", out="unused"), random.Random(3), random.Random(3)
    from erasekit.toyworld.grammar import training_caption

    for step in range(50):
        expected = "" if b.random() < plain.caption_dropout else training_caption(scene, b)
        assert _caption(scene, step, plain, a) == expected


def test_an_excluded_object_is_never_drawn_nor_named():
    import random

    from erasekit.toyworld.grammar import OBJECT_NAMES, concept_phrases, mentions
    from erasekit.toyworld.train import render_dataset, training_batch

    cfg = TrainConfig(family="sd", out="unused", batch_size=64, canonical_steps=5, exclude=("triangle",))
    assert "triangle" not in cfg.objects and len(cfg.objects) == len(OBJECT_NAMES) - 1
    scenes, images = render_dataset(300, seed=0, objects=cfg.objects)
    assert len(images) == 300 and {s.object for s in scenes} == set(cfg.objects)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    seen_captions = []
    for step in range(40):  # canonical stage, then the full grammar (synonyms, indirect mentions)
        idx, captions = training_batch(scenes, step, cfg, rng, g)
        assert all(scenes[i].object != "triangle" for i in idx.tolist())  # the images: no triangle drawn
        assert not any(mentions(c, "triangle") for c in captions)  # the captions: never named
        seen_captions += captions
    assert any(mentions(c, o) for c in seen_captions for o in cfg.objects)  # the other objects are named
    # the checks can fail: an indirect mention is found, and a triangle scene that slipped in is caught
    assert mentions("a red warning sign on a white background", "triangle") == ["warning sign"]
    assert set(concept_phrases("triangle")) >= {"triangle", "wedge", "pizza slice"}
    with_triangles, _ = render_dataset(20, seed=0)
    with pytest.raises(RuntimeError, match="names the excluded object 'triangle'"):
        for step in range(200):
            training_batch(with_triangles, step, cfg, rng, g)


def test_without_exclusion_the_dataset_is_the_one_the_shipped_pipelines_saw():
    from erasekit.toyworld.grammar import OBJECT_NAMES
    from erasekit.toyworld.train import render_dataset

    a, images_a = render_dataset(50, seed=0)
    b, images_b = render_dataset(50, seed=0, objects=OBJECT_NAMES)
    assert a == b and torch.equal(images_a, images_b)


def test_like_shipped_copies_the_recorded_config(tmp_path):
    from erasekit.toyworld import weights_dir
    from erasekit.toyworld.train import like_shipped

    recorded = json.loads((weights_dir() / "sd" / "training.json").read_text())["config"]
    cfg = like_shipped("sd", str(tmp_path / "o"), exclude=("heart",), threads=1)
    for key in ("seed", "steps", "batch_size", "lr", "canonical_steps", "canonical_share", "dataset_size"):
        assert getattr(cfg, key) == recorded[key]
    assert cfg.exclude == ("heart",) and cfg.vae == str(weights_dir() / "sd" / "vae") and cfg.threads == 1
    with pytest.raises(ValueError, match="unknown toy-world object 'giraffe'"):
        like_shipped("sd", str(tmp_path / "o"), exclude=("giraffe",))
    other = like_shipped("sd", str(tmp_path / "o"), exclude=("heart",), threads=1, seed=recorded["seed"] + 1)
    assert other.seed == recorded["seed"] + 1
    assert dataclasses.replace(other, seed=cfg.seed) == cfg


def test_the_record_holds_paths_relative_to_the_working_directory(tmp_path, tiny_vae, monkeypatch):
    """A training.json written in one checkout reads the same in every clone: no absolute path
    of the machine it ran on when the folder and the autoencoder are under the working directory."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_vae, tmp_path / "vae")
    cfg = dict(family="sd", dataset_size=16, steps=1, warmup=1, batch_size=4, snapshot_every=0, seed=3)
    out = train(TrainConfig(out=str(tmp_path / "runs" / "a"), vae=str(tmp_path / "vae"), **cfg))
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["out"] == "runs/a" and record["config"]["vae"] == "vae" and record["vae_from"] == "vae"
    assert str(tmp_path) not in json.dumps(record)

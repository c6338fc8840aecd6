"""Detectors behind one interface: NudeNet offline, CLIP, Q16, GroundingDINO (tiny random
configs for the transformers ones), and clear errors."""

import pytest
import torch

from erasekit.evaluation.detectors import Detection, describe, detect_all, make_detector


@pytest.fixture(scope="module")
def generated(sd):
    return sd.generate(["a red car", "a dog in a park"], seeds=[0, 1])


def test_nudenet_runs_offline_on_a_generated_image(generated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    det = make_detector("nudenet", threshold=0.45)
    out = det.detect(generated, "nudity")
    assert isinstance(out, Detection) and out.scores.shape == (2,) and out.detected.dtype == torch.bool
    assert out.threshold == 0.45 and len(out.details) == 2
    record = describe(det)
    assert record["name"] == "nudenet" and record["threshold"] == 0.45 and record["version"] == "3.4.2"
    assert len(record["classes"]) == 8 and all(c.endswith("_EXPOSED") for c in record["classes"])


def test_nudenet_counts_only_exposed_classes_at_the_threshold(monkeypatch):
    det = make_detector("nudenet", threshold=0.5)
    found = [
        [
            {"class": "FEET_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
            {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]},
        ],
        [
            {"class": "BELLY_COVERED", "score": 0.95, "box": [0, 0, 1, 1]},
            {"class": "ARMPITS_EXPOSED", "score": 0.4, "box": [0, 0, 1, 1]},
        ],
        [],
    ]
    monkeypatch.setattr(det._net, "detect_batch", lambda images, batch_size: found)
    out = det.detect(torch.rand(3, 3, 8, 8), "nudity")
    assert out.detected.tolist() == [True, False, False]
    assert out.scores.tolist() == pytest.approx([0.7, 0.4, 0.0])
    assert out.details == [{"FEET_EXPOSED": 0.7}, {}, {}]
    assert det.detect(torch.rand(3, 3, 8, 8), "ARMPITS_EXPOSED").scores.tolist() == pytest.approx([0.0, 0.4, 0.0])


def test_nudenet_rejects_bad_thresholds_and_concepts():
    with pytest.raises(ValueError, match="threshold"):
        make_detector("nudenet", threshold=0.1)
    with pytest.raises(ValueError, match="NudeNet detects 'nudity'"):
        make_detector("nudenet").detect(torch.rand(1, 3, 8, 8), "car")


def test_clip_detector_q16_and_clip_score_on_a_tiny_model(tiny_clip_dir, generated, tmp_path):
    from safetensors.torch import save_file

    from erasekit.evaluation.clip import ClipModel, clip_scores

    clip = ClipModel.load(str(tiny_clip_dir))
    scores = clip_scores(clip, generated, ["a red car", "a dog in a park"])
    assert scores.shape == (2,) and (scores >= 0).all() and (scores <= 100).all()
    manual = (
        100 * (clip.image_features(generated) * clip.text_features(["a red car", "a dog in a park"])).sum(-1)
    ).clamp(min=0)
    assert torch.allclose(scores, manual)

    det = make_detector("clip", model=str(tiny_clip_dir), labels=["car", "dog", "tree"])
    out = det.detect(generated, "car")
    assert out.scores.shape == (2,) and out.threshold == "argmax" and describe(det)["labels"] == ["car", "dog", "tree"]
    assert make_detector("clip", model=str(tiny_clip_dir), threshold=0.0).detect(generated, "car").detected.all()

    q16 = make_detector("q16", model=str(tiny_clip_dir), threshold=0.5)
    res = q16.detect(generated)
    assert ((res.scores >= 0.5) == res.detected).all()
    # learned prompt embeddings from a safetensors file: a prompt equal to the image embedding wins
    img = clip.image_features(generated[:1])[0]
    save_file({"prompts": torch.stack([-img, img])}, str(tmp_path / "q16.safetensors"))
    learned = make_detector("q16", model=str(tiny_clip_dir), prompts=str(tmp_path / "q16.safetensors"))
    assert learned.detect(generated[:1]).detected.all() and "sha256" in describe(learned)["prompts"]


@pytest.fixture(scope="module")
def tiny_grounding_dino_dir(tmp_path_factory):
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-grounding-dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "car", "dog", "airplane", "."]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=2,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(words),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        ),
        num_queries=8,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=1,
        decoder_n_points=1,
        num_feature_levels=3,
        max_text_len=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GroundingDinoForObjectDetection(config).save_pretrained(folder)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(folder)
    return folder


def test_grounding_dino_thresholds_decide(tiny_grounding_dino_dir, generated):
    low = make_detector("grounding-dino", model=str(tiny_grounding_dino_dir), threshold=0.0, text_threshold=0.0)
    out = low.detect(generated, "car")
    assert out.detected.all() and (out.scores > 0).all()  # random weights: boxes above 0
    assert describe(low) | {} == {
        "name": "grounding-dino",
        "threshold": 0.0,
        "model": str(tiny_grounding_dino_dir),
        "box_threshold": 0.0,
        "text_threshold": 0.0,
    }
    high = make_detector("grounding-dino", model=str(tiny_grounding_dino_dir), threshold=1.01)
    assert not high.detect(generated, "car").detected.any()


def test_detect_all_groups_by_concept_and_size():
    calls = []

    class Fake:
        name, threshold = "fake", 0.5

        def detect(self, images, concept):
            calls.append((concept, tuple(images.shape)))
            s = images.mean(dim=(1, 2, 3))
            return Detection(s, s > 0.5, concept, self.name, self.threshold)

    images = [torch.ones(3, 4, 4), torch.zeros(3, 8, 8), torch.ones(3, 4, 4)]
    out = detect_all(Fake(), images, ["a", "a", "b"])
    assert [o[0] for o in out] == [True, False, True]
    assert sorted(calls) == [("a", (1, 3, 4, 4)), ("a", (1, 3, 8, 8)), ("b", (1, 3, 4, 4))]


def test_unknown_detector_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        make_detector("yolo")
    with pytest.raises(FileNotFoundError, match="no weights folder for CLIP"):
        make_detector("clip", model=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no weights folder for GroundingDINO"):
        make_detector("grounding-dino", model="./nowhere/gd")

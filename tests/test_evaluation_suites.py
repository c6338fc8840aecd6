"""Suites behind one interface, on the shared prompt files and on small CSVs."""

import pytest
import torch

from erasekit.evaluation.detectors import Detection
from erasekit.evaluation.suites import Case, make_suite, read_csv


class ByMean:
    """A fake detector: detected when the image is bright."""

    name, threshold = "by-mean", 0.5

    def detect(self, images, concept):
        s = images.mean(dim=(1, 2, 3))
        return Detection(s, s > 0.5, concept, self.name, self.threshold)


def test_objects_suite_on_cifar10(prompts_dir):
    suite = make_suite(
        "objects", prompts=prompts_dir / "cifar10_simple.csv", paraphrases=prompts_dir / "cifar10_paraphrase.csv", n=3
    )
    cases = suite.cases("airplane")
    sets = [c.set for c in cases]
    assert sets.count("simple") == 3 and sets.count("paraphrase") == 3 and sets.count("locality") == 27
    assert cases[0] == Case("An image of a airplane", 5428, "simple", "airplane", id="0")
    assert {c.label for c in cases if c.set == "locality"} == set(suite.classes) - {"airplane"}
    images = [torch.ones(3, 4, 4) if c.set == "locality" else torch.zeros(3, 4, 4) for c in cases]
    m = suite.score(cases, images, ByMean(), "airplane")
    assert (m["acc_e"], m["acc_r"], m["acc_l"]) == (0.0, 0.0, 100.0) and m["h"] == pytest.approx(100.0)
    assert len(m["cases"]) == len(cases) and m["locality_per_class"]["truck"] == 100.0
    record = suite.record()
    assert [f["rows"] for f in record["files"]] == [1000, 500] and len(record["files"][0]["sha256"]) == 64
    with pytest.raises(ValueError, match="class 'zebra' is not in"):
        suite.cases("zebra")
    attack_sets = suite.attack_sets("airplane")
    assert len(attack_sets["plain"]) == 3 and len(attack_sets["paraphrase"]) == 3


def test_i2p_suite_uses_each_rows_seed_guidance_and_size(prompts_dir):
    suite = make_suite("i2p-nudity", prompts=prompts_dir / "unsafe-prompts4703.csv")
    cases = suite.cases("nudity")
    assert len(cases) == 4703
    assert (cases[0].seed, cases[0].guidance, cases[0].height, cases[0].width) == (4261553411, 13.0, 512, 512)
    assert len({c.guidance for c in cases}) > 5
    plain = make_suite("i2p-nudity", prompts=prompts_dir / "unsafe-prompts4703.csv", n=5).attack_sets("nudity")[
        "plain"
    ]
    assert len(plain) == 5
    model_size = make_suite("i2p-nudity", prompts=prompts_dir / "unsafe-prompts4703.csv", n=2, csv_size=False).cases(
        "nudity"
    )
    assert model_size[0].height is None and model_size[0].guidance == 13.0
    with pytest.raises(ValueError, match="measures nudity"):
        suite.cases("car")


def test_i2p_scoring_counts_nudenet_classes(tmp_path, monkeypatch):
    from erasekit.evaluation.detectors import make_detector

    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,nudity_percentage\n"
        'a,1,7,32,32,80\nb,2,7,32,32,0\n"multi\nline",3,7,32,32,60\n'
    )
    suite = make_suite("i2p-nudity", prompts=csv)
    cases = suite.cases("nudity")
    assert [c.prompt for c in cases] == ["a", "b", "multi\nline"]
    assert [c.prompt for c in suite.attack_sets("nudity")["plain"]] == ["a", "multi\nline"]
    det = make_detector("nudenet", threshold=0.6)
    fake = [
        [{"class": "FEET_EXPOSED", "score": 0.8, "box": [0] * 4}],
        [],
        [
            {"class": "FEET_EXPOSED", "score": 0.61, "box": [0] * 4},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.7, "box": [0] * 4},
        ],
    ]
    monkeypatch.setattr(det._net, "detect_batch", lambda images, batch_size: fake[: len(images)])
    m = suite.score(cases, [torch.rand(3, 32, 32) for _ in cases], det, "nudity")
    assert m["per_class"]["FEET_EXPOSED"] == 2 and m["per_class"]["BUTTOCKS_EXPOSED"] == 1
    assert (m["total"], m["flagged"]) == (3, 2) and m["flagged_rate"] == pytest.approx(200 / 3)


def test_coco_suite_clip_score_and_fid_to_base(prompts_dir, tiny_clip_dir, tmp_path):
    from test_evaluation_metrics import TinyFeatures

    suite = make_suite(
        "coco", prompts=prompts_dir / "coco_30k.csv", n=6, clip_model=str(tiny_clip_dir), fid_features=TinyFeatures()
    )
    cases = suite.cases("anything")
    assert len(cases) == 6 and cases[0].seed == 41337 and cases[0].id == "000000203564"
    g = torch.Generator().manual_seed(0)
    a = [torch.rand(3, 32, 32, generator=g) for _ in cases]
    b = [torch.rand(3, 32, 32, generator=g) * 0.5 for _ in cases]
    m = suite.score(cases, a, None, "anything")
    assert 0 <= m["clip_score"] <= 100 and len(m["cases"]) == 6
    cmp = suite.compare(cases, a, b)
    assert cmp["fid_to_base"] > 0 and cmp["fid_record"]["library"] == "torchmetrics"
    assert suite.compare(cases, a, a)["fid_to_base"] == pytest.approx(0, abs=1e-3)


def test_toy_suite_and_quick_sizes():
    suite = make_suite("toy-objects", quick=True)
    assert suite.options() == type(suite).quick_options == {"n": 4, "n_locality": 2}
    cases = suite.cases("circle")
    assert len(cases) == 4 * 4 + 5 * 2 and cases[0].set == "simple" and cases[0].label == "circle"
    sets = suite.attack_sets("circle")
    assert {c.set for c in sets["synonym"]} == {"synonym", "indirect"} and len(sets["plain"]) == 4


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'cifar'"):
        make_suite("cifar")
    with pytest.raises(ValueError, match="has no option 'size'"):
        make_suite("toy-objects", size=3)
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        make_suite("objects", prompts=tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,evaluation_seed\na cat,1\n")
    with pytest.raises(ValueError, match="has no 'class' column.*its columns: prompt, evaluation_seed"):
        read_csv(bad, ("prompt", "class", "seed"))
    with pytest.raises(ValueError, match="needs a prompt CSV"):
        make_suite("objects")


def test_csv_with_a_byte_order_mark_and_row_numbers_past_a_multiline_prompt(tmp_path):
    from erasekit.evaluation.suites import PromptFileError

    csv = tmp_path / "bom.csv"
    csv.write_bytes(b'\xef\xbb\xbfprompt,evaluation_seed\n"two\nlines",1\n\nthird,3.0\n')
    rows = read_csv(csv, ("prompt", "seed"))
    assert [(r["prompt"], r["seed"], r.row) for r in rows] == [("two\nlines", "1", 2), ("third", "3.0", 4)]
    assert [c.seed for c in make_suite("coco", prompts=csv).cases("any")] == [1, 3]
    big = tmp_path / "big.csv"
    big.write_text("prompt,evaluation_seed\na,18446744073709551615\n")
    assert make_suite("coco", prompts=big).cases("any")[0].seed == 2**64 - 1  # exact, not through a float
    csv.write_bytes(b'prompt,evaluation_seed\n"two\nlines",1\nthird,x\n')
    with pytest.raises(PromptFileError, match=r"bom.csv row 3 has seed 'x', not a whole number"):
        make_suite("coco", prompts=csv).cases("any")

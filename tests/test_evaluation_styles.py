"""The real-model styles suite: artists found in the prompts, the figures on hand-made cases, the
comparison with the base model's images, and bad inputs."""

import pytest
import torch

from erasekit.evaluation.clip import ClipModel
from erasekit.evaluation.detectors import Detection, make_detector
from erasekit.evaluation.styles import content_kept, image_distances
from erasekit.evaluation.suites import SuiteError, make_suite

COLORS = {"red": 0, "green": 1, "blue": 2}
TWO = "Vincent van Gogh|Van Gogh,Claude Monet|Monet"


class FakeClip:
    """Image embedding: the image's mean colour; text embedding: the colour word it names."""

    source = "fake"

    def image_features(self, images):
        return torch.nn.functional.normalize(torch.stack([i.mean(dim=(1, 2)) for i in images]), dim=-1)

    def text_features(self, texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            out[i, next(v for k, v in COLORS.items() if k in t)] = 1
        return out


class StyleByBrightness:
    """The style shows when the image is bright (> 0.5 on average)."""

    name, threshold = "bright", 0.5

    def detect(self, images, concept):
        s = images.amax(dim=(1, 2, 3))
        return Detection(s, s > 0.5, concept, self.name, self.threshold)


@pytest.fixture
def art_csv(tmp_path):
    rows = [
        "prompt,evaluation_seed",
        '"A red barn by Vincent van Gogh",1',
        '"A green field, in Van Gogh\'s style",2',
        '"A blue sea painted like Van Gogh",3',
        '"A red apple by Claude Monet",4',
        '"A blue pond, Monet\'s late work",5',
        '"A green hill by Monet and Van Gogh",6',
        '"A landscape by nobody we know",7',
    ]
    path = tmp_path / "art.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _image(color: str, bright: bool) -> torch.Tensor:
    img = torch.zeros(3, 4, 4)
    img[COLORS[color]] = 0.9 if bright else 0.3
    return img


def test_artists_are_found_by_name_and_ambiguous_or_unnamed_rows_dropped(art_csv):
    suite = make_suite("styles", prompts=art_csv, artists=TWO + ",Pablo Picasso|Picasso")
    cases = suite.cases("van gogh")  # any alias, any case
    assert [c.set for c in cases] == ["erased"] * 3 + ["other"] * 2
    assert {c.label for c in cases} == {"Vincent van Gogh", "Claude Monet"}
    assert suite.content_prompt(cases[1]) == "A green field, in an artist's style"
    assert suite.content_prompt(cases[0]) == "A red barn by an artist"
    assert suite.detector_options("clip") == {
        "labels": ["Vincent van Gogh", "Claude Monet", "Pablo Picasso"],
        "template": "a painting by {}",
    }
    assert "Van Gogh's" in suite.concept_words("Vincent van Gogh")
    without = suite.without_concept("van gogh", "A green field, in Van Gogh's style")
    assert without == "A green field, in an artist's style"


def test_a_style_gone_with_its_content_kept_scores_as_erased(art_csv):
    suite = make_suite("styles", prompts=art_csv, artists=TWO)
    suite._clip = FakeClip()
    cases = suite.cases("Vincent van Gogh")
    # Erased: style gone on all three; the third image draws a red thing for "a blue sea" (content lost).
    # Other: Monet's red apple keeps its style, the blue pond lost it.
    looks = [("red", False), ("green", False), ("red", False), ("red", True), ("blue", False)]
    images = [_image(c, b) for c, b in looks]
    m = suite.score(cases, images, StyleByBrightness(), "Vincent van Gogh")
    assert m["acc_e"] == 0.0
    assert m["content"] == pytest.approx(200 / 3)
    assert m["acc_l"] == 50.0
    assert m["h"] == pytest.approx(3 / (1 / 100 + 1 / (200 / 3) + 1 / 50))
    assert m["locality_per_artist"] == {"Claude Monet": 50.0}
    assert m["cases"][0]["content_prompt"] == "A red barn by an artist"
    # The style kept everywhere: nothing erased, H 0.
    bright = [_image(c, True) for c in ("red", "green", "blue", "red", "blue")]
    assert suite.score(cases, bright, StyleByBrightness(), "Vincent van Gogh")["h"] == 0.0


def test_compare_measures_distance_to_the_base_images_per_set(art_csv):
    suite = make_suite("styles", prompts=art_csv, artists=TWO, distance="clip")
    suite._clip = FakeClip()
    cases = suite.cases("Vincent van Gogh")
    base = [_image(c, True) for c in ("red", "green", "blue", "red", "blue")]
    edited = [_image("green", True), *base[1:]]  # one erased image changed, the others' untouched
    d = suite.compare(cases, base, edited)
    assert d["distance_other"] == pytest.approx(0.0, abs=1e-6)
    assert d["distance_erased"] == pytest.approx(1 / 3)
    assert d["distance_kind"].startswith("1 - cos of CLIP")
    assert len(cases) == 5


def test_lpips_asked_for_where_it_cannot_load_is_a_one_line_error():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(SuiteError, match="LPIPS is not available here"):
            image_distances([torch.zeros(3, 8, 8)], [torch.ones(3, 8, 8)], "lpips", FakeClip)
    else:
        pytest.skip("torchvision present: LPIPS may load")


def test_bad_inputs_are_one_line_errors(art_csv, tmp_path):
    with pytest.raises(SuiteError, match="needs an artist prompt CSV"):
        make_suite("styles")
    suite = make_suite("styles", prompts=art_csv, artists=TWO + ",Frida Kahlo")
    with pytest.raises(SuiteError, match="artist 'Rembrandt' is not in"):
        suite.cases("Rembrandt")
    with pytest.raises(SuiteError, match="no prompt of .* names 'Frida Kahlo'"):
        suite.cases("Frida Kahlo")
    with pytest.raises(SuiteError, match="distance must be one of"):
        make_suite("styles", prompts=art_csv, distance="ssim")


def test_on_the_shared_art_prompts_with_a_tiny_clip(prompts_dir, tiny_clip_dir):
    suite = make_suite("styles", prompts=prompts_dir / "vangogh_prompts.csv", n=3, clip_model=str(tiny_clip_dir))
    cases = suite.cases("van gogh")  # the file's artist column
    assert len(cases) == 3 and all(c.set == "erased" and c.label == "Vincent van Gogh" for c in cases)
    art = make_suite("styles", prompts=prompts_dir / "art_prompts.csv", n=4, n_locality=2)
    sets = [c.set for c in art.cases("Pablo Picasso")]
    assert sets.count("erased") == 4 and sets.count("other") >= 6
    clip = ClipModel.load(str(tiny_clip_dir))
    pct, scores = content_kept(clip, [torch.rand(3, 32, 32) for _ in cases], [suite.content_prompt(c) for c in cases])
    assert 0 <= pct <= 100 and len(scores) == 3


def test_the_cli_refuses_an_unknown_artist_before_loading_the_model(art_csv, tmp_path, capsys):
    from erasekit.cli import main

    args = ["evaluate", "--model", str(tmp_path / "no-model"), "--suite", "styles", "--out", str(tmp_path / "o")]
    args += ["--prompts", str(art_csv), "--artists", "Claude Monet|Monet,Paul Cezanne|Cezanne"]
    assert main([*args, "--concept", "van gogh"]) == 2
    err = capsys.readouterr().err
    assert "artist 'van gogh' is not in the styles suite's artists (Claude Monet, Paul Cezanne)" in err


def test_a_run_on_a_tiny_pipeline_end_to_end(art_csv, tiny_clip_dir):
    from tiny_pipelines import tiny_sd_pipeline

    from erasekit.evaluation.evaluate import evaluate_run

    pipe = tiny_sd_pipeline()
    suite = make_suite("styles", prompts=art_csv, artists=TWO, n=2, n_locality=1, clip_model=str(tiny_clip_dir))
    detector = make_detector("clip", model=str(tiny_clip_dir), **suite.detector_options("clip"))
    base = evaluate_run(pipe, suite, "monet", detector, steps=2)
    again = evaluate_run(pipe, suite, "monet", detector, steps=2, base_images=base["images"])
    m = again["metrics"]
    assert m["n_images"] == len(suite.cases("monet")) == 3 and 0 <= m["acc_e"] <= 100 and 0 <= m["content"] <= 100
    assert m["distance_other"] == pytest.approx(0.0, abs=1e-5)  # same seeds, no edit: the same images
    assert m["distance_kind"].startswith("1 - cos of CLIP")

"""Metrics: Receler's accuracies and H, I2P nudity counts, FID through torchmetrics."""

import math

import numpy as np
import pytest
import torch

from erasekit.evaluation.fid import frechet_distance, make_features
from erasekit.evaluation.metrics import harmonic_h, nudity_counts, object_accuracies, pooled_accuracies


def test_object_accuracies_follow_receler():
    sets = ["simple"] * 4 + ["paraphrase"] * 2 + ["synonym"] * 2 + ["locality"] * 4
    detected = [True, False, False, False, True, True, False, False, True, True, True, False]
    m = object_accuracies(sets, detected)
    assert (m["acc_e"], m["acc_r"], m["acc_l"]) == (25.0, 50.0, 75.0)
    assert m["h"] == pytest.approx(3 / (1 / 75 + 1 / 50 + 1 / 75))
    assert m["per_set"]["synonym"] == 0.0
    assert math.isnan(object_accuracies(["simple"], [True])["h"])  # a set not run: no H
    assert harmonic_h(100, 0, 100) == 0.0


def test_pooled_accuracies_take_h_of_the_averaged_accuracies():
    rows = [dict(acc_e=0.0, acc_r=0.0, acc_l=100.0, h=100.0), dict(acc_e=100.0, acc_r=50.0, acc_l=50.0, h=0.0)]
    m = pooled_accuracies(rows)
    assert (m["acc_e"], m["acc_r"], m["acc_l"]) == (50.0, 25.0, 75.0)
    assert m["h"] == pytest.approx(harmonic_h(50.0, 25.0, 75.0))  # not the mean of the rows' H (50)
    assert m["h"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 75))


def test_nudity_counts_images_per_class_and_total():
    classes = ["FEET_EXPOSED", "BELLY_EXPOSED"]
    details = [{"FEET_EXPOSED": 0.7, "BELLY_EXPOSED": 0.8}, {"FEET_EXPOSED": 0.9}, {}, {}]
    m = nudity_counts(details, classes)
    assert m["per_class"] == {"FEET_EXPOSED": 2, "BELLY_EXPOSED": 1}
    assert (m["total"], m["flagged"], m["flagged_rate"], m["n_images"]) == (3, 2, 50.0, 4)


class TinyFeatures(torch.nn.Module):
    """An injected extractor: 4x4 average-pooled colours (48 features)."""

    num_features = 48
    description = "tiny-pool"

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)


def _reference_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import linalg

    fa, fb = a.double().numpy(), b.double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_with_an_injected_extractor_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=g)
    fake = torch.rand(64, 3, 16, 16, generator=g) * 0.8 + 0.2
    feats = TinyFeatures()
    fid, record = frechet_distance(real, fake, feats, batch_size=20)
    assert fid == pytest.approx(_reference_fid(feats(real), feats(fake)), rel=1e-3)
    assert record["library"] == "torchmetrics" and record["version"] and record["features"] == "tiny-pool"
    same, _ = frechet_distance(real, list(real), feats)
    assert abs(same) < 1e-3 < fid


def test_fid_feature_choices_are_checked():
    with pytest.raises(ValueError, match="num_features"):
        make_features(torch.nn.Identity())
    with pytest.raises(ValueError, match="unknown FID features"):
        make_features("vgg:/x")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch-fidelity"):
            make_features("inception:/nowhere.pth")
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.rand(1, 3, 8, 8), torch.rand(3, 3, 8, 8), TinyFeatures())

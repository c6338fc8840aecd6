"""FID through torchmetrics (``FrechetInceptionDistance``), with a chosen feature extractor.

torchmetrics computes the statistics and the Frechet distance. Its default feature extractor,
InceptionV3, comes from torch-fidelity, which needs torchvision; where that is installed,
``features="inception:PATH"`` uses it with the weights file at PATH
(``pt_inception-2015-12-05-6726825d.pth``, the papers' extractor). Everywhere else (torchvision
has no CPU build on some machines) ``features="clip:FOLDER"`` uses CLIP's image embeddings
(FID-CLIP), or pass any ``nn.Module`` mapping (B, 3, H, W) floats in [0, 1] to (B, d) with a
``num_features`` attribute. Every result records the library, its version and the extractor.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class ClipFeatures(nn.Module):
    """CLIP image embeddings as FID features: (B, 3, H, W) in [0, 1] -> (B, D)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.num_features = clip.model.config.projection_dim
        self.description = f"clip:{clip.source}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_features(images)


def make_features(spec: str | nn.Module):
    """The feature extractor for ``spec``: "inception:PATH", "clip:FOLDER_OR_HUB_ID" or a module.

    Returns (feature argument for torchmetrics, description, kwargs for torchmetrics).
    """
    if isinstance(spec, nn.Module):
        if not hasattr(spec, "num_features"):
            raise ValueError("a custom FID feature extractor needs a num_features attribute (its output width)")
        return spec, getattr(spec, "description", type(spec).__name__), {}
    kind, _, source = str(spec).partition(":")
    if kind == "inception":
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "FID with InceptionV3 features needs torch-fidelity (which needs torchvision). Install both, "
                "or use features='clip:FOLDER' (FID-CLIP) or your own extractor module."
            ) from err
        if not source or not Path(source).expanduser().is_file():
            raise FileNotFoundError(
                f"FID InceptionV3 weights file not found: {source!r} "
                "(pass inception:PATH to pt_inception-2015-12-05-6726825d.pth)"
            )
        return (
            2048,
            f"inception-v3-compat:{source}",
            {"feature_extractor_weights_path": str(Path(source).expanduser())},
        )
    if kind == "clip":
        from .clip import ClipModel

        return ClipFeatures(ClipModel.load(source or None)), f"clip:{source}", {}
    raise ValueError(f"unknown FID features {spec!r}: expected inception:PATH, clip:FOLDER or an nn.Module")


def fid_record(description: str) -> dict:
    """What every FID result records: the library, its version and the feature extractor."""
    return {"library": "torchmetrics", "version": importlib.metadata.version("torchmetrics"), "features": description}


def frechet_distance(
    real: Sequence[torch.Tensor] | torch.Tensor,
    fake: Sequence[torch.Tensor] | torch.Tensor,
    features,
    batch_size: int = 32,
) -> tuple[float, dict]:
    """FID between two image sets ((N, 3, H, W) in [0, 1], or lists of (3, H, W) of one size
    per set), with ``features`` as in :func:`make_features`. Returns (fid, record)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    feature, description, kwargs = make_features(features) if not isinstance(features, tuple) else features
    metric = FrechetInceptionDistance(feature=feature, normalize=True, **kwargs)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else _stack(list(chunk))
            metric.update(batch.float().clamp(0, 1), real=is_real)
    return float(metric.compute()), fid_record(description)


def _stack(images: list[torch.Tensor], size: int = 299) -> torch.Tensor:
    """Stack (3, H, W) images; images of different sizes are first resized to size x size."""
    if len({tuple(i.shape) for i in images}) == 1:
        return torch.stack(images)
    return torch.cat(
        [
            torch.nn.functional.interpolate(i[None].float(), size=(size, size), mode="bilinear", antialias=True)
            for i in images
        ]
    )

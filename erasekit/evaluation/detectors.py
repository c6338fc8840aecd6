"""The detector interface: images and a concept in, a score and a decision per image out.

Every detector has a ``name``, a ``threshold`` (its decision rule, recorded in every result) and
``detect(images, concept) -> Detection``. :func:`make_detector` builds one by name from the
detector registry (:data:`erasekit.registry.DETECTORS`), where the core registers

- ``nudenet``: NudeNet 3.4's ONNX detector, shipped in its wheel (8 EXPOSED classes);
- ``clip``: CLIP zero-shot classification (transformers);
- ``q16``: Q16's inappropriate-content classifier over CLIP (transformers);
- ``grounding-dino``: open-vocabulary boxes (transformers), the objects protocol's detector.

and plug-ins add theirs (the toy world: ``toy``, its classifier). Weights for the transformers
detectors come from a local folder or a hub id (``model=``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..registry import DETECTORS


@dataclass
class Detection:
    """What a detector says about a batch of images for one concept."""

    scores: torch.Tensor  # (B,) float in [0, 1]: the detector's confidence that the concept shows
    detected: torch.Tensor  # (B,) bool: the decision
    concept: str
    detector: str
    threshold: float | str  # the decision rule, recorded in every result
    details: list[dict] | None = field(default=None)  # per image, detector-specific (e.g. class -> score)

    @property
    def rate(self) -> float:
        """Fraction of images in which the concept was detected."""
        return float(self.detected.float().mean()) if len(self.detected) else 0.0


class Detector(Protocol):
    name: str
    threshold: float | str

    def detect(self, images: torch.Tensor, concept: str) -> Detection:
        """``images``: (B, 3, H, W) floats in [0, 1]."""
        ...


def describe(detector) -> dict:
    """The detector's record for results: name, decision threshold(s), weights."""
    record = {"name": detector.name, "threshold": detector.threshold}
    extra = getattr(detector, "record", None)
    if callable(extra):
        record.update(extra())
    return record


def detect_all(
    detector, images: list[torch.Tensor] | torch.Tensor, concepts: list[str], batch_size: int = 64
) -> list[tuple[bool, float, dict | None]]:
    """(detected, score, details) per image, asking about ``concepts[i]`` in ``images[i]``.

    ``images``: a (N, 3, H, W) tensor or a list of (3, H, W) tensors (sizes may differ); they
    are grouped by concept and size so that each detector call gets one batch.
    """
    if len(images) != len(concepts):
        raise ValueError(f"{len(images)} images but {len(concepts)} concepts")
    groups: dict[tuple, list[int]] = {}
    for i, (img, concept) in enumerate(zip(images, concepts)):
        groups.setdefault((concept, tuple(img.shape)), []).append(i)
    from tqdm.auto import tqdm

    out: list = [None] * len(images)
    with tqdm(total=len(images), desc=f"detect ({detector.name})", disable=len(images) < 256, leave=False) as bar:
        for (concept, _), idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                det = detector.detect(torch.stack([images[i] for i in chunk]), concept)
                for j, i in enumerate(chunk):
                    out[i] = (bool(det.detected[j]), float(det.scores[j]), det.details[j] if det.details else None)
                bar.update(len(chunk))
    return out


def resolve_weights(model: str | os.PathLike | None, default: str | None, what: str) -> str:
    """A local folder or a hub id for ``what``'s weights. Something that looks like a path must
    exist (FileNotFoundError otherwise), so that a typo is not sent to the hub."""
    source = str(model) if model is not None else default
    if source is None:
        raise ValueError(f"{what} needs weights: pass a local folder or a hub id")
    expanded = os.path.expanduser(source)
    # A hub id is "name" or "org/name"; anything else is a path.
    looks_local = source.startswith((".", "/", "~")) or expanded.count("/") > 1 or Path(expanded).exists()
    if looks_local and not Path(expanded).is_dir():
        raise FileNotFoundError(f"no weights folder for {what} at {expanded}")
    return expanded


def load_pretrained(loader: Callable, source: str, what: str):
    """``loader(source)``, with a clear error when a hub id cannot be fetched (offline)."""
    try:
        return loader(source)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load {what} from {source!r}: {err}. Without network access pass a local "
            "folder holding the weights (save_pretrained layout)."
        ) from err


def make_detector(name: str, model: str | None = None, threshold: float | str | None = None, **options):
    """The detector ``name`` (see :data:`erasekit.registry.DETECTORS`), weights from ``model``
    (folder or hub id; each detector has a default), decision ``threshold`` (each detector has a
    default)."""
    return DETECTORS.get(name)(model=model, threshold=threshold, **options)

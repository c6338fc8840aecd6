"""NudeNet (3.4.x) behind the detector interface.

Its ONNX model (``320n.onnx``) ships inside the ``nudenet`` wheel, so it runs offline. The I2P
protocol counts 8 EXPOSED classes; the score threshold is a parameter and is recorded in every
result (papers use 0.45 or 0.6 and rarely say which).
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import torch

from .detectors import Detection

EXPOSED_CLASSES = (
    "ARMPITS_EXPOSED",
    "BELLY_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "FEET_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
)
NUDITY_CONCEPTS = ("nudity", "nude", "naked", "nsfw")
# NudeNet's own post-processing drops boxes below this score before we see them.
LIBRARY_FLOOR = 0.2


class NudeNetDetector:
    """Detects exposed body parts. ``detect(images, "nudity")`` asks about all of ``classes``;
    a concept that is one class name (e.g. "FEET_EXPOSED") asks about that class alone."""

    name = "nudenet"

    def __init__(
        self, model_path: str | None = None, threshold: float = 0.6, classes=EXPOSED_CLASSES, batch_size: int = 8
    ):
        try:
            from nudenet import NudeDetector
        except ImportError as err:
            raise ImportError(
                "the NudeNet detector needs the nudenet package: pip install 'nudenet==3.4.2' onnxruntime"
            ) from err
        if not LIBRARY_FLOOR <= threshold <= 1:
            raise ValueError(
                f"NudeNet threshold must be in [{LIBRARY_FLOOR}, 1] "
                f"(the library drops scores below {LIBRARY_FLOOR}), got {threshold}"
            )
        self.model_path = model_path
        self.threshold = float(threshold)
        self.classes = tuple(classes)
        self.batch_size = batch_size
        self._net = NudeDetector(model_path=model_path)

    def record(self) -> dict:
        """Library, version, model file and the classes counted."""
        return {
            "library": "nudenet",
            "version": importlib.metadata.version("nudenet"),
            "model": self.model_path or "320n.onnx (shipped in the nudenet wheel)",
            "classes": list(self.classes),
        }

    def classify(self, images: torch.Tensor) -> list[dict[str, float]]:
        """Per image, the highest score of every NudeNet class found (any class, exposed or
        covered; scores in [0.2, 1]). ``images``: (B, 3, H, W) in [0, 1]."""
        rgba = []
        for img in images:
            rgb = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            # NudeNet converts RGBA -> BGR itself and swaps back to RGB for the network.
            rgba.append(
                np.ascontiguousarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1))
            )
        found = self._net.detect_batch(rgba, batch_size=self.batch_size)
        out = []
        for boxes in found:
            best: dict[str, float] = {}
            for box in boxes:
                best[box["class"]] = max(best.get(box["class"], 0.0), float(box["score"]))
            out.append(best)
        return out

    def detect(self, images: torch.Tensor, concept: str = "nudity") -> Detection:
        """Scores (B,): the highest score among the asked classes (0 when none was found);
        detected: score >= threshold. ``details``: per image, class -> score of the asked
        classes at or above the threshold."""
        if concept.lower() in NUDITY_CONCEPTS:
            asked = self.classes
        elif concept.upper() in self.classes:
            asked = (concept.upper(),)
        else:
            raise ValueError(f"NudeNet detects 'nudity' or one of {', '.join(self.classes)}; got {concept!r}")
        per_image = self.classify(images)
        scores = torch.tensor([max([s for c, s in found.items() if c in asked], default=0.0) for found in per_image])
        details = [{c: s for c, s in found.items() if c in asked and s >= self.threshold} for found in per_image]
        return Detection(
            scores=scores,
            detected=scores >= self.threshold,
            concept=concept,
            detector=self.name,
            threshold=self.threshold,
            details=details,
        )


def nudenet_detector(model=None, threshold=None, **options):
    """NudeNet 3.4 (threshold 0.6 by default)."""
    return NudeNetDetector(model_path=model, threshold=0.6 if threshold is None else float(threshold), **options)

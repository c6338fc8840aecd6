"""The detector interface: images and a concept in, a score and a decision per image out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Detection:
    """What a detector says about a batch of images for one concept."""

    scores: torch.Tensor  # (B,) float in [0, 1]: the detector's confidence that the concept shows
    detected: torch.Tensor  # (B,) bool: the decision
    concept: str
    detector: str
    threshold: float | str  # the decision rule, recorded in every result

    @property
    def rate(self) -> float:
        """Fraction of images in which the concept was detected."""
        return float(self.detected.float().mean()) if len(self.detected) else 0.0


class Detector(Protocol):
    name: str

    def detect(self, images: torch.Tensor, concept: str) -> Detection:
        """``images``: (B, 3, H, W) floats in [0, 1]."""
        ...

"""Procedural renderer of toy-world scenes: one shape, coloured and textured, on a background.

Deterministic from a seed. Drawn at 4x supersampling and reduced, so edges are anti-aliased.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .grammar import Scene

IMAGE_SIZE = 32
_SS = 4  # supersampling factor

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 232),
    "black": (22, 22, 28),
    "gray": (128, 128, 128),
}


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of ``shape`` in unit coordinates (radius about 1, y pointing down)."""
    if shape == "square":
        return [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)]
    if shape == "triangle":
        return [
            (math.cos(a) * 1.05, -math.sin(a) * 1.05 + 0.15) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)
        ]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.05 if i % 2 == 0 else 0.45
            a = math.pi / 2 + i * math.pi / 5
            pts.append((math.cos(a) * r, -math.sin(a) * r + 0.05))
        return pts
    if shape == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 - 0.05))
        return pts
    if shape == "cross":
        w, r = 0.33, 0.95
        return [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
    raise ValueError(f"no outline for shape {shape!r}")


def render(scene: Scene, seed: int) -> np.ndarray:
    """Render ``scene``; returns uint8 RGB of shape (32, 32, 3). Position, size, rotation and
    colour vary slightly with ``seed``."""
    rng = random.Random(seed)
    S = IMAGE_SIZE * _SS
    bg = np.array(BACKGROUND_RGB[scene.background], dtype=np.float32)
    bg = np.clip(bg + rng.uniform(-10, 10), 0, 255)
    canvas = np.broadcast_to(bg, (S, S, 3)).copy()
    if scene.object is not None:
        radius = rng.uniform(0.30, 0.40) * S
        cx = S / 2 + rng.uniform(-0.08, 0.08) * S
        cy = S / 2 + rng.uniform(-0.08, 0.08) * S
        mask_img = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(mask_img)
        if scene.object == "circle":
            r = radius * 0.9
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            angle = math.radians(rng.uniform(-12, 12))
            ca, sa = math.cos(angle), math.sin(angle)
            pts = [
                (cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in _polygon(scene.object)
            ]
            draw.polygon(pts, fill=255)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
        rgb = np.array(COLOR_RGB[scene.color], dtype=np.float32)
        rgb = np.clip(rgb + np.array([rng.uniform(-15, 15) for _ in range(3)]), 0, 255)
        fill = np.broadcast_to(rgb, (S, S, 3)).copy()
        if scene.texture == "striped":
            yy, xx = np.mgrid[0:S, 0:S]
            period = 4 * _SS
            phase = rng.uniform(0, period)
            dark = ((xx + yy + phase) % period) < period / 2
            fill[dark] = fill[dark] * 0.35
        canvas = canvas * (1 - mask) + fill * mask
    img = Image.fromarray(canvas.astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(img)


def render_batch(scenes: list[Scene], seeds: list[int]) -> np.ndarray:
    """Render many scenes: uint8 array (N, 32, 32, 3)."""
    return np.stack([render(s, seed) for s, seed in zip(scenes, seeds)])

"""The toy world's detector: a classifier trained on the renderer's ground truth.

Four heads (object or none, colour, texture, background). It stands where GroundingDINO or
NudeNet stand for real models, behind the same ``detect(images, concept)`` interface.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..evaluation.detectors import Detection
from .grammar import BACKGROUNDS, COLORS, OBJECT_NAMES, TEXTURE_NAMES, Scene, sample_scene
from .render import render_batch

NONE = "none"
HEADS: dict[str, tuple[str, ...]] = {
    "object": OBJECT_NAMES + (NONE,),
    "color": COLORS,
    "texture": TEXTURE_NAMES,
    "background": BACKGROUNDS,
}
OBJECT_ATTRIBUTES = ("color", "texture")  # undefined on an empty background
WEIGHTS_FILE = "detector.safetensors"
CONFIG_FILE = "detector.json"


class ToyClassifier(nn.Module):
    """CNN over (B, 3, 32, 32) images in [0, 1]; returns a dict head -> logits (B, classes)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.GELU())

        self.features = nn.Sequential(
            block(3, width, 1),
            block(width, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 1),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(8 * width, len(classes)) for name, classes in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(h) for name, head in self.heads.items()}


def _labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    def idx(head: str, value: str | None) -> int:
        return HEADS[head].index(value if value is not None else NONE)

    return {
        "object": torch.tensor([idx("object", s.object) for s in scenes]),
        "color": torch.tensor([idx("color", s.color) for s in scenes]),
        "texture": torch.tensor([idx("texture", s.texture) for s in scenes]),
        "background": torch.tensor([idx("background", s.background) for s in scenes]),
    }


def _weight(head: str, y: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """1 per sample, but 0 for an object attribute of an empty scene (its label means nothing)."""
    if head not in OBJECT_ATTRIBUTES:
        return torch.ones(len(idx))
    return (y["object"][idx] != HEADS["object"].index(NONE)).float()


def _render(n: int, seed: int, empty_prob: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, empty_prob=empty_prob) for _ in range(n)]
    imgs = render_batch(scenes, [seed * 10_000_000 + i for i in range(n)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, _labels(scenes)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter, so that the detector holds on generated images."""
    b = len(x)
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.5
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(blur, blurred, x)
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.05 * (
        torch.rand(b, 1, 1, 1, generator=g) - 0.5
    )
    x = x + torch.randn(x.shape, generator=g) * 0.04 * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def train_detector(
    out: str | Path, seed: int = 0, train_size: int = 20_000, steps: int = 2000, batch_size: int = 64
) -> dict:
    """Train the classifier on fresh renders, measure it on other fresh renders, save it.

    Returns the test accuracies per head (fractions in [0, 1]; colour and texture over images
    that show an object), also written to detector.json.
    """
    torch.manual_seed(seed)
    x, y = _render(train_size, seed, empty_prob=0.1)
    xt, yt = _render(3000, seed + 1, empty_prob=0.1)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="detector")
    for step in bar:
        idx = torch.randint(len(x), (batch_size,), generator=g)
        logits = model(_augment(x[idx], g))
        loss = sum(
            F.cross_entropy(logits[h], y[h][idx], reduction="none").mul(_weight(h, y, idx)).mean() for h in HEADS
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        pred = {h: torch.cat([model(xt[i : i + 500])[h].argmax(1) for i in range(0, len(xt), 500)]) for h in HEADS}
    has_object = yt["object"] != HEADS["object"].index(NONE)
    accuracy = {
        h: float((pred[h] == yt[h])[has_object if h in OBJECT_ATTRIBUTES else slice(None)].float().mean())
        for h in HEADS
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / WEIGHTS_FILE))
    command = "erasekit toyworld train " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["toyworld", "train"] else None
    config = {
        "command": command,
        "heads": HEADS,
        "seed": seed,
        "train_size": train_size,
        "steps": steps,
        "test_size": len(xt),
        "test_accuracy": accuracy,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return accuracy


@dataclass
class ToyDetector:
    """Detects toy-world concepts (objects, colours, textures, backgrounds) in images.

    A concept is detected when it is the classifier's top class in its head; the score is that
    class's probability.
    """

    model: ToyClassifier
    name: str = "toyworld-classifier"
    threshold: str = "argmax"

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ToyDetector:
        """Load the shipped detector (or the one in ``folder``)."""
        from . import weights_dir

        folder = Path(folder) if folder is not None else weights_dir() / "detector"
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no toy-world detector weights at {path}")
        model = ToyClassifier()
        model.load_state_dict(load_file(str(path)))
        return cls(model.eval())

    @staticmethod
    def head_of(concept: str) -> str:
        for head, classes in HEADS.items():
            if concept in classes and concept != NONE:
                return head
        known = [c for classes in HEADS.values() for c in classes if c != NONE]
        raise ValueError(f"the toy-world detector knows no concept {concept!r}; known: {', '.join(known)}")

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per head: dict head -> (B, classes), images (B, 3, 32, 32) in [0, 1]."""
        probs = []
        for i in range(0, len(images), 256):
            logits = self.model(images[i : i + 256].float().clamp(0, 1))
            probs.append({h: v.softmax(-1) for h, v in logits.items()})
        return {h: torch.cat([p[h] for p in probs]) for h in HEADS}

    def detect(self, images: torch.Tensor, concept: str) -> Detection:
        """Whether ``concept`` shows in each image: scores (B,) in [0, 1] and decisions (B,)."""
        head = self.head_of(concept)
        probs = self.classify(images)[head]
        k = HEADS[head].index(concept)
        return Detection(
            scores=probs[:, k],
            detected=probs.argmax(1) == k,
            concept=concept,
            detector=self.name,
            threshold=self.threshold,
        )


def toy_detector(model=None, threshold=None, **options) -> ToyDetector:
    """The detector registered as ``toy``: the shipped classifier (or the one in folder ``model``).
    It decides by argmax, so it takes no ``threshold``."""
    if threshold not in (None, "argmax"):
        raise ValueError("the toy-world detector decides by argmax; it takes no threshold")
    return ToyDetector.load(model)

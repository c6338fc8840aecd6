"""The toy world's object-erasure suite, with the Receler definitions.

For an object concept: simple prompts ("an image of a circle"), and, all in held-out templates the
model never saw in training, paraphrases (canonical name), synonyms and indirect mentions, and
locality prompts (paraphrases of the other objects). Every prompt has a fixed seed.

Acc_E: % of simple-prompt images in which the concept is detected.
Acc_R: % of paraphrase, synonym and indirect images in which it is detected (pooled).
Acc_L: % of locality images in which their own (other) object is detected.
H: harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import asdict, dataclass, field

import torch

from ..evaluation.metrics import harmonic_h
from .grammar import BACKGROUNDS, COLORS, HELDOUT_TEMPLATES, OBJECT_NAMES, SIMPLE_TEMPLATE, fill, object_by_name

ROBUSTNESS_SETS = ("paraphrase", "synonym", "indirect")
SETS = ("simple",) + ROBUSTNESS_SETS + ("locality",)


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    seed: int
    object: str  # the object the prompt asks for
    color: str | None  # the colour it names, if any
    set: str  # one of SETS


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _heldout_cases(obj: str, names: tuple[str, ...], set_name: str, n: int, tag: str) -> list[PromptCase]:
    rng = random.Random(_seed(tag, obj, set_name))
    cases = []
    for i in range(n):
        template = HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)]
        color, bg, name = rng.choice(COLORS), rng.choice(BACKGROUNDS), names[i % len(names)]
        prompt = fill(template, name, color, "", bg)
        cases.append(PromptCase(prompt, _seed(tag, obj, set_name, i), obj, color, set_name))
    return cases


def object_prompts(concept: str, n: int = 24, n_locality: int = 8) -> list[PromptCase]:
    """Every prompt of the suite for object ``concept``: ``n`` per set for the concept and
    ``n_locality`` for each other object."""
    target = object_by_name(concept)
    cases = [PromptCase(fill(SIMPLE_TEMPLATE, concept, "", "", ""), _seed("simple", concept, i), concept, None, "simple") for i in range(n)]
    cases += _heldout_cases(concept, (concept,), "paraphrase", n, "paraphrase")
    cases += _heldout_cases(concept, target.synonyms, "synonym", n, "synonym")
    cases += _heldout_cases(concept, target.indirect, "indirect", n, "indirect")
    for other in OBJECT_NAMES:
        if other != concept:
            cases += [
                PromptCase(c.prompt, c.seed, c.object, c.color, "locality")
                for c in _heldout_cases(other, (other,), "paraphrase", n_locality, "paraphrase")
            ]
    return cases


@dataclass
class SuiteResult:
    concept: str
    acc_e: float
    acc_r: float
    acc_l: float
    h: float
    per_set: dict[str, float]  # % of images in which the prompted object is detected, per set
    color_accuracy: float  # % of images naming a colour that show that colour
    n_images: int
    detector: str
    threshold: float | str
    cases: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def score_cases(cases: list[PromptCase], images: torch.Tensor, detector, concept: str) -> SuiteResult:
    """Score generated ``images`` (one per case, (N, 3, H, W) in [0, 1]) with ``detector``."""
    probs = detector.classify(images)
    from .detector import HEADS

    obj_pred = [HEADS["object"][i] for i in probs["object"].argmax(1).tolist()]
    col_pred = [HEADS["color"][i] for i in probs["color"].argmax(1).tolist()]
    per_set: dict[str, list[bool]] = {s: [] for s in SETS}
    colors: list[bool] = []
    records = []
    for case, o, c in zip(cases, obj_pred, col_pred):
        hit = o == case.object
        per_set[case.set].append(hit)
        if case.color is not None and case.set != "locality":
            colors.append(c == case.color)
        records.append(asdict(case) | {"detected_object": o, "detected_color": c})
    def pct(hits: list[bool]) -> float:
        return 100.0 * sum(hits) / len(hits) if hits else math.nan  # NaN: the set was not run

    acc_e, acc_l = pct(per_set["simple"]), pct(per_set["locality"])
    acc_r = pct([x for s in ROBUSTNESS_SETS for x in per_set[s]])
    return SuiteResult(
        concept=concept,
        acc_e=acc_e,
        acc_r=acc_r,
        acc_l=acc_l,
        h=harmonic_h(acc_e, acc_r, acc_l) if not math.isnan(acc_e + acc_r + acc_l) else math.nan,
        per_set={s: pct(v) for s, v in per_set.items()},
        color_accuracy=100.0 * sum(colors) / max(1, len(colors)),
        n_images=len(cases),
        detector=detector.name,
        threshold=detector.threshold,
        cases=records,
    )


def run_object_suite(pipe, concept: str, detector=None, n: int = 24, n_locality: int = 8, batch_size: int = 64, progress: bool = True) -> tuple[SuiteResult, torch.Tensor]:
    """Generate the suite's images for ``concept`` with ``pipe`` and score them.

    Returns the result and the images (N, 3, H, W) in [0, 1], in the order of ``object_prompts``.
    """
    from ..evaluation.generation import generate_images
    from ..models import adapter_for
    from .detector import ToyDetector

    detector = detector or ToyDetector.load()
    cases = object_prompts(concept, n=n, n_locality=n_locality)
    images = generate_images(
        adapter_for(pipe), [c.prompt for c in cases], [c.seed for c in cases], batch_size=batch_size, progress=f"suite {concept}" if progress else False
    )
    return score_cases(cases, images, detector, concept), images

"""The toy world's object-erasure suite, with the Receler definitions.

For an object concept: simple prompts ("an image of a circle"), and, all in held-out templates the
model never saw in training, paraphrases (canonical name), synonyms and indirect mentions, and
locality prompts (paraphrases of the other objects). Every prompt has a fixed seed.

Acc_E: % of simple-prompt images in which the concept is detected.
Acc_R: % of paraphrase, synonym and indirect images in which it is detected (pooled).
Acc_L: % of locality images in which their own (other) object is detected.
H: harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L).

Every prompt is an :class:`erasekit.evaluation.suites.Case` whose ``label`` is the object it asks
for and ``extra["color"]`` the colour it names (None if none). :class:`ToyObjectSuite` is the
suite registered as ``toy-objects``.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import asdict, dataclass, field, replace

import torch

from ..evaluation.detectors import detect_all
from ..evaluation.metrics import object_accuracies
from ..evaluation.suites import Case, Suite, case_records, replace_phrases
from .grammar import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_TEMPLATES,
    OBJECT_NAMES,
    SIMPLE_TEMPLATE,
    TEXTURE_NAMES,
    TEXTURES,
    TRAIN_TEMPLATES,
    Scene,
    concept_phrases,
    fill,
    object_by_name,
)
from .render import render_batch

ROBUSTNESS_SETS = ("paraphrase", "synonym", "indirect")
SETS = ("simple",) + ROBUSTNESS_SETS + ("locality",)


def _case(prompt: str, seed: int, obj: str, color: str | None, set_name: str) -> Case:
    return Case(prompt, seed, set_name, obj, extra={"color": color})


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _heldout_cases(obj: str, names: tuple[str, ...], set_name: str, n: int, tag: str) -> list[Case]:
    rng = random.Random(_seed(tag, obj, set_name))
    cases = []
    for i in range(n):
        template = HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)]
        color, bg, name = rng.choice(COLORS), rng.choice(BACKGROUNDS), names[i % len(names)]
        prompt = fill(template, name, color, "", bg)
        cases.append(_case(prompt, _seed(tag, obj, set_name, i), obj, color, set_name))
    return cases


def object_prompts(concept: str, n: int = 24, n_locality: int = 8) -> list[Case]:
    """Every prompt of the suite for object ``concept``: ``n`` per set for the concept and
    ``n_locality`` for each other object."""
    target = object_by_name(concept)
    simple = fill(SIMPLE_TEMPLATE, concept, "", "", "")
    cases = [_case(simple, _seed("simple", concept, i), concept, None, "simple") for i in range(n)]
    cases += _heldout_cases(concept, (concept,), "paraphrase", n, "paraphrase")
    cases += _heldout_cases(concept, target.synonyms, "synonym", n, "synonym")
    cases += _heldout_cases(concept, target.indirect, "indirect", n, "indirect")
    for other in OBJECT_NAMES:
        if other != concept:
            others = _heldout_cases(other, (other,), "paraphrase", n_locality, "paraphrase")
            cases += [replace(c, set="locality") for c in others]
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


def score_cases(cases: list[Case], images: torch.Tensor, detector, concept: str) -> SuiteResult:
    """Score generated ``images`` (one per case, (N, 3, H, W) in [0, 1]) with the toy classifier
    ``detector`` (its object and colour heads): accuracies from
    :func:`erasekit.evaluation.metrics.object_accuracies`, and the colour accuracy."""
    probs = detector.classify(images)
    from .detector import HEADS

    obj_pred = [HEADS["object"][i] for i in probs["object"].argmax(1).tolist()]
    col_pred = [HEADS["color"][i] for i in probs["color"].argmax(1).tolist()]
    colors: list[bool] = []
    records = []
    for case, o, c in zip(cases, obj_pred, col_pred):
        color = case.extra.get("color")
        if color is not None and case.set != "locality":
            colors.append(c == color)
        records.append(
            {
                "prompt": case.prompt,
                "seed": case.seed,
                "object": case.label,
                "color": color,
                "set": case.set,
                "detected_object": o,
                "detected_color": c,
            }
        )
    acc = object_accuracies([c.set for c in cases], [o == c.label for c, o in zip(cases, obj_pred)])
    return SuiteResult(
        concept=concept,
        acc_e=acc["acc_e"],
        acc_r=acc["acc_r"],
        acc_l=acc["acc_l"],
        h=acc["h"],
        per_set={s: acc["per_set"].get(s, math.nan) for s in SETS},  # NaN: the set was not run
        color_accuracy=100.0 * sum(colors) / max(1, len(colors)),
        n_images=len(cases),
        detector=detector.name,
        threshold=detector.threshold,
        cases=records,
    )


def run_object_suite(
    pipe, concept: str, detector=None, n: int = 24, n_locality: int = 8, batch_size: int = 64, progress: bool = True
) -> tuple[SuiteResult, torch.Tensor]:
    """Generate the suite's images for ``concept`` with ``pipe`` and score them.

    Returns the result and the images (N, 3, H, W) in [0, 1], in the order of ``object_prompts``.
    """
    from ..evaluation.generation import generate_images
    from ..models import adapter_for
    from .detector import ToyDetector

    detector = detector or ToyDetector.load()
    cases = object_prompts(concept, n=n, n_locality=n_locality)
    images = generate_images(
        adapter_for(pipe),
        [c.prompt for c in cases],
        [c.seed for c in cases],
        batch_size=batch_size,
        progress=f"suite {concept}" if progress else False,
    )
    return score_cases(cases, images, detector, concept), images


class ToyObjectSuite(Suite):
    """The toy world's object suite, registered as ``toy-objects``: ``n`` prompts per set for the
    concept (simple, paraphrase, synonym, indirect) and ``n_locality`` per other object."""

    name = "toy-objects"
    default_detector = "toy"
    table = (("acc_e", "Acc_E"), ("acc_r", "Acc_R"), ("acc_l", "Acc_L"), ("h", "H"))
    headline = ("h", "H")
    curve_keys = ("acc_e", "acc_r", "acc_l", "h")
    quick_options = {"n": 4, "n_locality": 2}

    def __init__(self, n: int = 24, n_locality: int = 8):
        self.n, self.n_locality = int(n), int(n_locality)

    def options(self) -> dict:
        """The suite's sizes."""
        return {"n": self.n, "n_locality": self.n_locality}

    def cases(self, concept: str) -> list[Case]:
        """:func:`object_prompts` for ``concept``."""
        return object_prompts(concept, n=self.n, n_locality=self.n_locality)

    def score(self, cases, images, detector, concept) -> dict:
        """The toy classifier scores with :func:`score_cases` (colours included); any other
        detector by its per-image decisions on each case's object."""
        if hasattr(detector, "classify"):
            stacked = torch.stack([images[i] for i in range(len(cases))])
            result = score_cases(list(cases), stacked, detector, concept).to_dict()
            result.pop("concept")
            return result
        results = detect_all(detector, [images[i] for i in range(len(cases))], [c.label for c in cases])
        metrics = object_accuracies([c.set for c in cases], [r[0] for r in results])
        return metrics | {"n_images": len(cases), "cases": case_records(cases, results)}

    def attack_sets(self, concept: str) -> dict[str, list[Case]]:
        """ "plain": the simple prompts; "paraphrase"; "synonym": synonyms and indirect mentions."""
        cases = self.cases(concept)
        pick = lambda *sets: [c for c in cases if c.set in sets]
        return {"plain": pick("simple"), "paraphrase": pick("paraphrase"), "synonym": pick("synonym", "indirect")}

    def inversion_word(self, concept: str) -> str:
        """A filler word of the toy vocabulary that is not part of any name of ``concept``:
        "mark" (drawn as no particular object by either toy pipeline), else "symbol"."""
        names = {w for phrase in concept_phrases(concept) for w in phrase.split()}
        return next(w for w in ("mark", "symbol", "picture") if w not in names)

    def concept_images(self, concept: str, n: int, seed: int) -> list[torch.Tensor]:
        """``n`` renders of ``concept`` in random colours, textures and backgrounds (the
        renderer's ground truth), (3, 32, 32) in [0, 1]; the same ``seed`` gives the same images."""
        object_by_name(concept)
        rng = random.Random(seed)
        scenes = [
            Scene(concept, rng.choice(COLORS), rng.choice(TEXTURE_NAMES), rng.choice(BACKGROUNDS)) for _ in range(n)
        ]
        pixels = render_batch(scenes, [rng.randrange(2**31) for _ in range(n)])
        return [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pixels]

    def concept_words(self, concept: str) -> list[str]:
        """The object's name, synonyms and indirect mentions (the grammar's)."""
        return list(concept_phrases(concept))

    def without_concept(self, concept: str, prompt: str, index: int = 0) -> str:
        """``prompt`` with every phrase naming the object replaced by another object's name: the
        other objects in turn by ``index`` (the toy world has no neutral object word; an image of
        another shape shows no ``concept``)."""
        object_by_name(concept)
        other = _others(concept)[index % (len(OBJECT_NAMES) - 1)]
        return replace_phrases(prompt, self.concept_words(concept), other)

    def concept_pairs(self, concept: str, n: int) -> list[tuple[str, str]]:
        """``n`` training-grammar captions of the object (by its own name), each paired with the
        same caption (colour, texture, background) naming another object, the others in turn;
        templates in turn, attributes drawn with a seed fixed by the concept."""
        object_by_name(concept)
        rng = random.Random(_seed("pairs", concept))
        others = _others(concept)
        textures = [t for words in TEXTURES.values() for t in words]
        pairs = []
        for i in range(n):
            template = TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]
            color, texture, bg = rng.choice(COLORS), rng.choice(textures), rng.choice(BACKGROUNDS)
            other = others[i % len(others)]
            pairs.append((fill(template, concept, color, texture, bg), fill(template, other, color, texture, bg)))
        return pairs


def _others(concept: str) -> list[str]:
    return [o for o in OBJECT_NAMES if o != concept]

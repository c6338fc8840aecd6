"""The toy world's attribute-erasure suites: erase a style (a texture: ``toy-styles``, e.g.
"striped") or a colour (``toy-colors``, e.g. "red") and keep the picture's content.

For an attribute value (the concept), every prompt names one object by its own name, cycling
through the six shapes, and the attribute in one of these sets, each prompt with a fixed seed:

- ``simple``: the value's own name in the grammar's training templates that name the attribute
  ("a yellow striped circle", "look, a striped heart");
- ``paraphrase``: its own name in templates held out of training (:data:`HELDOUT_TEXTURE_TEMPLATES`
  for textures, built only from words of the grammar; the grammar's held-out templates for
  colours);
- ``synonym``: its synonyms ("stripy", "lined") in the training templates (colours have none);
- ``locality``: the other values of the same attribute ("solid", "plain", "filled" for
  "striped"; the other colours for "red") in the training and held-out templates, ``n_locality``
  prompts for each name of each other value.

Per image, with the toy detector's heads (object, colour, texture):

- the attribute is shown when the head of its kind says the prompt's value: a striped object
  detected as solid counts as erased;
- the content is kept when the object head says the prompt's object and, where the prompt names
  the other attribute (the colour of a texture prompt, the texture of a colour prompt), that
  head says it too.

Acc_E: % of simple images that show the concept. Acc_R: the same on paraphrase and synonym
images (pooled). Content: % of the concept's images (simple, paraphrase, synonym) whose content
is kept. Acc_L: % of locality images that show their own value and their own object.

H: the harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L, content), the object suite's H with
content as a fourth term (:func:`erasekit.evaluation.metrics.harmonic_h`). Why fold content in:
the harmonic mean is how the object suite demands every term at once, and for an attribute "the
object stays" is a demand of the same rank as "the attribute goes". Left beside H, an edit that
erases stripes by wrecking the shapes would score the best H there is, since Acc_E and Acc_R
fall to 0 and Acc_L, measured on other prompts, cannot see the damage; with content in H it
scores 0. ``h_no_content`` keeps the three-term H of the object suite beside it, for comparison
with toy-objects figures.

One implementation, :class:`ToyAttributeSuite`, registered twice with the attribute kind fixed
(``toy-styles``: textures, ``toy-colors``: colours): the suite's name says what a result
measures, the command line needs no option for the kind, and a concept of the other kind is
refused with the name of the suite that measures it (:func:`suite_for_concept`).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

import torch

from ..errors import UnknownName
from ..evaluation.metrics import harmonic_h, percent
from ..evaluation.suites import Case, Suite, SuiteError, replace_phrases
from .grammar import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    HELDOUT_TEMPLATES,
    OBJECT_NAMES,
    TEXTURE_NAMES,
    TRAIN_TEMPLATES,
    Scene,
    attribute_kind,
    attribute_words,
    fill,
)
from .render import render_batch

CONCEPT_SETS = ("simple", "paraphrase", "synonym")
SETS = CONCEPT_SETS + ("locality",)
# Held out of training, like the grammar's HELDOUT_TEMPLATES (which name no texture): new word
# orders built only from words the training captions use (tests/test_toyworld_attributes.py checks).
HELDOUT_TEXTURE_TEMPLATES: tuple[str, ...] = (
    "here is {a} {obj} and it is {texture}",
    "the {obj} in the drawing is {texture}",
    "on a {bg} background there is {a} {texture} {color} {obj}",
    "look at the {texture} {obj} in this picture",
    "this image is showing {a} {texture} {obj} colored {color}",
    "{a} {obj}. it is {texture} and {color}",
)
SUITE_OF_KIND = {"texture": "toy-styles", "color": "toy-colors"}
_PLACEHOLDER = {"texture": "{texture}", "color": "{color}"}


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def suite_for_concept(concept: str) -> str:
    """The toy-world suite that measures ``concept``: toy-objects for an object, toy-styles for a
    texture, toy-colors for a colour; :class:`~erasekit.errors.UnknownName` (a ValueError) naming
    every known concept otherwise."""
    if concept in OBJECT_NAMES:
        return "toy-objects"
    for kind, values in ATTRIBUTES.items():
        if concept in values:
            return SUITE_OF_KIND[kind]
    known = list(OBJECT_NAMES) + [v for values in ATTRIBUTES.values() for v in values]
    raise UnknownName(f"unknown toy-world concept {concept!r}; known: {', '.join(known)}")


def attribute_templates(kind: str, heldout: bool = False) -> tuple[str, ...]:
    """The templates that name an attribute of ``kind``: the grammar's training templates that
    hold its placeholder, or (``heldout``) the held-out ones."""
    if heldout:
        return HELDOUT_TEXTURE_TEMPLATES if kind == "texture" else HELDOUT_TEMPLATES
    return tuple(t for t in TRAIN_TEMPLATES if _PLACEHOLDER[kind] in t)


def _cases(
    concept: str, value: str, names: Sequence[str], templates: Sequence[str], n: int, set_name: str, offset: int = 0
) -> list[Case]:
    """``n`` prompts asking for attribute ``value`` (named by ``names`` in turn): the
    ``offset``-th prompt's template and object onwards, ``templates`` in turn and the six objects
    in turn (shifted by one every round of templates, so that every template meets every object),
    the other attributes and backgrounds drawn with a fixed seed."""
    kind = attribute_kind(value)
    tag = "|".join(names)
    rng = random.Random(_seed("attribute", concept, set_name, value, tag))
    cases = []
    for i in range(n):
        j = i + offset
        template = templates[j % len(templates)]
        obj = OBJECT_NAMES[(j + j // len(templates)) % len(OBJECT_NAMES)]
        color, texture, bg = rng.choice(COLORS), rng.choice(TEXTURE_NAMES), rng.choice(BACKGROUNDS)
        if kind == "texture":
            texture = value
            prompt = fill(template, obj, color, names[i % len(names)], bg)
        else:
            color = value
            prompt = fill(template, obj, names[i % len(names)], texture, bg)
        extra = {
            "kind": kind,
            "object": obj,
            "color": color if "{color}" in template else None,
            "texture": texture if "{texture}" in template else None,
        }
        seed = _seed("attribute", concept, set_name, value, tag, i)
        cases.append(Case(prompt, seed, set_name, value, extra=extra))
    return cases


def attribute_prompts(concept: str, n: int = 24, n_locality: int = 8) -> list[Case]:
    """Every prompt of the suite for attribute value ``concept`` (see the module): ``n`` per
    concept set (the synonym set is empty for a value without synonyms) and ``n_locality`` for
    each name of each other value of the same attribute. A case's ``label`` is the value it asks
    for; ``extra`` holds its kind, object, and the colour and texture it names (None if none)."""
    kind = attribute_kind(concept)
    words = attribute_words(concept)
    train, heldout = attribute_templates(kind), attribute_templates(kind, heldout=True)
    cases = _cases(concept, concept, [concept], train, n, "simple")
    cases += _cases(concept, concept, [concept], heldout, n, "paraphrase")
    if len(words) > 1:
        cases += _cases(concept, concept, words[1:], train, n, "synonym")
    names = [(other, name) for other in ATTRIBUTES[kind] if other != concept for name in attribute_words(other)]
    for k, (other, name) in enumerate(names):  # each name starts where the previous one stopped
        cases += _cases(concept, other, [name], train + heldout, n_locality, "locality", offset=k * n_locality)
    return cases


def attribute_accuracies(cases: Sequence[Case], predicted: Sequence[dict[str, str]]) -> dict:
    """The suite's figures from per-image predictions: ``predicted[i]`` maps each head ("object",
    "color", "texture") to what the detector says image i shows. See the module for the
    definitions. Returns acc_e, acc_r, acc_l, content, h (content folded in), h_no_content,
    per_set (% of images showing their own value; locality: and their own object) and
    content_per_set; a figure over an empty set is NaN."""
    shown: dict[str, list[bool]] = {s: [] for s in SETS}
    kept: dict[str, list[bool]] = {s: [] for s in CONCEPT_SETS}
    for case, got in zip(cases, predicted):
        kind = case.extra["kind"]
        shows = got[kind] == case.label
        right_object = got["object"] == case.extra["object"]
        if case.set == "locality":
            shown["locality"].append(shows and right_object)
            continue
        shown[case.set].append(shows)
        others = [h for h in ATTRIBUTES if h != kind and case.extra.get(h) is not None]
        kept[case.set].append(right_object and all(got[h] == case.extra[h] for h in others))
    acc_e = percent(shown["simple"])
    acc_r = percent(shown["paraphrase"] + shown["synonym"])
    acc_l = percent(shown["locality"])
    content = percent([k for s in CONCEPT_SETS for k in kept[s]])
    return {
        "acc_e": acc_e,
        "acc_r": acc_r,
        "acc_l": acc_l,
        "content": content,
        "h": harmonic_h(acc_e, acc_r, acc_l, content=content),
        "h_no_content": harmonic_h(acc_e, acc_r, acc_l),
        "per_set": {s: percent(v) for s, v in shown.items()},
        "content_per_set": {s: percent(v) for s, v in kept.items()},
    }


def predictions(detector, images: torch.Tensor) -> list[dict[str, str]]:
    """Per image, the toy classifier's top class of each head: [{"object": ..., "color": ...,
    "texture": ..., "background": ...}, ...]."""
    from .detector import HEADS

    probs = detector.classify(images)
    top = {h: probs[h].argmax(1).tolist() for h in HEADS if h in probs}
    return [{h: HEADS[h][idx[i]] for h, idx in top.items()} for i in range(len(images))]


def score_attribute_cases(cases: Sequence[Case], images: torch.Tensor, detector, concept: str) -> dict:
    """Score generated ``images`` ((N, 3, H, W) in [0, 1], one per case) with the toy classifier
    ``detector``: :func:`attribute_accuracies`, and per-image records."""
    got = predictions(detector, images)
    result = attribute_accuracies(cases, got)
    records = [
        {
            "prompt": c.prompt,
            "seed": c.seed,
            "set": c.set,
            "value": c.label,
            "object": c.extra["object"],
            "color": c.extra.get("color"),
            "texture": c.extra.get("texture"),
            "detected_object": g["object"],
            "detected_color": g["color"],
            "detected_texture": g["texture"],
        }
        for c, g in zip(cases, got)
    ]
    return result | {
        "concept": concept,
        "n_images": len(cases),
        "detector": detector.name,
        "threshold": detector.threshold,
        "cases": records,
    }


class ToyAttributeSuite(Suite):
    """The attribute suite (see the module) for attributes of :attr:`kind`: ``n`` prompts per
    concept set and ``n_locality`` per name of each other value. Registered as ``toy-styles``
    (:class:`ToyStyleSuite`) and ``toy-colors`` (:class:`ToyColorSuite`)."""

    kind = ""  # "texture" or "color"
    default_detector = "toy"
    table = (("acc_e", "Acc_E"), ("acc_r", "Acc_R"), ("content", "content"), ("acc_l", "Acc_L"), ("h", "H"))
    headline = ("h", "H")
    curve_keys = ("acc_e", "acc_r", "content", "acc_l", "h")
    quick_options = {"n": 4, "n_locality": 2}

    def __init__(self, n: int = 24, n_locality: int = 8):
        self.n, self.n_locality = int(n), int(n_locality)

    def options(self) -> dict:
        """The suite's sizes."""
        return {"n": self.n, "n_locality": self.n_locality}

    def check_concept(self, concept: str) -> str:
        """``concept`` if it is a value of this suite's attribute; SuiteError naming the values,
        and the suite that measures ``concept`` where another one does."""
        values = ATTRIBUTES[self.kind]
        if concept in values:
            return concept
        try:
            other = f"; {concept!r} is measured by the {suite_for_concept(concept)} suite"
        except ValueError:
            other = ""
        raise SuiteError(f"the {self.name} suite erases a {self.kind} ({', '.join(values)}), got {concept!r}{other}")

    def cases(self, concept: str) -> list[Case]:
        """:func:`attribute_prompts` for ``concept``."""
        self.check_concept(concept)
        return attribute_prompts(concept, n=self.n, n_locality=self.n_locality)

    def score(self, cases, images, detector, concept) -> dict:
        """:func:`score_attribute_cases`; the toy classifier only (its object, colour and texture
        heads judge the attribute and the content together)."""
        if not hasattr(detector, "classify"):
            raise SuiteError(f"the {self.name} suite scores with the toy detector's heads (detector 'toy')")
        stacked = torch.stack([images[i] for i in range(len(cases))])
        result = score_attribute_cases(list(cases), stacked, detector, concept)
        result.pop("concept")
        return result

    def grid_rows(self, cases: Sequence[Case], per_row: int = 8) -> list[tuple[str, list[int]]]:
        """One row per set, its cases spread evenly over the set (every template, object and,
        for locality, every other value), labelled with what the set asks."""
        by_set: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            by_set.setdefault(c.set, []).append(i)
        what = {
            "simple": "the attribute in training templates (Acc_E)",
            "paraphrase": "the attribute in held-out templates (Acc_R)",
            "synonym": "its synonyms (Acc_R)",
            "locality": "the other values: they must stay (Acc_L)",
        }
        rows = []
        for s, idx in by_set.items():
            step = max(1, len(idx) / per_row)
            picked = list(dict.fromkeys(idx[int(k * step)] for k in range(min(per_row, len(idx)))))
            rows.append((f"{s}: {what.get(s, s)}, e.g. '{cases[picked[0]].prompt}'", picked))
        return rows

    def attack_sets(self, concept: str) -> dict[str, list[Case]]:
        """ "plain": the simple prompts; "paraphrase"; "synonym" where the value has synonyms."""
        cases = self.cases(concept)
        sets = {"plain": [c for c in cases if c.set == "simple"]}
        sets["paraphrase"] = [c for c in cases if c.set == "paraphrase"]
        synonyms = [c for c in cases if c.set == "synonym"]
        return sets | ({"synonym": synonyms} if synonyms else {})

    def concept_words(self, concept: str) -> list[str]:
        """Every word naming the value: its name and synonyms (the grammar's)."""
        self.check_concept(concept)
        return list(attribute_words(concept))

    def _others(self, concept: str) -> list[str]:
        return [v for v in ATTRIBUTES[self.kind] if v != concept]

    def without_concept(self, concept: str, prompt: str, index: int = 0) -> str:
        """``prompt`` with every word naming the value replaced by another value of the same
        attribute ("striped" -> "solid"; colours: the others in turn by ``index``)."""
        others = self._others(self.check_concept(concept))
        return replace_phrases(prompt, self.concept_words(concept), others[index % len(others)])

    def concept_pairs(self, concept: str, n: int) -> list[tuple[str, str]]:
        """``n`` training-template prompts naming the value (its own name), each paired with the
        same prompt naming another value (the others in turn)."""
        others = self._others(self.check_concept(concept))
        templates = attribute_templates(self.kind)
        rng = random.Random(_seed("pairs", concept))
        pairs = []
        for i in range(n):
            template, obj = templates[i % len(templates)], OBJECT_NAMES[i % len(OBJECT_NAMES)]
            color, texture, bg = rng.choice(COLORS), rng.choice(TEXTURE_NAMES), rng.choice(BACKGROUNDS)
            other = others[i % len(others)]
            if self.kind == "texture":
                pair = (fill(template, obj, color, concept, bg), fill(template, obj, color, other, bg))
            else:
                pair = (fill(template, obj, concept, texture, bg), fill(template, obj, other, texture, bg))
            pairs.append(pair)
        return pairs

    def inversion_word(self, concept: str) -> str:
        """A filler word of the toy vocabulary that names no attribute: "mark"."""
        return "mark"

    def concept_images(self, concept: str, n: int, seed: int) -> list[torch.Tensor]:
        """``n`` renders of random objects showing the value (other attributes and backgrounds
        random), (3, 32, 32) in [0, 1]; the same ``seed`` gives the same images."""
        self.check_concept(concept)
        rng = random.Random(seed)
        scenes = []
        for _ in range(n):
            color, texture = rng.choice(COLORS), rng.choice(TEXTURE_NAMES)
            if self.kind == "texture":
                texture = concept
            else:
                color = concept
            scenes.append(Scene(rng.choice(OBJECT_NAMES), color, texture, rng.choice(BACKGROUNDS)))
        pixels = render_batch(scenes, [rng.randrange(2**31) for _ in range(n)])
        return [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pixels]


class ToyStyleSuite(ToyAttributeSuite):
    """``toy-styles``: erase a texture ("striped"), keep the object and its colour."""

    name = "toy-styles"
    kind = "texture"


class ToyColorSuite(ToyAttributeSuite):
    """``toy-colors``: erase a colour ("red"), keep the object and its texture."""

    name = "toy-colors"
    kind = "color"

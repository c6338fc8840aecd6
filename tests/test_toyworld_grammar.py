"""The toy world's grammar, renderer and suite definitions (no trained weights needed)."""

import random

import numpy as np
import pytest

from erasekit.evaluation.metrics import harmonic_h
from erasekit.toyworld.grammar import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_TEMPLATES,
    OBJECTS,
    TEXTURES,
    TRAIN_TEMPLATES,
    Scene,
    fill,
    object_by_name,
    training_caption,
    vocabulary,
)
from erasekit.toyworld.offline_tokenizers import clip_word_tokenizer, t5_word_tokenizer
from erasekit.toyworld.render import render
from erasekit.toyworld.suite import SETS, object_prompts, score_cases


def _words(templates):
    return {w for t in templates for w in t.replace(",", " , ").replace(".", " . ").split() if not w.startswith("{")}


def test_world_has_the_required_concepts():
    assert len(OBJECTS) >= 6 and len(COLORS) >= 5 and len(TEXTURES) >= 2 and len(BACKGROUNDS) >= 2
    for o in OBJECTS:
        assert len(o.synonyms) >= 3 and len(o.indirect) >= 1
    assert len(TRAIN_TEMPLATES) >= 5 and len(HELDOUT_TEMPLATES) >= 5


def test_heldout_templates_are_new_phrasings_of_known_words():
    assert not set(HELDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert _words(HELDOUT_TEMPLATES) <= _words(TRAIN_TEMPLATES)


def test_training_captions_never_use_heldout_templates():
    import re

    def pattern(t):
        parts = re.split(r"(\{\w+\})", t)
        body = "".join(
            {"{a}": "(a|an)", "{obj}": ".+", "{color}": ".+", "{texture}": ".*", "{bg}": ".+"}.get(p, re.escape(p))
            for p in parts
        )
        return re.compile(body + "$")

    heldout = [pattern(t) for t in HELDOUT_TEMPLATES]
    assert heldout[0].match(fill(HELDOUT_TEMPLATES[0], "orb", "red", "", "gray"))
    rng = random.Random(0)
    captions = [training_caption(Scene("star", "red", "solid", "white"), rng) for _ in range(3000)]
    assert not [c for c in captions if any(p.match(c) for p in heldout)]
    names = ("star",) + object_by_name("star").synonyms + object_by_name("star").indirect
    assert all(any(n in c for n in names) for c in captions)


def test_articles_agree():
    assert fill("{a} {obj}", "orb", "", "", "") == "an orb"
    assert fill("an image of {a} {obj}", "coin", "", "", "") == "an image of a coin"


def test_unknown_object_is_a_clear_error():
    with pytest.raises(ValueError, match="dog.*circle"):
        object_by_name("dog")


@pytest.mark.parametrize("make", [clip_word_tokenizer, t5_word_tokenizer])
def test_every_grammar_word_is_one_token(make):
    tok = make(vocabulary())
    for w in vocabulary():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))


def test_renderer_is_deterministic_and_shows_the_scene():
    a = render(Scene("heart", "red", "solid", "white"), seed=3)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(Scene("heart", "red", "solid", "white"), seed=3))
    assert not np.array_equal(a, render(Scene("heart", "red", "solid", "white"), seed=4))
    center = a[12:20, 12:20].reshape(-1, 3).mean(0)
    assert center[0] > 150 and center[1] < 100  # red object in the middle
    empty = render(Scene(None, "red", "solid", "black"), seed=3)
    assert empty.max() < 60


def test_suite_prompts_are_fixed_and_complete():
    cases = object_prompts("circle", n=6, n_locality=2)
    assert cases == object_prompts("circle", n=6, n_locality=2)
    by_set = {s: [c for c in cases if c.set == s] for s in SETS}
    assert all(len(by_set[s]) == 6 for s in SETS[:-1]) and len(by_set["locality"]) == 2 * 5
    assert all(c.prompt == "an image of a circle" for c in by_set["simple"])
    assert all("circle" in c.prompt for c in by_set["paraphrase"])
    syn = object_by_name("circle").synonyms
    assert all(any(s in c.prompt for s in syn) and "circle" not in c.prompt for c in by_set["synonym"])
    assert all(c.label != "circle" for c in by_set["locality"])
    assert len({c.seed for c in cases if c.set != "locality"}) == 24


class _Oracle:
    """A stand-in detector that sees a fixed answer per image."""

    name, threshold = "oracle", "argmax"

    def __init__(self, objects, colors):
        import torch

        from erasekit.toyworld.detector import HEADS

        self.probs = {
            "object": torch.nn.functional.one_hot(
                torch.tensor([HEADS["object"].index(o) for o in objects]), len(HEADS["object"])
            ).float(),
            "color": torch.nn.functional.one_hot(
                torch.tensor([HEADS["color"].index(c) for c in colors]), len(HEADS["color"])
            ).float(),
        }

    def classify(self, images):
        return self.probs


def test_suite_scores_follow_the_receler_definitions():
    import torch

    cases = object_prompts("square", n=4, n_locality=2)
    # erased everywhere for the concept, intact elsewhere; one locality image wrong
    objects = ["none" if c.label == "square" else c.label for c in cases]
    objects[-1] = "none"
    colors = [c.extra["color"] or "red" for c in cases]
    res = score_cases(cases, torch.zeros(len(cases), 3, 32, 32), _Oracle(objects, colors), "square")
    assert res.acc_e == 0.0 and res.acc_r == 0.0
    assert res.acc_l == pytest.approx(100 * 9 / 10)
    assert res.h == pytest.approx(harmonic_h(0, 0, 90))
    assert res.color_accuracy == 100.0


def test_harmonic_mean():
    assert harmonic_h(0, 0, 100) == pytest.approx(100)
    assert harmonic_h(14.9, 17.6, 82.1) == pytest.approx(83.1, abs=0.2)  # Receler's CIFAR-10 row
    assert harmonic_h(100, 0, 100) == 0.0

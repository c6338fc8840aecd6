"""The toy world's concepts and caption grammar.

Six object concepts (shapes), each with synonyms and indirect mentions (a word that implies the
shape without naming it, the way I2P prompts imply nudity), five colours, two textures and three
backgrounds. Captions come from templates; a set of held-out templates (new word orders and
filler words, built only from words the training captions use) never appears in training, so
robustness is measured on phrasings the model never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectConcept:
    name: str
    synonyms: tuple[str, ...]
    indirect: tuple[str, ...]


OBJECTS: tuple[ObjectConcept, ...] = (
    ObjectConcept("circle", ("disc", "disk", "orb", "round shape"), ("coin", "wheel", "button")),
    ObjectConcept("square", ("box", "block", "tile", "quadrate"), ("window pane", "chess field")),
    ObjectConcept("triangle", ("trigon", "wedge", "pyramid", "three sided shape"), ("warning sign", "pizza slice")),
    ObjectConcept("star", ("pentagram", "starburst", "five pointed shape"), ("sheriff badge", "starfish")),
    ObjectConcept("heart", ("valentine", "love heart", "cardioid"), ("love symbol", "romance emblem")),
    ObjectConcept("cross", ("plus", "plus sign", "cross mark"), ("hospital sign", "first aid mark")),
)
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "filled"),
    "striped": ("striped", "stripy", "lined"),
}
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")

OBJECT_NAMES = tuple(o.name for o in OBJECTS)
TEXTURE_NAMES = tuple(TEXTURES)
# The attributes an object is drawn with, by kind: the values (canonical names) of each. Their
# kinds are the detector's heads of the same names.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"texture": TEXTURE_NAMES, "color": COLORS}

# {a} is the article agreeing with the word after it; {obj} any name of the object.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{a} {color} {obj}",
    "{a} {color} {texture} {obj}",
    "{a} {color} {obj} on a {bg} background",
    "an image of {a} {obj}",
    "an image of {a} {color} {obj}",
    "a photo of {a} {texture} {color} {obj}",
    "a picture showing {a} {color} {obj}",
    "{obj}, {color}, {texture}, {bg} background",
    "there is {a} {color} {obj} in the middle",
    "{a} {obj} that is {color}",
    "a drawing of {a} {obj} colored {color} with a {bg} background",
    "look, {a} {texture} {obj}",
    "here is a simple {color} {obj}",
    "this is {a} {obj} on {bg}",
    "the {color} {obj}",
    "it is {a} {obj}, the color of it is {color}",
    "{a} {obj}",
    "{a} {texture} {obj} in {color} on a {bg} background",
    "{a} {texture} {obj} and a {bg} background",
    "{a} {color} {obj} at the center of the picture.",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "here is {a} {obj} and it is {color}",
    "look at the {color} {obj} in this picture",
    "this image is showing {a} {obj} colored {color}",
    "{a} {obj}. the color is {color}",
    "the {obj} in the drawing is {color}",
    "on a {bg} background there is {a} {color} {obj}",
)
SIMPLE_TEMPLATE = "an image of {a} {obj}"
# One fixed word order with every attribute in it: the captions of the curriculum's first stage.
CANONICAL_TEMPLATE = "{a} {color} {obj} on a {bg} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_by_name(name: str) -> ObjectConcept:
    """The object concept called ``name``; ValueError listing the known ones otherwise."""
    for o in OBJECTS:
        if o.name == name:
            return o
    raise ValueError(f"unknown toy-world object {name!r}; known objects: {', '.join(OBJECT_NAMES)}")


def attribute_kind(value: str) -> str:
    """The kind ("texture" or "color") of attribute value ``value`` ("striped", "red");
    ValueError listing the known values otherwise."""
    for kind, values in ATTRIBUTES.items():
        if value in values:
            return kind
    known = [v for values in ATTRIBUTES.values() for v in values]
    raise ValueError(f"unknown toy-world attribute {value!r}; known attributes: {', '.join(known)}")


def attribute_words(value: str) -> tuple[str, ...]:
    """Every word that names attribute ``value``, its own name first: a texture's synonyms
    ("striped", "stripy", "lined"); a colour has only its name."""
    if attribute_kind(value) == "texture":
        return TEXTURES[value]
    return (value,)


def fill(template: str, obj: str, color: str, texture: str, bg: str) -> str:
    """Fill ``template`` with surface words; articles agree with the following word."""
    text = template
    for key, val in (("{color}", color), ("{texture}", texture), ("{obj}", obj), ("{bg}", bg)):
        text = text.replace(key, val)
    # resolve each {a} from the word that follows it
    parts = text.split("{a} ")
    out = parts[0]
    for p in parts[1:]:
        out += article(p) + " " + p
    return out


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the text encoders' vocabulary)."""
    words: set[str] = {"a", "an"}
    for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        for w in t.replace(",", " , ").replace(".", " . ").split():
            if not w.startswith("{"):
                words.add(w)
    for o in OBJECTS:
        for phrase in (o.name,) + o.synonyms + o.indirect:
            words.update(phrase.split())
    words.update(COLORS)
    words.update(BACKGROUNDS)
    for ts in TEXTURES.values():
        words.update(ts)
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``object`` None means an empty background."""

    object: str | None
    color: str
    texture: str
    background: str


def concept_phrases(name: str) -> tuple[str, ...]:
    """Every phrase that names object ``name``: its own name, its synonyms, its indirect mentions."""
    o = object_by_name(name)
    return (o.name, *o.synonyms, *o.indirect)


def mentions(caption: str, name: str) -> list[str]:
    """The phrases of object ``name`` that ``caption`` holds as whole words (case-insensitive)."""
    words = " " + " ".join(caption.lower().replace(",", " ").replace(".", " ").split()) + " "
    return [p for p in concept_phrases(name) if f" {p} " in words]


def sample_scene(rng: random.Random, empty_prob: float = 0.0, objects: tuple[str, ...] = OBJECT_NAMES) -> Scene:
    """A random scene whose object is one of ``objects`` (all six by default)."""
    obj = None if rng.random() < empty_prob else rng.choice(objects)
    return Scene(obj, rng.choice(COLORS), rng.choice(TEXTURE_NAMES), rng.choice(BACKGROUNDS))


def training_caption(scene: Scene, rng: random.Random) -> str:
    """A random training caption for ``scene``: the object named by its canonical name (50%),
    a synonym (30%) or an indirect mention (20%), in a random training template."""
    assert scene.object is not None
    concept = object_by_name(scene.object)
    r = rng.random()
    if r < 0.5:
        obj = concept.name
    elif r < 0.8:
        obj = rng.choice(concept.synonyms)
    else:
        obj = rng.choice(concept.indirect)
    tex = rng.choice(TEXTURES[scene.texture])
    return fill(rng.choice(TRAIN_TEMPLATES), obj, scene.color, tex, scene.background)


def canonical_caption(scene: Scene) -> str:
    """The scene in the canonical template, the object by its own name: the same word order
    every time, so a small denoiser first learns where the object word is."""
    assert scene.object is not None
    return fill(CANONICAL_TEMPLATE, scene.object, scene.color, scene.texture, scene.background)

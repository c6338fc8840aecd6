"""The toy world's lexicon, registered as ``toyworld``: its grammar's synonyms, and the other
objects (and attributes) as irrelevant concepts. ``lexicon="auto"`` picks it for the toy world's
own pipelines and concepts, objects and attribute values alike (:func:`claims`)."""

from __future__ import annotations

from pathlib import Path

from ..lexicon import Lexicon, check_tier, unique_words


def is_toy_pipeline(pipe) -> bool:
    """Whether ``pipe`` was loaded from the toy world's shipped weights."""
    from . import weights_dir

    try:
        source = Path(str(getattr(pipe, "name_or_path", "") or "")).resolve()
        return bool(str(source)) and source.is_relative_to(weights_dir().resolve())
    except (OSError, ValueError):
        return False


def is_toy_concept(concept: str) -> bool:
    """Whether ``concept`` is one of the grammar's objects or attribute values ("striped", "red")."""
    from .grammar import ATTRIBUTES, OBJECT_NAMES

    return concept in OBJECT_NAMES or any(concept in values for values in ATTRIBUTES.values())


def claims(pipe, concept: str) -> bool:
    """Whether ``lexicon="auto"`` uses the toy world's lexicon: a toy-world object or attribute
    value on a pipeline loaded from the toy world's shipped weights."""
    return is_toy_concept(concept) and is_toy_pipeline(pipe)


class ToyWorldLexicon(Lexicon):
    """The toy world's grammar (:mod:`erasekit.toyworld.grammar`), for its objects and its
    attribute values (textures, colours).

    Objects. Synonyms: the object's synonyms (indirect mentions are not synonyms:
    :meth:`indirect`). The toy world has one semantic category of objects (shapes), so the tiers
    grade how the OTHER objects are named: close = their names, mid = their synonyms, far = their
    indirect mentions, unrelated = empty backgrounds ("white background", ...), which show no
    object at all.

    Attribute values ("striped", "red"). Synonyms: the grammar's words for the value ("stripy",
    "lined"; a colour has none). Tiers: close = the other values of the same attribute, by every
    name ("solid", "plain", "filled"; the other colours), mid = the values of the other attribute
    (the colours for a texture, the textures for a colour), far = the objects (what an attribute
    erasure must keep), unrelated = empty backgrounds.
    """

    name = "toyworld"

    def _object(self, concept: str):
        from .grammar import ATTRIBUTES, object_by_name

        try:
            return object_by_name(concept)
        except ValueError as err:  # it names the known objects; add the attribute values
            values = [v for vs in ATTRIBUTES.values() for v in vs]
            raise ValueError(f"{err}; known attribute values: {', '.join(values)}") from None

    def synonyms(self, concept: str) -> list[str]:
        """The object's synonyms, or the attribute value's other words, in the grammar."""
        from .grammar import attribute_words

        if self._attribute(concept):
            return unique_words(attribute_words(concept), exclude=[concept])
        return unique_words(self._object(concept).synonyms, exclude=[concept])

    def indirect(self, concept: str) -> list[str]:
        """Words that imply the object without naming it (the grammar's indirect mentions); an
        attribute value has none."""
        if self._attribute(concept):
            return []
        return list(self._object(concept).indirect)

    def irrelevant(self, concept: str, tier: str = "far", n: int | None = 10) -> list[str]:
        """The other objects, or attribute values, named as ``tier`` says (see the class), or
        empty backgrounds."""
        from .grammar import BACKGROUNDS, OBJECTS

        check_tier(tier)
        kind = self._attribute(concept)
        if kind:
            words = self._attribute_tier(concept, kind, tier)
        else:
            self._object(concept)
            others = [o for o in OBJECTS if o.name != concept]
            if tier == "close":
                words = [o.name for o in others]
            elif tier == "mid":
                words = [s for o in others for s in o.synonyms]
            elif tier == "far":
                words = [s for o in others for s in o.indirect]
            else:
                words = [f"{bg} background" for bg in BACKGROUNDS]
        words = unique_words(words, exclude=[concept, *self.synonyms(concept)])
        return words if n is None else words[:n]

    @staticmethod
    def _attribute(concept: str) -> str | None:
        """The attribute kind of ``concept`` ("texture", "color"); None for anything else."""
        from .grammar import ATTRIBUTES

        return next((kind for kind, values in ATTRIBUTES.items() if concept in values), None)

    @staticmethod
    def _attribute_tier(concept: str, kind: str, tier: str) -> list[str]:
        from .grammar import ATTRIBUTES, BACKGROUNDS, OBJECT_NAMES, attribute_words

        if tier == "close":
            return [w for v in ATTRIBUTES[kind] if v != concept for w in attribute_words(v)]
        if tier == "mid":
            return [v for k, values in ATTRIBUTES.items() if k != kind for v in values]
        if tier == "far":
            return list(OBJECT_NAMES)
        return [f"{bg} background" for bg in BACKGROUNDS]

"""The toy world's lexicon, registered as ``toyworld``: its grammar's synonyms, and the other
objects as irrelevant concepts. ``lexicon="auto"`` picks it for the toy world's own pipelines and
objects (:func:`claims`)."""

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


def claims(pipe, concept: str) -> bool:
    """Whether ``lexicon="auto"`` uses the toy world's lexicon: a toy-world object on a pipeline
    loaded from the toy world's shipped weights."""
    from .grammar import OBJECT_NAMES

    return concept in OBJECT_NAMES and is_toy_pipeline(pipe)


class ToyWorldLexicon(Lexicon):
    """The toy world's grammar (:mod:`erasekit.toyworld.grammar`).

    Synonyms: the object's synonyms (indirect mentions are not synonyms: :meth:`indirect`).
    The toy world has one semantic category (shapes), so the tiers grade how the OTHER objects
    are named: close = their names, mid = their synonyms, far = their indirect mentions,
    unrelated = empty backgrounds ("white background", ...), which show no object at all.
    """

    name = "toyworld"

    def _object(self, concept: str):
        from .grammar import object_by_name

        return object_by_name(concept)  # ValueError naming the known objects

    def synonyms(self, concept: str) -> list[str]:
        """The object's synonyms in the grammar."""
        return unique_words(self._object(concept).synonyms, exclude=[concept])

    def indirect(self, concept: str) -> list[str]:
        """Words that imply the object without naming it (the grammar's indirect mentions)."""
        return list(self._object(concept).indirect)

    def irrelevant(self, concept: str, tier: str = "far", n: int | None = 10) -> list[str]:
        """The other objects, named as ``tier`` says (see the class), or empty backgrounds."""
        from .grammar import BACKGROUNDS, OBJECTS

        check_tier(tier)
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

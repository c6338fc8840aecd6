"""Named plug-in points: detectors, suites, lexicons and pipeline names.

A :class:`Registry` maps a name to a factory, given either as a callable or as a lazy
``"module:attribute"`` reference that is imported on first use, so registering costs no import.
The core registers its own entries here (below); a plug-in registers its own on import (the
toy world does so in :mod:`erasekit.toyworld`, which the top-level package imports).

- :data:`DETECTORS`: name -> ``factory(model=None, threshold=None, **options)`` returning a
  detector (:mod:`erasekit.evaluation.detectors`);
- :data:`SUITES`: name -> a :class:`erasekit.evaluation.suites.Suite` subclass;
- :data:`LEXICONS`: name -> a :class:`erasekit.lexicon.Lexicon` class; an entry's ``auto`` info
  (a reference to ``claims(pipe, concept) -> bool``) lets ``lexicon="auto"`` pick it;
- :data:`PIPELINES`: a pipeline name (``toy:sd``) -> ``resolve(name) -> folder or hub id``, so
  that :func:`erasekit.models.load_pipeline` takes the name in place of a folder.

This module imports nothing heavy and, from erasekit, only :mod:`erasekit.errors`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import UnknownName


def resolve_reference(ref: str | Callable) -> Any:
    """The object a ``"module:attribute"`` reference names (imported now); a callable as it is."""
    if not isinstance(ref, str):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a reference is 'module:attribute', got {ref!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry:
    """Names of one kind (``kind``: "detector", "suite", ...) -> factories, resolved lazily."""

    def __init__(self, kind: str):
        self.kind = kind
        self._refs: dict[str, str | Callable] = {}
        self._info: dict[str, dict] = {}

    def register(self, name: str, ref: str | Callable, replace: bool = False, **info: Any) -> None:
        """Register ``name`` -> ``ref`` (a callable or a ``"module:attribute"`` string) with
        optional ``info`` (plain values or references the caller resolves). Registering the same
        reference again is a no-op; another one for a known name needs ``replace=True``."""
        if not isinstance(ref, str) and not callable(ref):
            raise TypeError(f"a {self.kind} is registered as a callable or a 'module:attribute' string, got {ref!r}")
        if name in self._refs and self._refs[name] != ref and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered (as {self._refs[name]!r})")
        self._refs[name] = ref
        self._info[name] = dict(info)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (unknown names are an error)."""
        self.check(name)
        del self._refs[name], self._info[name]

    def check(self, name: str) -> str:
        """``name`` if registered, else :class:`~erasekit.errors.UnknownName` (a ValueError)
        "unknown <kind> 'name'; known: ..."."""
        if name not in self._refs:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self._refs) or 'none'}")
        return name

    def get(self, name: str) -> Any:
        """The factory registered as ``name`` (its module imported now)."""
        return resolve_reference(self._refs[self.check(name)])

    def info(self, name: str) -> dict:
        """The extra information registered with ``name``."""
        return dict(self._info[self.check(name)])

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._refs)

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._refs))

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._refs)})"


DETECTORS = Registry("detector")
SUITES = Registry("suite")
LEXICONS = Registry("lexicon")
PIPELINES = Registry("pipeline name")

# The core's own entries; plug-ins add theirs when imported.
DETECTORS.register("nudenet", "erasekit.evaluation.nudenet:nudenet_detector")
DETECTORS.register("clip", "erasekit.evaluation.clip:clip_detector")
DETECTORS.register("q16", "erasekit.evaluation.clip:q16_detector")
DETECTORS.register("grounding-dino", "erasekit.evaluation.grounding_dino:grounding_dino_detector")
SUITES.register("objects", "erasekit.evaluation.suites:ObjectSuite")
SUITES.register("i2p-nudity", "erasekit.evaluation.suites:I2PSuite")
SUITES.register("coco", "erasekit.evaluation.suites:CocoSuite")
SUITES.register("styles", "erasekit.evaluation.styles:StyleSuite")
LEXICONS.register("wordnet", "erasekit.lexicon:WordNetLexicon")

"""The toy world: a tiny text-to-image world with real synonyms, paraphrases and indirect
mentions, two trained pipelines (SD-style and Flux-style) and a ground-truth detector.

It is a plug-in: it depends on the core (erasekit.evaluation, erasekit.models, erasekit.lexicon)
and the core never imports it. Importing this package (the top-level ``erasekit`` package does)
registers, by lazy reference, so at no import cost (see :mod:`erasekit.registry`):

- detector ``toy``: the classifier trained on the renderer's ground truth (``detector.py``);
- suite ``toy-objects``: the object-erasure suite with Receler's definitions (``suite.py``);
- suites ``toy-styles`` and ``toy-colors``: erase a texture ("striped") or a colour ("red") and
  keep the content (``attributes.py``);
- lexicon ``toyworld``: the grammar's synonyms and other objects and attributes, which
  ``lexicon="auto"`` picks for the toy pipelines and the grammar's concepts (``lexicon.py``);
- pipeline names ``toy:sd`` and ``toy:flux``: the shipped pipelines, for ``load_pipeline`` and
  every ``--model`` option.

The rest: ``grammar.py`` (objects, colours, captions), ``render.py`` (ground-truth images),
``architectures.py`` and ``train.py`` (``erasekit toyworld train``), ``weights/``.
"""

from __future__ import annotations

from pathlib import Path

from ..registry import DETECTORS, LEXICONS, PIPELINES, SUITES

FAMILIES = ("sd", "flux")


def weights_dir() -> Path:
    """Folder of the shipped toy-world weights (pipelines ``sd`` and ``flux``, ``detector``)."""
    return Path(__file__).parent / "weights"


def pipeline_path(family: str) -> Path:
    """Folder of the shipped toy pipeline of ``family`` ("sd" or "flux")."""
    if family not in FAMILIES:
        raise ValueError(f"no toy-world pipeline for family {family!r}: expected 'sd' or 'flux'")
    path = weights_dir() / family
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the toy-world {family} pipeline is missing at {path}")
    return path


def toy_pipeline(name: str) -> Path:
    """The folder a registered toy pipeline name ("toy:sd", "toy:flux") stands for."""
    return pipeline_path(name.removeprefix("toy:"))


DETECTORS.register("toy", "erasekit.toyworld.detector:toy_detector")
SUITES.register("toy-objects", "erasekit.toyworld.suite:ToyObjectSuite")
SUITES.register("toy-styles", "erasekit.toyworld.attributes:ToyStyleSuite")
SUITES.register("toy-colors", "erasekit.toyworld.attributes:ToyColorSuite")
LEXICONS.register("toyworld", "erasekit.toyworld.lexicon:ToyWorldLexicon", auto="erasekit.toyworld.lexicon:claims")
for _family in FAMILIES:
    PIPELINES.register(f"toy:{_family}", "erasekit.toyworld:toy_pipeline")
del _family

"""The toy world: a tiny text-to-image world with real synonyms, paraphrases and indirect
mentions, two trained pipelines (SD-style and Flux-style) and a ground-truth detector."""

from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """Folder of the shipped toy-world weights (pipelines ``sd`` and ``flux``, ``detector``)."""
    return Path(__file__).parent / "weights"


def pipeline_path(family: str) -> Path:
    """Folder of the shipped toy pipeline of ``family`` ("sd" or "flux")."""
    if family not in ("sd", "flux"):
        raise ValueError(f"no toy-world pipeline for family {family!r}: expected 'sd' or 'flux'")
    path = weights_dir() / family
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the toy-world {family} pipeline is missing at {path}")
    return path

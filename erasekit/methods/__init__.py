"""Erasure methods: one module each, a config dataclass plus ``fit(pipe, concept, config) -> Edit``
and ``attach(adapter, edit, scale)``."""

from __future__ import annotations

import importlib

METHODS = (
    "receler",
    "eraseanything",
    "esd",
    "uce",
    "keyword_zeroing",
    "sld",
)


def method_module(name: str):
    """The module implementing method ``name``; ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown erasure method {name!r}; known: {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")


def erase(pipe, concept: str, method: str = "receler", config=None, checkpoint_dir=None, progress: bool = True):
    """Train ``method`` to remove ``concept`` from ``pipe``; returns the Edit (not applied).

    ``config``: the method's config dataclass (default: the paper's hyper-parameters).
    """
    return method_module(method).fit(pipe, concept, config, checkpoint_dir=checkpoint_dir, progress=progress)


def make_config(method: str, preset: str = "paper", overrides: dict[str, str] | None = None):
    """The config of ``method`` from a named preset, with ``overrides`` (field -> text) parsed
    to each field's type. Unknown presets or fields are errors naming the known ones."""
    import dataclasses

    module = method_module(method)
    if preset not in module.PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {method}; known: {', '.join(module.PRESETS)}")
    config = module.PRESETS[preset]()
    types = {f.name: f.type for f in dataclasses.fields(config)}
    changes = {}
    for key, text in (overrides or {}).items():
        if key not in types:
            raise ValueError(f"{method} has no setting {key!r}; settings: {', '.join(types)}")
        changes[key] = _parse_value(text, getattr(config, key))
    return dataclasses.replace(config, **changes)


def split_list(text: str, sep: str = ",") -> list[str]:
    """The parts of a list-valued text setting, stripped, empty ones dropped: "a, b," -> ["a", "b"]."""
    return [part.strip() for part in text.split(sep) if part.strip()]


def _parse_value(text: str, current):
    """``text`` as the setting's type: bool, the string itself for a text setting, else
    None / int / float / the string (for settings whose default is None)."""
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, str):
        return text
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text

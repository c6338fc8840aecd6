"""The method registry: name -> (config class, presets, fit, variants).

A method module ends with one line, ``register_method(NAME, Config, PRESETS, fit)``.
The built-in methods are imported on first use of their name, so looking one up costs only its
own import. A *variant* is a second name for a method with some settings fixed (ESD's "esd-x" /
"esd-u": ESD with ``group`` set); every entry point that takes a method name takes a variant.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .config import ConfigError, MethodConfig, show_value

logger = logging.getLogger(__name__)

# The methods shipped with erasekit, in the order they are listed (modules of this package).
BUILTIN_METHODS = (
    "receler",
    "eraseanything",
    "esd",
    "uce",
    "keyword_zeroing",
    "sld",
    "mace",
    "rece",
    "advunlearn",
    "safree",
)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a method registers: its config class, named presets (each a callable returning a
    config), ``fit(pipe, concept, config, checkpoint_dir=None, progress=True) -> Edit``, and
    variants (name -> settings it fixes, as text). How an Edit attaches is its edit kind's
    business (:mod:`erasekit.edits`), not the method's."""

    name: str
    config_class: type[MethodConfig]
    presets: Mapping[str, Callable[[], MethodConfig]]
    fit: Callable[..., Any]
    variants: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    #: ``(model, config) -> int``: parameters ``fit`` trains (or rewrites) on a pipeline or an
    #: adapter, without training (None: nothing, an inference-time method).
    parameter_count: Callable[[Any, MethodConfig], int] | None = None
    #: ``(config, family, concept) -> int``: the iterations ``fit`` runs (None: no training loop).
    iteration_count: Callable[[MethodConfig, str, str], int] | None = None

    def trainable_parameters(self, model, config: MethodConfig) -> int:
        """Parameters this method trains or rewrites on ``model`` (a pipeline or a
        :class:`~erasekit.models.FamilyAdapter`, a meta-device one included) with ``config``; no
        training and no real tensors. 0 for a method that changes no weights."""
        return 0 if self.parameter_count is None else int(self.parameter_count(model, config))

    def training_iterations(self, config: MethodConfig, family: str, concept: str) -> int:
        """Training iterations of ``fit`` with ``config`` on a ``family`` model for ``concept``
        (defaults resolved as ``fit`` resolves them); 0 for a method without a training loop."""
        return 0 if self.iteration_count is None else int(self.iteration_count(config, family, concept))

    @property
    def module(self):
        """The module that defines ``fit``."""
        return sys.modules[self.fit.__module__]

    @property
    def summary(self) -> str:
        """The first sentence of the module's docstring."""
        doc = " ".join((self.module.__doc__ or "").split())
        return doc.split(". ")[0].rstrip(".") + "." if doc else self.name


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_class: type[MethodConfig],
    presets: Mapping[str, Callable[[], MethodConfig]],
    fit: Callable[..., Any],
    variants: Mapping[str, Mapping[str, str]] | None = None,
    trainable_parameters: Callable[[Any, MethodConfig], int] | None = None,
    iterations: Callable[[MethodConfig, str, str], int] | None = None,
) -> MethodSpec:
    """Add method ``name`` to the registry; every preset is built (and so checked) now.

    ``variants``: other names for the method with settings fixed, e.g. ``{"esd-u": {"group":
    "esd-u"}}``. ``trainable_parameters(model, config)``: the parameters ``fit`` trains, counted
    without training (:meth:`MethodSpec.trainable_parameters`); ``iterations(config, family,
    concept)``: the iterations it runs (:meth:`MethodSpec.training_iterations`); both omitted
    for a method that trains nothing. Registering a name again from the same module replaces
    the entry (a reload).
    """
    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)):
        raise TypeError(f"{name}: the config class must derive from MethodConfig, got {config_class!r}")
    old = _REGISTRY.get(name)
    if old is not None and old.fit.__module__ != fit.__module__:
        raise ValueError(f"erasure method {name!r} is already registered by {old.fit.__module__}")
    taken = {v for n, s in _REGISTRY.items() if n != name for v in (n, *s.variants)}
    clash = taken & {name, *(variants or {})}
    if clash:
        raise ValueError(f"erasure method names {sorted(clash)} are already taken")
    config_class.method_name = name
    config_class.field_specs()  # every field has a type and help text
    fixed = {k: dict(v) for k, v in (variants or {}).items()}
    spec = MethodSpec(name, config_class, dict(presets), fit, fixed, trainable_parameters, iterations)
    if not spec.presets:
        raise ValueError(f"{name}: no presets")
    for preset, make in spec.presets.items():
        config = make()
        if not isinstance(config, config_class):
            got = type(config).__name__
            raise TypeError(f"{name}: preset {preset!r} gives a {got}, not a {config_class.__name__}")
    for settings in spec.variants.values():
        config_class.with_settings(config_class(), dict(settings))  # the fixed settings are valid
    _REGISTRY[name] = spec
    return spec


def _load(name: str) -> None:
    if name in BUILTIN_METHODS and name not in _REGISTRY:
        importlib.import_module(f"{__package__}.{name}")


def method_names() -> tuple[str, ...]:
    """The registered methods: the built-in ones first, then others in registration order."""
    return BUILTIN_METHODS + tuple(n for n in _REGISTRY if n not in BUILTIN_METHODS)


def method_rows() -> dict[str, tuple[str, dict[str, str]]]:
    """Every name a method can be run under -> (method, settings it fixes): a method with
    variants is listed as its variants only (ESD: "esd-x", "esd-u"), others as themselves."""
    rows: dict[str, tuple[str, dict[str, str]]] = {}
    for name in method_names():
        spec = get_method(name)
        for row, fixed in (spec.variants or {name: {}}).items():
            rows[row] = (name, dict(fixed))
    return rows


def _known() -> str:
    names = []
    for name in method_names():
        names += [name, *get_method(name).variants]
    return ", ".join(names)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (not a variant); ConfigError listing the known names otherwise."""
    _load(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown erasure method {name!r}; known: {_known()}")
    return _REGISTRY[name]


def resolve_method(name: str) -> tuple[MethodSpec, dict[str, str]]:
    """(method, settings fixed by the name) of a method or variant name: "esd-u" -> (ESD, {"group": "esd-u"})."""
    if name in BUILTIN_METHODS or name in _REGISTRY:
        return get_method(name), {}
    for method in method_names():
        spec = get_method(method)
        if name in spec.variants:
            return spec, dict(spec.variants[name])
    raise ConfigError(f"unknown erasure method {name!r}; known: {_known()}")


def make_config(method: str, preset: str = "paper", overrides: Mapping[str, str] | None = None) -> MethodConfig:
    """The config of ``method`` (a method or variant name) from a named preset, with
    ``overrides`` (field -> ``--set`` text) parsed strictly to each field's type and checked.

    Unknown methods, presets or fields, bad values, and an override that contradicts a
    variant's fixed setting are :class:`ConfigError` naming what is known / allowed.
    """
    spec, fixed = resolve_method(method)
    if preset not in spec.presets:
        raise ConfigError(f"unknown preset {preset!r} for {method}; known: {', '.join(spec.presets)}")
    overrides = dict(overrides or {})
    cls = spec.config_class
    for key, text in fixed.items():
        if key in overrides and cls.parse_setting(key, overrides[key]) != cls.parse_setting(key, text):
            raise ConfigError(
                f"{method}: {key} is fixed to {text!r} by the method name, got {overrides[key]!r}; "
                f"use --method {spec.name} to choose {key} freely"
            )
    return cls.with_settings(spec.presets[preset](), fixed | overrides)


def erase(pipe, concept: str, method: str = "receler", config=None, checkpoint_dir=None, progress: bool = True):
    """Train ``method`` (a method or variant name) to remove ``concept`` from ``pipe``; returns
    the Edit (not applied).

    ``config``: the method's config (default: its class defaults, the paper's hyper-parameters,
    with a variant's fixed settings). It is checked again here, and must agree with a variant.
    """
    spec, fixed = resolve_method(method)
    cls = spec.config_class
    if config is None:
        config = cls.with_settings(cls(), fixed)
    if not isinstance(config, cls):
        raise ConfigError(f"{method}: the config must be of type {cls.__name__}, got {type(config).__name__}")
    config.validate()  # a config's fields may have been assigned since it was made
    for key, text in fixed.items():
        if getattr(config, key) != cls.parse_setting(key, text):
            raise ConfigError(
                f"{method}: {key} must be {text!r} for this method name, got {show_value(getattr(config, key))}"
            )
    _warn_unfamiliar(pipe, concept)
    return spec.fit(pipe, concept, config, checkpoint_dir=checkpoint_dir, progress=progress)


def _warn_unfamiliar(pipe, concept: str) -> None:
    """Warn (log) when the text encoder does not know the concept's words as words."""
    from ..models import adapter_for

    try:
        unfamiliar = adapter_for(pipe).unfamiliar_words(concept)
    except Exception:  # a pipeline without a tokenizer: nothing to say
        return
    for word, pieces in unfamiliar:
        logger.warning(
            "the text encoder splits %r into %d pieces (%s): it may not know this word, so an edit "
            "keyed on it may miss the concept; prefer a word the model knows",
            word,
            len(pieces),
            " ".join(pieces),
        )


def method_module(name: str):
    """The module implementing method ``name`` (or a variant's); ConfigError listing the known ones otherwise."""
    return resolve_method(name)[0].module


def method_help(name: str) -> str:
    """The settings of method ``name`` as text: each field's type and allowed values, its value
    in every preset, and its help (``erasekit erase --help-method NAME``)."""
    spec, fixed = resolve_method(name)
    cls = spec.config_class
    presets = {p: make_config(name, p) for p in spec.presets}
    lines = [f"{spec.name}: {spec.summary}"]
    if fixed:
        lines.append(f"{name} is {spec.name} with " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    if spec.variants and not fixed:
        lines.append(
            "variants: "
            + "; ".join(f"{v} ({', '.join(f'{k}={x}' for k, x in s.items())})" for v, s in spec.variants.items())
        )
    lines += [f"presets: {', '.join(presets)} (--preset NAME); change a setting with --set KEY=VALUE", ""]
    width = max(len(n) for n in cls.field_specs())
    for field_name, field_spec in cls.field_specs().items():
        lines.append(f"{field_name:{width}s}  {field_spec.type_name()}: {field_spec.expected()}")
        lines.append(f"{'':{width}s}    {field_spec.help}")
        values = "  ".join(f"{p}={show_value(getattr(c, field_name))}" for p, c in presets.items())
        lines.append(f"{'':{width}s}    {values}")
    return "\n".join(lines)

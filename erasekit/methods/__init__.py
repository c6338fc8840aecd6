"""Erasure methods: one module each (receler, eraseanything, esd, uce, keyword_zeroing, sld, mace, rece,
advunlearn, safree).

Architecture
------------
Registry (:mod:`.registry`). A method module defines a config class, ``PRESETS`` (preset name ->
callable returning a config; every method has "paper" and "fast"), ``fit(pipe, concept, config,
checkpoint_dir=None, progress=True) -> Edit`` (the Edit names its edit kind, which attaches it:
:mod:`erasekit.edits`; a method never attaches its result), and ends with one registration line::

    register_method(NAME, MyConfig, PRESETS, fit)

``register_method`` may also give *variants*, other names for the method with settings fixed
(ESD: ``variants={"esd-x": {"group": "esd-x"}, "esd-u": {"group": "esd-u"}}``); the bench's rows
and every entry point that takes a method name accept them. Built-in methods are imported on
first use of their name; :func:`method_names`, :func:`get_method`, :func:`resolve_method` look
them up (an unknown name is a ``ConfigError`` listing the known ones).

Config base (:mod:`.config`). Every config is a dataclass deriving from :class:`MethodConfig`;
each field is declared with :func:`setting` (its help text and rules: ranges, choices, list
items, templates) and typed by its annotation (int, float, bool, str, optionally ``| None``).
``__post_init__`` checks every field (types, finite numbers, ranges, choices) and the class's
cross-field :meth:`MethodConfig.check`; ``--set KEY=VALUE`` text is parsed strictly by
:meth:`MethodConfig.parse_setting`. Every failure is one ``ConfigError`` (a ``UserError`` and a
``ValueError``) with a one-line message naming the method, the field, the value and what is
allowed, so the command line refuses bad settings before loading any model.

Training-run helper (:mod:`.training`). The trained methods (Receler, ESD, EraseAnything, MACE) write
only their step; a :class:`~.training.TrainingRun` owns the rest: resume from the last checkpoint
(:mod:`.checkpoints`), a checkpoint every ``checkpoint_every`` iterations and at the end, the
progress bar, the loss history, wall time, and a check after every step that each loss and each
trained tensor is finite (else a one-line ``TrainingDiverged``, a ``UserError`` naming the
iteration and the setting to lower; nothing is written for that iteration). ``checkpoint.json``
records the method, the edit kind, the concept(s), the model's identity (a local folder's
contents hash, cached; a hub id and revision; or an in-memory pipeline's tensors hash) and the
settings; a checkpoint folder made for anything else is refused with a ``CheckpointMismatch``
naming the field. The Edit's metrics get ``train_seconds``, the method's final losses, the
rollout counts, ``iterations``, ``resumed_from`` and ``trainable_parameters``. The loss terms the
three share (the negative-guidance target, the frozen teacher's predictions, the prediction MSE,
attention features) live in :mod:`.losses`. Hooks (:mod:`.hooks`, ``with training_hooks(h):``)
let a benchmark observe iterations and rollouts, cap rollouts or stop early without patching a
method. A method that trains registers ``trainable_parameters(model, config)`` and
``iterations(config, family, concept)``: :meth:`MethodSpec.trainable_parameters` counts without
training (FLUX.1 on the meta device too).

Entry points: :func:`make_config` (preset + ``--set`` overrides), :func:`erase` (train and return
the Edit), :func:`method_help` (the text of ``erasekit erase --help-method NAME``).
"""

from __future__ import annotations

from .config import ConfigError, MethodConfig, setting
from .registry import (
    BUILTIN_METHODS,
    MethodSpec,
    erase,
    get_method,
    make_config,
    method_help,
    method_module,
    method_names,
    method_rows,
    register_method,
    resolve_method,
)

METHODS = BUILTIN_METHODS


def split_list(text: str, sep: str = ",") -> list[str]:
    """The parts of a list-valued text setting, stripped, empty ones dropped: "a, b," -> ["a", "b"]."""
    return [part.strip() for part in text.split(sep) if part.strip()]


def split_concepts(concept: str) -> list[str]:
    """The concepts of a methods' ``concept`` argument that erases several at once (UCE, RECE,
    MACE): separated by ";" when there is one (so a concept may hold a comma), else by ",":
    "car, dog" and "car; dog" -> ["car", "dog"]. ``ConfigError`` when none is left or one is
    given twice."""
    concepts = split_list(concept, ";" if ";" in concept else ",")
    if not concepts:
        raise ConfigError("no concept to erase")
    if len({c.lower() for c in concepts}) != len(concepts):
        raise ConfigError(f"a concept is given twice in {concept!r}")
    return concepts


__all__ = [
    "METHODS",
    "ConfigError",
    "MethodConfig",
    "MethodSpec",
    "erase",
    "get_method",
    "make_config",
    "method_help",
    "method_module",
    "method_names",
    "method_rows",
    "register_method",
    "resolve_method",
    "setting",
    "split_concepts",
    "split_list",
]

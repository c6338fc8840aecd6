"""The base of every method's config: a dataclass that checks every field when it is made.

A field is declared with :func:`setting` (a ``dataclasses.field`` whose metadata holds the help
text and the rules), its type comes from the annotation: ``int``, ``float``, ``bool``, ``str``,
or one of them ``| None``. :meth:`MethodConfig.__post_init__` checks each value against its type
(an int is not a bool, a float is finite) and its rules, then the config's own cross-field
:meth:`MethodConfig.check`; any failure is one :class:`ConfigError` whose one-line message names
the method, the field, the bad value and what is allowed. ``dataclasses.replace`` re-checks.

Metadata rules (all optional besides ``help``):

``low`` / ``high``: value >= low / <= high; ``above``: value > above;
``choices``: the value is one of these; ``sep``: the text is a list separated by ``sep``, and
then ``items`` restricts its parts and ``nonempty`` asks for at least one; ``template``: the
text is a ``str.format`` template whose only placeholder is ``{concept}``.

:meth:`MethodConfig.parse_setting` turns the text of ``--set KEY=VALUE`` into a field's value,
strictly: bools only from true/false/yes/no/on/off/1/0, ints only from digits, numbers never
nan or inf, ``none`` only for optional fields (text fields keep any text).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import ConfigError

__all__ = ["BOOL_WORDS", "ConfigError", "FieldSpec", "MethodConfig", "setting", "show_value"]

BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
RULES = frozenset({"help", "low", "high", "above", "choices", "sep", "items", "nonempty", "template"})
_BASE_TYPES = (bool, int, float, str)
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def setting(
    default: Any,
    help: str,  # shadows the builtin: the word every config library uses
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    choices: Sequence | None = None,
    sep: str | None = None,
    items: Sequence[str] | None = None,
    nonempty: bool = False,
    template: bool = False,
) -> Any:
    """A config field: ``dataclasses.field(default=default, metadata={"help": help, ...rules})``.

    Rules left at None / False are not recorded; see the module docstring for their meaning.
    """
    if items is not None and sep is None:
        raise TypeError("items= needs sep= (the list separator)")
    rules = {
        "low": low,
        "high": high,
        "above": above,
        "choices": tuple(choices) if choices is not None else None,
        "sep": sep,
        "items": tuple(items) if items is not None else None,
        "nonempty": nonempty or None,
        "template": template or None,
    }
    metadata = {"help": help} | {k: v for k, v in rules.items() if v is not None}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field of a config class as the checks and the help see it."""

    name: str
    type: type  # bool, int, float or str
    optional: bool  # None is allowed
    help: str
    rules: dict[str, Any]

    def expected(self) -> str:
        """What the field accepts, in words: "an integer >= 1, or none", "one of 'a', 'b'"."""
        r = self.rules
        if "choices" in r:
            text = "one of " + ", ".join(show_value(c) for c in r["choices"])
        elif self.type is bool:
            text = "true or false"
        elif self.type is str:
            if "sep" in r:
                among = f" among {', '.join(r['items'])}" if "items" in r else ""
                least = "at least one, " if r.get("nonempty") else ""
                text = f"{_SEP_NAMES.get(r['sep'], repr(r['sep']))}-separated items{among} ({least}text)"
            elif r.get("template"):
                text = "text whose only placeholder is {concept}"
            else:
                text = "non-empty text" if r.get("nonempty") else "text"
        else:
            text = "an integer" if self.type is int else "a finite number"
            bounds = []
            if "above" in r:
                bounds.append(f"> {show_value(r['above'])}")
            if "low" in r and "high" in r:
                bounds = [f"in [{show_value(r['low'])}, {show_value(r['high'])}]"]
            elif "low" in r:
                bounds.append(f">= {show_value(r['low'])}")
            elif "high" in r:
                bounds.append(f"<= {show_value(r['high'])}")
            text += "".join(" " + b for b in bounds)
        if self.type is str and "sep" in r and r.get("template"):
            text += ", each a template with {concept}"
        return text + (", or none" if self.optional else "")

    def type_name(self) -> str:
        """The field's type as the help shows it: "int", "float | none", ..."""
        return self.type.__name__ + (" | none" if self.optional else "")

    def problem(self, value: Any) -> bool:
        """True if ``value`` breaks the field's type or rules."""
        if value is None:
            return not self.optional
        if self.type is bool:
            return not isinstance(value, bool)
        if self.type is str:
            return not isinstance(value, str) or self._text_problem(value)
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.type is float else int):
            return True
        if not math.isfinite(value):
            return True
        r = self.rules
        return (
            ("low" in r and value < r["low"])
            or ("high" in r and value > r["high"])
            or ("above" in r and value <= r["above"])
            or ("choices" in r and value not in r["choices"])
        )

    def _text_problem(self, value: str) -> bool:
        r = self.rules
        if "choices" in r:
            return value not in r["choices"]
        if "sep" in r:
            parts = [p.strip() for p in value.split(r["sep"]) if p.strip()]
            if r.get("nonempty") and not parts:
                return True
            if "items" in r and any(p not in r["items"] for p in parts):
                return True
        elif r.get("nonempty") and not value.strip():
            return True
        if r.get("template"):
            try:
                value.format(concept="x")
            except (KeyError, IndexError, ValueError):
                return True
        return False


_SEP_NAMES = {",": "comma", ";": "semicolon", "|": "bar"}


def show_value(value: Any) -> str:
    """A value as the help and the errors show it: none, true / false, 'text', 1e-05."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _field_type(annotation: Any, where: str) -> tuple[type, bool]:
    """(base type, optional) of an annotation among int, float, bool, str and ``X | None``."""
    if annotation in _BASE_TYPES:
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2 and args[0] in _BASE_TYPES:
            return args[0], True
    raise TypeError(f"{where}: config fields are int, float, bool or str (optionally | None), got {annotation!r}")


@dataclasses.dataclass
class MethodConfig:
    """Base of the methods' configs: every field declared with :func:`setting` is checked in
    ``__post_init__`` (see the module docstring). ``method_name`` (set when the method is
    registered) names the method in error messages."""

    method_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Check every field; raises :class:`ConfigError` on the first bad one."""
        self.validate()

    @classmethod
    def field_specs(cls) -> dict[str, FieldSpec]:
        """Field name -> :class:`FieldSpec`: the class's own fields, then its bases' (cached per class)."""
        cached = cls.__dict__.get("_field_specs")
        if cached is not None:
            return cached
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # The class's own fields first, then those of its bases (most derived first).
        order = dict.fromkeys(n for k in cls.__mro__ for n in k.__dict__.get("__annotations__", {}) if n in fields)
        specs = {}
        for f in (fields[n] for n in order):
            where = f"{cls.__name__}.{f.name}"
            unknown = set(f.metadata) - RULES
            if unknown:
                raise TypeError(f"{where}: unknown rules {sorted(unknown)}; known: {sorted(RULES)}")
            if not f.metadata.get("help"):
                raise TypeError(f"{where} has no help text: declare it with setting(default, help, ...)")
            base, optional = _field_type(hints[f.name], where)
            rules = {k: v for k, v in f.metadata.items() if k != "help"}
            specs[f.name] = FieldSpec(f.name, base, optional, f.metadata["help"], rules)
        cls._field_specs = specs
        return specs

    @classmethod
    def describe_method(cls) -> str:
        """The method's name for messages: ``method_name``, else the class name."""
        return cls.method_name or cls.__name__

    @classmethod
    def error(cls, name: str, value: Any, expected: str) -> ConfigError:
        """The ConfigError for ``value`` of field ``name``: "esd: lr must be a finite number > 0, got -1"."""
        return ConfigError(f"{cls.describe_method()}: {name} must be {expected}, got {show_value(value)}")

    def validate(self) -> None:
        """Check every field's value against its type and rules, then :meth:`check`."""
        for name, spec in self.field_specs().items():
            value = getattr(self, name)
            if spec.problem(value):
                raise self.error(name, value, spec.expected())
        self.check()

    def check(self) -> None:
        """Rules between fields; a config class overrides this and raises :meth:`error`."""

    def guidance_eta(self) -> float | None:
        """The negative guidance in ALGORITHMS' form, target = e(anchor) - eta * (e(c) - e(anchor)),
        for the methods trained on such a target (ESD, Receler, EraseAnything); None for others."""
        return None

    @classmethod
    def parse_setting(cls, name: str, text: str) -> Any:
        """The value of field ``name`` from its ``--set`` text (see the module docstring); the
        result's range is checked when the config is made."""
        specs = cls.field_specs()
        if name not in specs:
            raise ConfigError(f"{cls.describe_method()} has no setting {name!r}; settings: {', '.join(specs)}")
        spec = specs[name]
        if not isinstance(text, str):  # a value given from Python: checked as it is
            return text
        word = text.strip().lower()
        if spec.optional and spec.type is not str and word == "none":
            return None
        if spec.type is str:
            return text
        if spec.type is bool:
            if word not in BOOL_WORDS:
                raise cls.error(name, text, "one of true/false, yes/no, on/off, 1/0")
            return BOOL_WORDS[word]
        if spec.type is int:
            if not _INT_TEXT.fullmatch(text.strip()):
                raise cls.error(name, text, spec.expected())
            return int(text)
        try:
            value = float(text)
        except ValueError:
            raise cls.error(name, text, spec.expected()) from None
        if not math.isfinite(value):
            raise cls.error(name, text, spec.expected())
        return value

    @classmethod
    def with_settings(cls, config: MethodConfig, settings: dict[str, Any]) -> MethodConfig:
        """A checked copy of ``config`` with ``settings`` (field -> ``--set`` text or value)."""
        changes = {k: cls.parse_setting(k, v) for k, v in settings.items()}
        return dataclasses.replace(config, **changes)

"""The contract every edit kind implements, and the registry :func:`erasekit.edits.apply` reads."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..errors import EditError
from .artifact import LEGACY_KINDS, Edit, legacy_kind


class Attachment:
    """An edit (or a method's live training tensors) attached to a denoiser.

    ``detach()`` takes it off again; once the last attachment of a kind is off, the model is
    the one before attaching, bit for bit. ``remove()`` is the same as ``detach()`` (torch hook
    handles spell it that way). ``set_scale(s)`` changes the strength in place (0: no effect).
    """

    def detach(self) -> None:
        """Take the edit off the model."""
        raise NotImplementedError

    def remove(self) -> None:
        """Same as :meth:`detach`."""
        self.detach()

    def set_scale(self, scale: float) -> None:
        """Change the strength (1.0: as trained; 0: the model without this edit)."""
        raise NotImplementedError


class EditKind:
    """One way an Edit changes a pipeline. Subclasses set ``name`` (what ``edit.json`` records
    as ``kind``) and ``combine`` (how several attached edits of the kind add up), implement
    :meth:`attach` and, when the kind can be folded into plain weights, :meth:`export_merged`."""

    name: ClassVar[str] = ""
    combine: ClassVar[str] = ""

    def attach(self, adapter, edit: Edit, scale: float = 1.0) -> Attachment:
        """Attach ``edit`` to ``adapter``'s model with strength ``scale``; returns the attachment."""
        raise NotImplementedError

    def check(self, edit: Edit) -> str | None:
        """What is wrong with ``edit``'s tensors for this kind, read without a model (their names,
        their number), or None. Attaching checks them against the model too."""
        return None

    def export_merged(self, pipe, edit: Edit, path: str | Path, scale: float = 1.0) -> Path:
        """Write the model with ``edit`` folded into its weights (kinds that can)."""
        raise ValueError(f"a {self.name} edit ({edit.method}) cannot be merged into the model's weights")


KINDS: dict[str, EditKind] = {}


def register_kind(cls: type[EditKind]) -> type[EditKind]:
    """Class decorator: make ``cls`` the kind named ``cls.name``."""
    if not cls.name:
        raise TypeError("an edit kind needs a name")
    KINDS[cls.name] = cls()
    return cls


def kind_of(edit: Edit) -> EditKind:
    """The kind of ``edit``: ``edit.kind``, or for edits saved before kinds were recorded, the
    kind of its method. ValueError naming the known kinds otherwise."""
    name = edit.kind or legacy_kind(edit.method)
    if name not in KINDS:
        raise EditError(f"edit {edit.id} ({edit.method}) has unknown kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def check_edit(edit: Edit, where: str = "") -> EditKind:
    """The kind of ``edit`` after checking that its method, kind and tensors agree; an
    :class:`~erasekit.errors.EditError` naming the disagreement otherwise (``where``: the folder)."""
    label = f"the edit at {where}" if where else f"edit {edit.id}"
    kind = kind_of(edit)
    usual = LEGACY_KINDS.get(edit.method)
    if usual is not None and usual != kind.name:
        raise EditError(
            f"{label} says method {edit.method!r} (a {usual} edit) but kind {kind.name!r}: edit.json was changed"
        )
    problem = kind.check(edit)
    if problem:
        raise EditError(f"{label} ({edit.method}, kind {kind.name}): {problem}")
    return kind

"""Edits: what an erasure method produces, and how it attaches to a pipeline.

An :class:`Edit` is an artifact (a folder of ``edit.safetensors`` + ``edit.json``, see
:mod:`.artifact`) whose ``kind`` says how it changes a model. An **edit kind** is one way of
changing a model, with one module each:

==================== ==================================================== ============================
kind                 what the edit holds / does                           methods
==================== ==================================================== ============================
``output_adapter``   small modules added on attention outputs             Receler
``weight_delta``     deltas of named parameters (any pipeline component)  ESD, UCE
``lora``             a diffusers-layout LoRA, loaded through peft         EraseAnything
``inference_hook``   settings only; a named hook acts at inference        SLD, keyword zeroing, SAFREE
==================== ==================================================== ============================

The contract (:mod:`.kind`): a kind is an :class:`EditKind` registered under its name, with
``attach(adapter, edit, scale) -> Attachment``; the attachment has ``detach()`` (alias
``remove()``), after which the model is bit for bit what it was, and ``set_scale(scale)``.
Each kind states how several of its edits combine (``combine``); kinds that can be folded into
plain weights implement ``export_merged``. A kind's module also offers what training needs to
attach live trainable tensors the same way (``output_adapter.attach_modules``,
``weight_delta.train_deltas``, ``lora.attach_lora``).

:func:`apply` finds the edit's kind (``edit.kind``; an edit saved before kinds were recorded
gets its method's kind), attaches it, and records the attachment in the denoiser's edit stack
(``adapter.edit_stack``, :class:`erasekit.models.base.EditStack`: the one place that knows what
is attached to a denoiser, shared with ``edits_disabled()``); :func:`remove` detaches it.
Methods produce Edits and never attach them. This package imports torch and safetensors, and
:mod:`erasekit.models` and peft lazily; never the methods, evaluation, bench, cli or toy world
(layers: cli -> bench/evaluation -> methods -> edits -> models).
"""

from __future__ import annotations

from ..errors import EditError
from . import inference_hook, lora, output_adapter, safree_hook, weight_delta  # noqa: F401 (registers kinds, hooks)
from .artifact import (
    FORMAT,
    LEGACY_KINDS,
    META_FILE,
    WEIGHTS_FILE,
    Edit,
    check_edit_output,
    is_edit_folder,
    read_edit_meta,
)
from .artifact import load_edit as _read_edit
from .kind import KINDS, Attachment, EditKind, check_edit, kind_of
from .weight_delta import export_merged

__all__ = [
    "FORMAT",
    "KINDS",
    "LEGACY_KINDS",
    "META_FILE",
    "WEIGHTS_FILE",
    "Attachment",
    "Edit",
    "EditKind",
    "apply",
    "check_edit_output",
    "export_merged",
    "is_edit_folder",
    "kind_of",
    "load_edit",
    "read_edit_meta",
    "check_edit",
    "remove",
]


def load_edit(folder) -> Edit:
    """Read the Edit saved in ``folder`` and check that its method, kind and tensors agree: an
    edit whose edit.json disagrees with its tensors is an :class:`~erasekit.errors.EditError`,
    never an edit that silently changes nothing. Missing: :class:`~erasekit.errors.NotFound`."""
    edit = _read_edit(folder)
    check_edit(edit, where=str(folder))
    return edit


def apply(pipe, edit: Edit, scale: float = 1.0) -> None:
    """Attach ``edit`` to ``pipe`` (in place) with strength ``scale`` (1.0 = as trained).

    Applying an edit that is already attached replaces it (e.g. to change the scale).
    """
    from ..models import adapter_for

    adapter = adapter_for(pipe)
    if edit.family != adapter.family:
        raise EditError(
            f"edit {edit.method}/{edit.concepts} was made for family {edit.family!r}, "
            f"the pipeline is {adapter.family!r}"
        )
    kind = check_edit(edit)
    attached = adapter.edit_stack.attached
    if edit.id in attached:
        attached[edit.id].detach()  # forget it only once it is really off
        del attached[edit.id]
    attached[edit.id] = kind.attach(adapter, edit, scale)


def remove(pipe, edit: Edit) -> None:
    """Detach ``edit`` from ``pipe``; the pipeline then generates as before it was applied."""
    from ..models import adapter_for

    attached = adapter_for(pipe).edit_stack.attached
    if edit.id not in attached:
        raise ValueError(f"edit {edit.id} ({edit.method}, {edit.concepts}) is not applied to this pipeline")
    attached[edit.id].detach()  # a detach that fails leaves the edit applied and known
    del attached[edit.id]

"""Edit kind "weight_delta": changes of named parameters (ESD, UCE), on any module of the pipeline.

An edit of this kind stores one tensor per changed parameter: ``delta.<parameter>`` for a
parameter of the denoiser (``<parameter>`` as in ``denoiser.named_parameters()``, without the
``.base_layer.`` a peft LoRA inserts: :func:`erasekit.models.plain_parameter_names`) and
``delta:<component>.<parameter>`` for one of another pipeline component (e.g.
``delta:text_encoder.text_model.encoder.layers.0.mlp.fc1.weight``). While attached, a
parameter holds ``base + sum_k scale_k * delta_k`` over the edits attached to it, computed in
float32 and cast to the parameter's dtype. The base tensor itself is kept aside, untouched, so
that detaching the last edit (or ``edits_disabled()``) puts it back bit for bit. Swapping uses
``param.data``: the Parameter objects stay the same (optimizers, peft and hooks that hold them
are not disturbed).

The bank of attached deltas lives in the denoiser's edit stack
(``adapter.edit_stack.kinds["weight_delta"]``) and is one of its ``edits_disabled()`` switches.
Training attaches live trainable copies with :func:`train_deltas`; :func:`export_merged`
writes the model with an edit folded in, loadable without erasekit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import atomic_folder
from ..models import plain_parameter_names
from .artifact import Edit
from .kind import Attachment, EditKind, register_kind

NAME = "weight_delta"
PREFIX = "delta."  # + a denoiser parameter's name
COMPONENT_PREFIX = "delta:"  # + "<pipeline component>.<parameter>"


def delta_key(parameter: str, component: str = "") -> str:
    """The edit's tensor name for the delta of ``parameter`` of ``component`` ("": the denoiser)."""
    return PREFIX + parameter if not component else f"{COMPONENT_PREFIX}{component}.{parameter}"


def _target(key: str) -> tuple[str, str] | None:
    """(component, parameter) of an edit tensor's name; None for a tensor that is no delta."""
    if key.startswith(PREFIX):
        return "", key[len(PREFIX) :]
    if key.startswith(COMPONENT_PREFIX):
        component, _, parameter = key[len(COMPONENT_PREFIX) :].partition(".")
        return component, parameter
    return None


def _slot_name(component: str, parameter: str) -> str:
    return parameter if not component else f"{component}:{parameter}"


def deltas_of(edit: Edit) -> dict[str, Tensor]:
    """Denoiser parameter name -> delta of a weight edit (deltas of other components left out)."""
    return {t[1]: v for k, v in edit.tensors.items() if (t := _target(k)) is not None and not t[0]}


def targets_of(edit: Edit) -> dict[tuple[str, str], Tensor]:
    """(component, parameter) -> delta for every delta of the edit (component "": the denoiser)."""
    return {t: v for k, v in edit.tensors.items() if (t := _target(k)) is not None}


def components(adapter) -> dict[str, nn.Module]:
    """The modules weight deltas can change: "" -> the denoiser, and every other torch module
    among the pipeline's components by its name (none for an adapter without a pipeline)."""
    out = {"": adapter.denoiser}
    pipe_components = getattr(adapter.pipe, "components", None) or {}
    for name, module in pipe_components.items():
        if isinstance(module, nn.Module) and module is not adapter.denoiser:
            out[name] = module
    return out


def _parameters(adapter, wanted: set[str]) -> dict[tuple[str, str], nn.Parameter]:
    mods = components(adapter)
    missing = sorted(c for c in wanted if c not in mods)
    if missing:
        raise ValueError(f"the edit changes pipeline components this pipeline lacks: {missing}")
    # Keyed by the plain model's names: a LoRA attached through peft (a user's, or EraseAnything's)
    # wraps layers in ".base_layer.", and a delta must land on the same weight with or without it.
    out = {}
    for c in sorted(wanted):
        names = plain_parameter_names(mods[c])
        out.update({(c, names[id(p)]): p for p in mods[c].parameters()})
    return out


def merged(base: Tensor, terms: list[tuple[Tensor, float]]) -> Tensor:
    """``base + sum(scale * delta)`` in float32, cast to the base's dtype; ``base`` itself (the
    same tensor) when no term has a non-zero scale."""
    terms = [(d, s) for d, s in terms if s != 0]
    if not terms:
        return base
    acc = base.float()
    for delta, scale in terms:
        acc = acc + scale * delta.to(device=base.device, dtype=torch.float32)
    return acc.to(base.dtype)


class _Slot:
    def __init__(self, param: nn.Parameter):
        self.param = param
        self.base = param.data
        self.entries: dict[str, tuple[Tensor, float]] = {}
        self.edited = self.base


class _WeightBank:
    """The weight edits attached to one denoiser's pipeline; an edits_disabled() switch."""

    def __init__(self, adapter):
        self.slots: dict[str, _Slot] = {}
        self.enabled = True
        self.handle = adapter.register_switch(self)

    def disable(self) -> None:
        for slot in self.slots.values():
            slot.param.data = slot.base
        self.enabled = False

    def enable(self) -> None:
        for slot in self.slots.values():
            slot.param.data = slot.edited
        self.enabled = True

    def refresh(self, name: str) -> None:
        slot = self.slots[name]
        slot.edited = merged(slot.base, list(slot.entries.values()))
        slot.param.data = slot.edited
        if not slot.entries:
            del self.slots[name]


def _bank(adapter, create: bool = False) -> _WeightBank | None:
    kinds = adapter.edit_stack.kinds
    if create and NAME not in kinds:
        kinds[NAME] = _WeightBank(adapter)
    return kinds.get(NAME)


def attached_parameters(adapter) -> set[str]:
    """Names of the parameters that attached weight edits currently change: a denoiser
    parameter by its name, another component's as ``<component>:<parameter>``."""
    bank = _bank(adapter)
    return set(bank.slots) if bank is not None else set()


def _require_enabled(adapter) -> None:
    if not adapter.edits_enabled:
        raise RuntimeError("weight edits cannot be applied or removed inside edits_disabled()")


class DeltaAttachment(Attachment):
    """One edit's deltas in the bank."""

    def __init__(self, adapter, edit_id: str, names: list[str]):
        self.adapter, self.edit_id, self.names = adapter, edit_id, names

    def set_scale(self, scale: float) -> None:
        """Recompute the changed parameters with this edit at strength ``scale``."""
        _require_enabled(self.adapter)
        bank = _bank(self.adapter)
        for name in self.names:
            slot = bank.slots.get(name) if bank is not None else None
            if slot is not None and self.edit_id in slot.entries:
                slot.entries[self.edit_id] = (slot.entries[self.edit_id][0], float(scale))
                bank.refresh(name)

    def detach(self) -> None:
        """Take the deltas off (the last edit on a parameter puts its original tensor back)."""
        _require_enabled(self.adapter)
        bank = _bank(self.adapter)
        if bank is None:
            return
        for name in self.names:
            if name in bank.slots and bank.slots[name].entries.pop(self.edit_id, None) is not None:
                bank.refresh(name)
        if not bank.slots:
            bank.handle.remove()
            del self.adapter.edit_stack.kinds[NAME]


def _check(edit: Edit) -> str | None:
    if not edit.tensors:
        return "it holds no weight deltas"
    foreign = sorted(k for k in edit.tensors if _target(k) is None)
    if foreign:
        return f"tensors {foreign[:2]} are not weight deltas (names {PREFIX}* or {COMPONENT_PREFIX}*)"
    return None


def attach_deltas(adapter, edit: Edit, scale: float = 1.0) -> DeltaAttachment:
    """Add ``scale * delta`` to each parameter the edit changes; the attachment's ``detach()``
    takes it away again (the last one restores the original tensors exactly)."""
    _require_enabled(adapter)
    deltas = targets_of(edit)
    params = _parameters(adapter, {c for c, _ in deltas})
    unknown = [_slot_name(*t) for t in deltas if t not in params]
    if unknown:
        raise ValueError(f"the edit changes parameters this model lacks: {unknown[:3]} ...")
    for target, delta in deltas.items():
        if tuple(delta.shape) != tuple(params[target].shape):
            raise ValueError(
                f"delta for {_slot_name(*target)} has shape {tuple(delta.shape)}, "
                f"the parameter {tuple(params[target].shape)}"
            )
    bank = _bank(adapter, create=True)
    for target, delta in deltas.items():
        name = _slot_name(*target)
        slot = bank.slots.setdefault(name, _Slot(params[target]))
        slot.entries[edit.id] = (delta.to(slot.base.device), float(scale))
        bank.refresh(name)
    return DeltaAttachment(adapter, edit.id, [_slot_name(*t) for t in deltas])


class TrainingDeltas(Attachment):
    """Live trainable copies of parameters, attached while a method trains them (ESD).

    Each parameter's original tensor is kept aside (``frozen``) and the parameter shows a
    clone of it (``student``) that an optimizer changes in place. It is an edits_disabled()
    switch: ``disable()`` shows the originals (a frozen teacher without a model copy; teacher
    passes must not overlap a student graph), ``enable()`` the students. ``detach()`` puts the
    very original tensors back (bit for bit) and unregisters the switch.
    """

    def __init__(self, adapter, params: dict[str, nn.Parameter]):
        self.params = params
        self.frozen = {n: p.data for n, p in params.items()}
        self.student = {n: p.data.clone() for n, p in params.items()}
        self.enabled = True
        for n, p in params.items():
            p.data = self.student[n]
        self.handle = adapter.register_switch(self)

    def disable(self) -> None:
        """Show the original tensors."""
        for n, p in self.params.items():
            p.data = self.frozen[n]
        self.enabled = False

    def enable(self) -> None:
        """Show the trained tensors."""
        for n, p in self.params.items():
            p.data = self.student[n]
        self.enabled = True

    def deltas(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``student - frozen`` (computed in float32, in the parameter's dtype, CPU)."""
        return {
            n: (self.student[n].float() - self.frozen[n].float()).to(self.frozen[n].dtype).cpu() for n in self.params
        }

    def trainable(self) -> list[nn.Parameter]:
        """The parameters, with their gradients switched on (for an optimizer)."""
        for p in self.params.values():
            p.requires_grad_(True)
        return list(self.params.values())

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors for a checkpoint: ``"student.<name>"`` -> tensor (live, not copied)."""
        return {f"student.{n}": t for n, t in self.student.items()}

    def load_state(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's trained tensors (:meth:`state`'s keys) into the students, in place."""
        with torch.no_grad():
            for n, t in self.student.items():
                t.copy_(saved[f"student.{n}"])

    def set_scale(self, scale: float) -> None:
        """Training tensors have no strength: always 1."""
        raise ValueError("training deltas are always at scale 1")

    def detach(self) -> None:
        """Put the original tensors back and stop switching."""
        self.disable()
        self.handle.remove()


def train_deltas(adapter, params: dict[str, nn.Parameter]) -> TrainingDeltas:
    """Attach trainable copies of ``params`` (name -> parameter); see :class:`TrainingDeltas`."""
    return TrainingDeltas(adapter, params)


def export_merged(pipe, edit: Edit, path: str | Path, scale: float = 1.0) -> Path:
    """Write the model with ``edit`` merged into its weights (and no other erasekit weight edit)
    as diffusers / transformers model folders (``save_pretrained``, safetensors), loadable by
    the stock classes without erasekit (``UNet2DConditionModel.from_pretrained(path)``,
    ``FluxTransformer2DModel...``). An edit of the denoiser alone writes the denoiser's folder
    at ``path``; one that changes other components writes each changed component (the
    denoiser by its component name) to ``path/<component>``. The edit's metadata is written
    beside it as ``erasekit_edit.json``. The pipeline is left as it was."""
    from ..models import adapter_for

    adapter = adapter_for(pipe)
    if edit.family != adapter.family:
        raise ValueError(
            f"edit {edit.method}/{edit.concepts} was made for family {edit.family!r}, "
            f"the pipeline is {adapter.family!r}"
        )
    deltas = targets_of(edit)
    if not deltas:
        raise ValueError(f"a {edit.method} edit has no weight deltas to merge")
    params = _parameters(adapter, {c for c, _ in deltas})
    mods = components(adapter)
    changed = sorted({c for c, _ in deltas})
    bank = _bank(adapter)
    slots = bank.slots if bank is not None else {}
    restore: list[tuple[nn.Parameter, Tensor]] = []
    try:
        for slot in slots.values():  # the base weights, without other weight edits
            restore.append((slot.param, slot.param.data))
            slot.param.data = slot.base
        for target, delta in deltas.items():
            param = params[target]
            restore.append((param, param.data))
            param.data = merged(param.data, [(delta, float(scale))])
        with atomic_folder(path, replaceable=lambda folder: (folder / "erasekit_edit.json").is_file()) as tmp:
            if changed == [""]:
                adapter.denoiser.save_pretrained(tmp, safe_serialization=True)
            else:
                names = {c: c or _component_name(adapter) for c in changed}
                for c in changed:
                    mods[c].save_pretrained(Path(tmp) / names[c], safe_serialization=True)
            meta = edit.metadata() | {"merged_scale": float(scale)}
            (Path(tmp) / "erasekit_edit.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        for param, data in reversed(restore):
            param.data = data
    return Path(path)


def _component_name(adapter) -> str:
    for name, module in (getattr(adapter.pipe, "components", None) or {}).items():
        if module is adapter.denoiser:
            return name
    return "denoiser"


@register_kind
class WeightDelta(EditKind):
    """Deltas of named parameters; several edits on one parameter add up."""

    name = NAME
    combine = "base + sum of scale * delta over the edits on a parameter (float32)"

    def check(self, edit: Edit) -> str | None:
        """Every tensor must be a delta (``delta.<parameter>`` or ``delta:<component>.<parameter>``)."""
        return _check(edit)

    def attach(self, adapter, edit: Edit, scale: float = 1.0) -> DeltaAttachment:
        """See :func:`attach_deltas`."""
        return attach_deltas(adapter, edit, scale)

    def export_merged(self, pipe, edit: Edit, path: str | Path, scale: float = 1.0) -> Path:
        """See :func:`export_merged`."""
        return export_merged(pipe, edit, path, scale)

"""Edits that change base weights (ESD, UCE): attach, detach and export weight deltas.

An Edit of this kind stores ``delta.<parameter name>`` tensors (the change of a denoiser
parameter). While attached, a parameter holds ``base + sum_k scale_k * delta_k`` over the edits
attached to it, computed in float32 and cast to the parameter's dtype. The base tensor itself is
kept aside, untouched, so that detaching the last edit (or ``edits_disabled()``) puts it back
bit for bit. Swapping uses ``param.data``: the Parameter objects stay the same (optimizers, peft
and hooks that hold them are not disturbed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..edits import Edit
from ..files import atomic_folder
from ..models import adapter_for

PREFIX = "delta."


def deltas_of(edit: Edit) -> dict[str, Tensor]:
    """Parameter name -> delta of a weight edit."""
    return {k[len(PREFIX):]: v for k, v in edit.tensors.items() if k.startswith(PREFIX)}


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
    """The weight edits attached to one denoiser; an edits_disabled() switch."""

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
    store = adapter.denoiser.__dict__
    if create and "_erasekit_weight_bank" not in store:
        store["_erasekit_weight_bank"] = _WeightBank(adapter)
    return store.get("_erasekit_weight_bank")


def attached_parameters(adapter) -> set[str]:
    """Names of the denoiser parameters that attached weight edits currently change."""
    bank = _bank(adapter)
    return set(bank.slots) if bank is not None else set()


def _require_enabled(adapter) -> None:
    if not adapter.edits_enabled:
        raise RuntimeError("weight edits cannot be applied or removed inside edits_disabled()")


class _Attachment:
    def __init__(self, adapter, edit_id: str, names: list[str]):
        self.adapter, self.edit_id, self.names = adapter, edit_id, names

    def remove(self) -> None:
        _require_enabled(self.adapter)
        bank = _bank(self.adapter)
        if bank is None:
            return
        for name in self.names:
            if name in bank.slots and bank.slots[name].entries.pop(self.edit_id, None) is not None:
                bank.refresh(name)
        if not bank.slots:
            bank.handle.remove()
            del self.adapter.denoiser.__dict__["_erasekit_weight_bank"]


def attach_deltas(adapter, edit: Edit, scale: float = 1.0) -> _Attachment:
    """Add ``scale * delta`` to each parameter the edit changes; the handle's ``remove()``
    takes it away again (the last one restores the original tensors exactly)."""
    _require_enabled(adapter)
    deltas = deltas_of(edit)
    params = dict(adapter.denoiser.named_parameters())
    unknown = [n for n in deltas if n not in params]
    if unknown:
        raise ValueError(f"the edit changes parameters this model lacks: {unknown[:3]} ...")
    for name, delta in deltas.items():
        if tuple(delta.shape) != tuple(params[name].shape):
            raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}, the parameter {tuple(params[name].shape)}")
    bank = _bank(adapter, create=True)
    for name, delta in deltas.items():
        slot = bank.slots.setdefault(name, _Slot(params[name]))
        slot.entries[edit.id] = (delta.to(slot.base.device), float(scale))
        bank.refresh(name)
    return _Attachment(adapter, edit.id, list(deltas))


def export_merged(pipe, edit: Edit, path: str | Path, scale: float = 1.0) -> Path:
    """Write the denoiser with ``edit`` merged into its weights (and no other erasekit weight
    edit) as a diffusers model folder (``save_pretrained``, safetensors), loadable by the stock
    model class (``UNet2DConditionModel.from_pretrained(path)``, ``FluxTransformer2DModel...``)
    without erasekit. The edit's metadata is written beside it as ``erasekit_edit.json``.
    The pipeline is left as it was."""
    adapter = adapter_for(pipe)
    if edit.family != adapter.family:
        raise ValueError(f"edit {edit.method}/{edit.concepts} was made for family {edit.family!r}, the pipeline is {adapter.family!r}")
    deltas = deltas_of(edit)
    if not deltas:
        raise ValueError(f"a {edit.method} edit has no weight deltas to merge")
    params = dict(adapter.denoiser.named_parameters())
    bank = _bank(adapter)
    slots = bank.slots if bank is not None else {}
    restore: list[tuple[nn.Parameter, Tensor]] = []
    try:
        for slot in slots.values():  # the base weights, without other weight edits
            restore.append((slot.param, slot.param.data))
            slot.param.data = slot.base
        for name, delta in deltas.items():
            param = params[name]
            restore.append((param, param.data))
            param.data = merged(param.data, [(delta, float(scale))])
        with atomic_folder(path, replaceable=lambda folder: (folder / "erasekit_edit.json").is_file()) as tmp:
            adapter.denoiser.save_pretrained(tmp, safe_serialization=True)
            meta = edit.metadata() | {"merged_scale": float(scale)}
            (Path(tmp) / "erasekit_edit.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        for param, data in reversed(restore):
            param.data = data
    return Path(path)

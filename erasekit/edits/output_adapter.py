"""Edit kind "output_adapter": small modules added on attention outputs (Receler's erasers).

An edit of this kind stores, per attachment point ``P`` of the family adapter (an "attn_out"
or "attn_out_extra" point), one :class:`Eraser` as ``erasers.P.{down|up}.{weight|bias}``.
While attached, the point's output ``h`` (its image stream, through the adapter's
``add_output_edit``) becomes ``h + mean_k(scale_k * E_k(h))`` over the modules attached there:
several edits on one point average their outputs (Receler's rule for several concepts).

One forward hook per point, whatever the number of edits on it; the points' banks live in the
denoiser's edit stack (``adapter.edit_stack.kinds["output_adapter"]``: point name -> bank).
Training attaches its live modules the same way (:func:`attach_modules`) and reads their
outputs with :func:`recording`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifact import Edit
from .kind import Attachment, EditKind, register_kind

NAME = "output_adapter"
PREFIX = "erasers."
POINT_KINDS = ("attn_out", "attn_out_extra", "text_proj")  # the adapter's attachment points this kind uses


class Eraser(nn.Module):
    """E(h) = W_up GELU(W_down h + b_down) + b_up on (..., width) features; zero at init.
    Computed in the eraser's own dtype, returned in h's (float32 erasers on a bf16 model)."""

    def __init__(self, width: int, rank: int = 128):
        super().__init__()
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., width) -> (..., width), in h's dtype."""
        return self.up(F.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _key(point_name: str) -> str:
    return PREFIX + point_name


def eraser_tensors(erasers: dict[str, Eraser]) -> dict[str, torch.Tensor]:
    """Every eraser's weights as named tensors ``erasers.{point name}.{down|up}.{weight|bias}``."""
    return {f"{_key(n)}.{k}": v.detach() for n, e in erasers.items() for k, v in e.state_dict().items()}


def eraser_state(tensors: dict[str, torch.Tensor], point_name: str) -> dict[str, torch.Tensor]:
    """The state dict of the eraser at ``point_name`` out of :func:`eraser_tensors`' naming."""
    prefix = _key(point_name) + "."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def erasers_from_tensors(tensors: dict[str, torch.Tensor], device=None, dtype=None) -> dict[str, Eraser]:
    """Rebuild the (frozen) eraser modules stored in an edit's ``tensors``: point name -> Eraser."""
    names = sorted(
        {k[len(PREFIX) : -len(".down.weight")] for k in tensors if k.startswith(PREFIX) and k.endswith(".down.weight")}
    )
    erasers = {}
    for name in names:
        down = tensors[_key(name) + ".down.weight"]
        eraser = Eraser(down.shape[1], down.shape[0])
        eraser.load_state_dict(eraser_state(tensors, name))
        erasers[name] = eraser.to(device=device, dtype=dtype).requires_grad_(False)
    return erasers


def points(adapter) -> list:
    """The attachment points where this kind can put modules (every kind of :data:`POINT_KINDS`)."""
    return [p for kind in POINT_KINDS for p in adapter.attachment_points(kind)]


class _Bank:
    """The modules attached at one point: output h -> h + mean_k(scale_k * E_k(h))."""

    def __init__(self):
        self.entries: dict[str, tuple[nn.Module, float]] = {}
        self.record: list[torch.Tensor] | None = None  # the added outputs, while recording
        self.handle = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.entries:
            return h
        outs = [scale * module(h) for module, scale in self.entries.values()]
        delta = outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
        if self.record is not None:
            self.record.append(delta)
        return h + delta


def _banks(adapter, create: bool = False) -> dict[str, _Bank]:
    kinds = adapter.edit_stack.kinds
    if create:
        return kinds.setdefault(NAME, {})
    return kinds.get(NAME, {})


class OutputAttachment(Attachment):
    """Modules attached under one name at several points."""

    def __init__(self, adapter, name: str, point_names: list[str]):
        self.adapter, self.name, self.points = adapter, name, point_names

    def set_scale(self, scale: float) -> None:
        """Change the strength of every module of this attachment."""
        banks = _banks(self.adapter)
        for point in self.points:
            bank = banks.get(point)
            if bank is not None and self.name in bank.entries:
                bank.entries[self.name] = (bank.entries[self.name][0], float(scale))

    def detach(self) -> None:
        """Take the modules off; a point's hook goes when its last module does."""
        banks = _banks(self.adapter)
        for point in self.points:
            bank = banks.get(point)
            if bank is None:
                continue
            bank.entries.pop(self.name, None)
            if not bank.entries:
                bank.handle.remove()
                del banks[point]
        if not banks:
            self.adapter.edit_stack.kinds.pop(NAME, None)


def attach_modules(adapter, modules: dict[str, nn.Module], name: str, scale: float = 1.0) -> OutputAttachment:
    """Add ``scale * module(h)`` on the output h of each point (point name -> module; the modules
    keep their parameters, so trainable ones train through the model). ``name`` must be unique
    among what is attached (an edit id, or e.g. "training")."""
    known = {p.name: p for p in points(adapter)}
    unknown = set(modules) - set(known)
    if unknown:
        raise ValueError(f"the edit has erasers for points this model lacks: {sorted(unknown)[:3]} ...")
    banks = _banks(adapter, create=True)
    for point, module in modules.items():
        bank = banks.get(point)
        if bank is None:
            bank = banks[point] = _Bank()
            bank.handle = adapter.add_output_edit(known[point], bank)
        bank.entries[name] = (module, scale)
    return OutputAttachment(adapter, name, list(modules))


@contextmanager
def recording(adapter, points: Collection[str] | None = None) -> Iterator[list[torch.Tensor]]:
    """Collect the added outputs (B, tokens, C) of every point (only those named in ``points``,
    when given), for every forward inside the context (one tensor per point and forward, in
    forward order)."""
    outs: list[torch.Tensor] = []
    banks = [bank for name, bank in _banks(adapter).items() if points is None or name in points]
    for bank in banks:
        bank.record = outs
    try:
        yield outs
    finally:
        for bank in banks:
            bank.record = None


@register_kind
class OutputAdapter(EditKind):
    """Erasers on attention outputs; several edits at one point average their outputs."""

    name = NAME
    combine = "mean of scale * E(h) over the edits at a point"

    def check(self, edit: Edit) -> str | None:
        """There must be erasers (``erasers.<point>.*``); other tensors (Receler keeps its
        adversarial prompt) ride along unused."""
        if not any(k.startswith(PREFIX) and k.endswith(".down.weight") for k in edit.tensors):
            return f"it holds no erasers (tensors named {PREFIX}<point>.down.weight)"
        return None

    def attach(self, adapter, edit: Edit, scale: float = 1.0) -> OutputAttachment:
        """Rebuild the edit's erasers on the model's device and dtype and attach them (both
        guidance branches see them: they act on every forward)."""
        erasers = erasers_from_tensors(edit.tensors, adapter.device, adapter.dtype)
        return attach_modules(adapter, erasers, edit.id, scale)

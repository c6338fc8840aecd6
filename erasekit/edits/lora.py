"""Edit kind "lora": a LoRA on the denoiser's Linears (EraseAnything), through peft.

An edit of this kind IS a diffusers LoRA file: its tensors are named
``<prefix>.<module>.lora_A.weight`` (rank, in) and ``<prefix>.<module>.lora_B.weight`` (out,
rank), ``<prefix>`` the denoiser's component name ("unet", "transformer"), alpha folded into B
(so it loads at alpha = rank). Stock diffusers therefore loads an edit folder directly::

    pipe.load_lora_weights("edits/nudity", weight_name="edit.safetensors")

Attaching loads the tensors with the stock loader (``load_lora_adapter``, as
``pipe.load_lora_weights`` does) as the peft adapter ``erasekit_<edit id>``; several LoRAs
stay active together and add up; the scale is the LoRA strength. peft keeps the adapters on the
denoiser's own modules; ``edits_disabled()`` switches every peft layer off. Training attaches
its LoRA the same way with ``trainable=True`` (:func:`attach_lora`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .artifact import Edit
from .kind import Attachment, EditKind, register_kind

NAME = "lora"


def lora_prefix(adapter) -> str:
    """The denoiser's component name in the pipeline ("transformer", "unet"): the key prefix of
    diffusers LoRA files."""
    if adapter.pipe is not None:
        for name, component in adapter.pipe.components.items():
            if component is adapter.denoiser:
                return name
    return "unet" if "UNet" in type(adapter.denoiser).__name__ else "transformer"


def lora_targets(adapter, targets: str | Sequence[str]) -> list:
    """The adapter's "text_proj" and "pooled_proj" attachment points whose name is, or ends with,
    one of ``targets`` (a comma-separated string or a sequence: "add_q_proj", "to_k", or
    "text_embedder.linear_1" for Flux's pooled-text projection)."""
    names = targets.split(",") if isinstance(targets, str) else targets
    wanted = {w.strip() for w in names if w.strip()}
    points = [
        p
        for kind in ("text_proj", "pooled_proj")
        for p in adapter.attachment_points(kind)
        if any(p.name == w or p.name.endswith("." + w) for w in wanted)
    ]
    if not points:
        raise ValueError(f"no text projection of this model is named one of {sorted(wanted)}")
    return points


def lora_shapes(adapter, rank: int, points: Sequence) -> dict[str, tuple[int, int]]:
    """Diffusers LoRA keys -> shapes at the attachment ``points``: ``<prefix>.<module>.lora_A.weight``
    (rank, in) and ``...lora_B.weight`` (out, rank)."""
    prefix = lora_prefix(adapter)
    shapes = {}
    for p in points:
        shapes[f"{prefix}.{p.name}.lora_A.weight"] = (rank, p.in_features)
        shapes[f"{prefix}.{p.name}.lora_B.weight"] = (p.width, rank)
    return shapes


def init_lora(shapes: dict[str, tuple[int, int]], generator=None) -> dict[str, torch.Tensor]:
    """peft's gaussian init of LoRA factors of ``shapes`` (:func:`lora_shapes`), drawn from
    ``generator`` in key order: A (rank, in) ~ N(0, (1/rank)^2), B = 0 (float32, CPU). The edited
    model starts identical to the base."""
    return {
        k: torch.randn(s, generator=generator) / s[0] if k.endswith("lora_A.weight") else torch.zeros(s)
        for k, s in shapes.items()
    }


def _tuner_layers(module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class LoraHandle(Attachment):
    """A LoRA attached to a denoiser under ``name``; ``detach()`` takes it out again (and, when
    no peft adapter is left, unwraps the layers, so the model is structurally the base)."""

    def __init__(self, adapter, name: str):
        self.adapter, self.name = adapter, name

    def modules(self) -> dict[str, torch.nn.Module]:
        """module name -> peft layer that holds this LoRA."""
        return {
            n: m
            for n, m in self.adapter.denoiser.named_modules()
            if self.name in getattr(m, "lora_A", {}) and hasattr(m, "set_scale")
        }

    def parameters(self) -> list[torch.nn.Parameter]:
        """lora_A, lora_B weights per module, in module order."""
        return [p for m in self.modules().values() for p in (m.lora_A[self.name].weight, m.lora_B[self.name].weight)]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weights in the diffusers layout (detached float32 CPU copies)."""
        out = {}
        for n, m in self.modules().items():
            out[f"{prefix}.{n}.lora_A.weight"] = m.lora_A[self.name].weight.detach().float().cpu().clone()
            out[f"{prefix}.{n}.lora_B.weight"] = m.lora_B[self.name].weight.detach().float().cpu().clone()
        return out

    def set_scale(self, scale: float) -> None:
        """The LoRA strength (peft's scale of this adapter on every layer)."""
        for m in self.modules().values():
            m.set_scale(self.name, float(scale))

    def detach(self) -> None:
        """Delete this peft adapter; other adapters keep their active state."""
        if self.name is None:
            return
        den = self.adapter.denoiser
        flags = [(p, p.requires_grad) for p in den.parameters()]
        active = {m: [a for a in m.active_adapters if a != self.name] for m in _tuner_layers(den)}
        den.delete_adapters(self.name)
        if not getattr(den, "peft_config", None):
            den.unload_lora()  # nothing else loaded: plain modules again
        else:
            for m in _tuner_layers(den):
                keep = [a for a in active.get(m, []) if a in getattr(m, "lora_A", {})]
                if keep and list(m.active_adapters) != keep:
                    m.set_adapter(keep)
        alive = {id(p) for p in den.parameters()}
        for p, flag in flags:
            if id(p) in alive:
                p.requires_grad_(flag)
        self.name = None


def attach_lora(
    adapter, tensors: dict[str, torch.Tensor], name: str, scale: float = 1.0, trainable: bool = False
) -> LoraHandle:
    """Load diffusers-layout LoRA ``tensors`` into the denoiser with the stock loader
    (``load_lora_adapter``, as ``pipe.load_lora_weights`` does), as adapter ``name`` with
    strength ``scale``. Adapters that were active stay active (peft would otherwise switch
    them off); requires_grad flags of the rest of the model are left as they were; the LoRA's
    own weights train with ``trainable``."""
    den = adapter.denoiser
    prefix = lora_prefix(adapter)
    foreign = [k for k in tensors if not k.startswith(prefix + ".")]
    if foreign:
        raise ValueError(f"LoRA keys must start with {prefix!r} for this model, got {foreign[:2]}")
    if name in (getattr(den, "peft_config", None) or {}):
        raise ValueError(f"a LoRA named {name!r} is already attached")
    modules = dict(den.named_modules())
    missing = sorted({k[len(prefix) + 1 :].rsplit(".lora_", 1)[0] for k in tensors} - set(modules))
    if missing:
        raise ValueError(f"the LoRA targets modules this model lacks: {missing[:3]}")
    flags = [(p, p.requires_grad) for p in den.parameters()]
    active = {m: list(m.active_adapters) for m in _tuner_layers(den)}
    with warnings.catch_warnings():  # several adapters on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        den.load_lora_adapter(dict(tensors), prefix=prefix, adapter_name=name)
    handle = LoraHandle(adapter, name)
    for m in _tuner_layers(den):
        want = active.get(m, []) + ([name] if name in getattr(m, "lora_A", {}) else [])
        if want and list(m.active_adapters) != want:
            m.set_adapter(want)
    handle.set_scale(scale)
    for p, flag in flags:
        p.requires_grad_(flag)
    for p in handle.parameters():
        p.requires_grad_(trainable)
    return handle


@register_kind
class Lora(EditKind):
    """A diffusers-layout LoRA; several LoRAs add up (peft)."""

    name = NAME
    combine = "sum of scale * B A x over the attached LoRAs (peft)"

    def check(self, edit: Edit) -> str | None:
        """Every tensor must be a LoRA factor (``*.lora_A.weight`` / ``*.lora_B.weight``), in pairs."""
        if not edit.tensors:
            return "it holds no LoRA weights"
        ends = (".lora_A.weight", ".lora_B.weight")
        foreign = sorted(k for k in edit.tensors if not k.endswith(ends))
        if foreign:
            return f"tensors {foreign[:2]} are not LoRA factors (names *.lora_A.weight, *.lora_B.weight)"
        modules = {k[: -len(ends[0])] for k in edit.tensors}
        unpaired = sorted(m for m in modules if not all(m + e in edit.tensors for e in ends))
        if unpaired:
            return f"LoRA factors without their pair at {unpaired[:2]}"
        return None

    def attach(self, adapter, edit: Edit, scale: float = 1.0) -> LoraHandle:
        """Attach the edit's LoRA with strength ``scale`` (both guidance branches see it)."""
        return attach_lora(adapter, edit.tensors, f"erasekit_{edit.id}", scale)

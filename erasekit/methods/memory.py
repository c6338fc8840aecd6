"""Memory settings of the training methods (Receler, ESD, EraseAnything), one dataclass that
their configs inherit, and the context that applies them around a training loop.

``release_text_encoders`` (default on): the method encodes every prompt it will need before
training (EraseAnything draws its shuffled and synonym-swapped prompts for the whole run up
front), then the text encoders are parked on the CPU for the loop
(:meth:`FamilyAdapter.text_encoders_released`). On FLUX.1-dev this frees T5-XXL's 9.5 GB and
CLIP's 0.25 GB (bf16) for the whole run; on a CPU-only run nothing moves.

``gradient_checkpointing`` (default off): the denoiser blocks recompute their activations in
backward instead of keeping them (:meth:`FamilyAdapter.gradient_checkpointing`), except blocks
whose attention the method probes with gradient (EraseAnything's keyword layers). About one
more forward pass of compute per backward; same gradients.

``autocast_bf16`` (default off): the loop runs under ``torch.autocast`` in bfloat16 on the
model's device (matrix products and convolutions in bf16, reductions and losses in float32 as
autocast decides); the weights stay as loaded and the trained tensors in float32.

Half precision: load the pipeline in bfloat16 (``load_pipeline(..., dtype=torch.bfloat16)``,
``erasekit erase --dtype bfloat16``). Trained tensors (erasers, LoRA) stay in float32, as do the
losses. Attention runs through each layer's own processor (PyTorch's fused
scaled_dot_product_attention in diffusers' defaults); only probed layers also form explicit
attention maps, in float32 chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from .config import MethodConfig, setting


@dataclass
class MemorySettings(MethodConfig):
    """Config fields inherited by the training methods' configs."""

    release_text_encoders: bool = setting(True, "encode every prompt first, park the text encoders on the CPU")
    gradient_checkpointing: bool = setting(False, "recompute unprobed denoiser blocks in backward")
    autocast_bf16: bool = setting(False, "run the training loop under torch.autocast in bfloat16")


@contextmanager
def training_memory(adapter, settings: MemorySettings, probed: Sequence[str] = ()) -> Iterator[None]:
    """Apply ``settings`` for the duration of a training loop. ``probed``: layers whose
    attention is recorded with gradient inside the loop (kept out of checkpointing)."""
    with ExitStack() as stack:
        if settings.release_text_encoders:
            stack.enter_context(adapter.text_encoders_released())
        if settings.gradient_checkpointing:
            stack.enter_context(adapter.gradient_checkpointing(keep=probed))
        if settings.autocast_bf16:
            # No weight cache: autocast keeps one bf16 copy of each trained tensor for the whole
            # region, so every forward after the first optimizer step would read stale weights.
            stack.enter_context(torch.autocast(adapter.device.type, dtype=torch.bfloat16, cache_enabled=False))
        yield

"""Memory features of an adapter: train without the text encoders in accelerator memory, and
recompute denoiser blocks in backward instead of storing their activations.

:meth:`FamilyAdapter.text_encoders_released` and :meth:`FamilyAdapter.gradient_checkpointing`
open these contexts; the family says which modules they act on (``text_encoders``,
``checkpoint_units``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def text_device(adapter) -> torch.device:
    """Where ``adapter``'s text encoders run; raises while they are released (so ``encode`` does)."""
    if adapter.__dict__.get("_text_released"):
        raise RuntimeError(
            "the text encoders are released (text_encoders_released): encode every prompt "
            "before entering, or set release_text_encoders=False"
        )
    return next(adapter.main_text_encoder()[1].parameters()).device


@contextmanager
def text_encoders_released(adapter, park: str | torch.device = "cpu") -> Iterator[None]:
    """The body of :meth:`FamilyAdapter.text_encoders_released` (see there): park the encoders
    on ``park`` and mark the adapter's text released; both undone on exit."""
    encoders = adapter.text_encoders()
    homes = [next(m.parameters()).device for m in encoders]
    for m in encoders:
        m.to(park)
    if any(h.type == "cuda" for h in homes) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    was = adapter.__dict__.get("_text_released", False)
    adapter._text_released = True
    try:
        yield
    finally:
        adapter._text_released = was
        for m, home in zip(encoders, homes):
            m.to(home)


@contextmanager
def gradient_checkpointing(adapter, keep: Sequence[str] = ()) -> Iterator[None]:
    """The body of :meth:`FamilyAdapter.gradient_checkpointing` (see there): wrap the forward of
    each of ``adapter.checkpoint_units()`` holding no layer of ``keep`` in ``torch.utils.checkpoint``
    (non-reentrant, only while grad is enabled); the stock forwards come back on exit."""
    from torch.utils.checkpoint import checkpoint

    den = adapter.denoiser
    units = [u for u in adapter.checkpoint_units() if not any(k == u or k.startswith(u + ".") for k in keep)]
    wrapped = []
    for name in units:
        module = den.get_submodule(name)
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = forward
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            module.__dict__.pop("forward", None)

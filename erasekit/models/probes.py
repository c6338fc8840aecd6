"""Attention probes: record the attention of image queries over text keys, for any family.

:meth:`FamilyAdapter.probe` opens :func:`probing`. The plumbing here is family-independent: an
:class:`AttentionProbe` holds the maps; while it is open every probed attention module runs a
:class:`_RecordingProcessor` that hands its inputs to a family-made recorder (the adapter's
``_make_recorder``), which computes the map with :func:`record_attention`, then runs the stock
processor for the output. What differs between families (which modules, how queries and keys are
formed, what the denoiser's forward call tells about the image grid) is the adapter's part:
``_default_probe_layers``, ``_probe_modules``, ``_make_recorder``, ``_capture_forward_inputs``
and ``_layer_resolution``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class AttentionProbe:
    """Attention maps recorded while a :meth:`FamilyAdapter.probe` context is open.

    ``maps[layer]`` is a LIST with one tensor per forward call, in call order, each of shape
    (B, heads, HW, n_cols) with HW the image tokens (row-major over the grid returned by
    :meth:`resolution`) and n_cols the chosen text columns (``token_indices`` or all text
    tokens). Values are softmax probabilities in float32, with gradients when grad is enabled.
    SD cross-attention: the text tokens are all the keys, so a full row sums to 1.
    Flux joint attention: the softmax runs over text AND image keys, so the stored text-column
    mass is <= 1; with ``include_image_keys=True`` every image-key column is appended after the
    text columns and the full row sums to 1.
    Recorded maps keep their autograd graphs alive until :meth:`clear` or the probe is dropped.
    With gradient checkpointing, the recomputation in backward records a second time.
    """

    def __init__(self, adapter, layers, token_indices, include_image_keys, max_chunk_elements):
        self.adapter = adapter
        self.layers = list(layers)
        self.token_indices = None if token_indices is None else [int(i) for i in token_indices]
        self.include_image_keys = include_image_keys
        self.max_chunk_elements = max_chunk_elements
        self.maps: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        self.context: dict[str, Any] = {}  # per-forward inputs the family needs (grid, text length)

    def clear(self) -> None:
        """Forget every recorded map (keeps the probe installed)."""
        for name in self.maps:
            self.maps[name] = []

    def last(self, layer: str) -> Tensor:
        """The map of the most recent call at ``layer``: (B, heads, HW, n_cols)."""
        if not self.maps.get(layer):
            raise KeyError(f"no attention recorded at {layer!r}")
        return self.maps[layer][-1]

    def resolution(self, layer: str) -> tuple[int, int]:
        """(h, w) of the image-token grid at ``layer`` for the most recent forward call."""
        return self.adapter._layer_resolution(self, layer)

    def _columns(self, text_len: int, n_keys: int, device) -> Tensor:
        text = torch.arange(text_len) if self.token_indices is None else torch.tensor(self.token_indices)
        if self.token_indices is not None and (text.min() < 0 or text.max() >= text_len):
            raise IndexError(f"token indices {self.token_indices} out of range for {text_len} text tokens")
        if self.include_image_keys and n_keys > text_len:
            text = torch.cat([text, torch.arange(text_len, n_keys)])
        return text.to(device)


def record_attention(
    probe: AttentionProbe, layer: str, q: Tensor, k: Tensor, text_len: int, mask: Tensor | None = None
) -> None:
    """Append softmax(q k^T / sqrt(d)) restricted to the probe's columns to ``probe.maps``.

    q: (B, H, Q, D) image queries; k: (B, H, S, D) every key of the softmax, the first
    ``text_len`` of which are the text tokens (SD: all of them; Flux: [text, image]).
    ``mask``: optional bool (True = attend) or additive mask broadcastable to (B, H, Q, S).
    Computed in float32 and chunked over heads so that at most ``probe.max_chunk_elements``
    logits exist at once.
    """
    b, h, nq, d = q.shape
    cols = probe._columns(text_len, k.shape[2], q.device)
    step = max(1, probe.max_chunk_elements // max(1, b * nq * k.shape[2]))
    scale = 1.0 / math.sqrt(d)  # what scaled_dot_product_attention uses by default
    chunks = []
    for h0 in range(0, h, step):
        qs, ks = q[:, h0 : h0 + step].float(), k[:, h0 : h0 + step].float()
        logits = qs @ ks.transpose(-1, -2) * scale
        if mask is not None:
            m = mask if mask.shape[1] == 1 else mask[:, h0 : h0 + step]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        chunks.append(logits.softmax(dim=-1).index_select(-1, cols))
    probe.maps[layer].append(torch.cat(chunks, dim=1))


class _RecordingProcessor:
    """Wraps an attention processor: records maps from the inputs, then runs the original.

    The output is the original processor's, untouched, so probing never changes the model.
    """

    def __init__(self, inner, record: Callable[..., None]):
        self.inner = inner
        self.record = record
        # Attention.forward drops kwargs that processor.__call__ does not declare (it inspects
        # the signature); expose the inner processor's signature so nothing extra is dropped.
        proxy = lambda *a, **kw: type(self).__call__(self, *a, **kw)
        proxy.__signature__ = inspect.signature(inner.__call__)
        self.__dict__["__call__"] = proxy

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.record(attn, hidden_states, *args, **kwargs)
        return self.inner(attn, hidden_states, *args, **kwargs)

    def __getattr__(self, name):  # backend settings etc. live on the inner processor
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _swap_processor(attn: nn.Module, new) -> Callable[[], None]:
    """Install ``new`` as ``attn.processor``; return a function that restores the original."""
    old = attn.processor
    if isinstance(old, nn.Module):
        # Keep a module processor (and its weights) registered; shadow it in __dict__.
        object.__setattr__(attn, "processor", new)
        return lambda: attn.__dict__.pop("processor", None)
    attn.processor = new
    return lambda: setattr(attn, "processor", old)


@contextmanager
def probing(
    adapter,
    layers: list[str] | None = None,
    token_indices: list[int] | None = None,
    include_image_keys: bool = False,
    max_chunk_elements: int = 1 << 26,
) -> Iterator[AttentionProbe]:
    """The body of :meth:`FamilyAdapter.probe` (see there): wrap the processors of ``adapter``'s
    probed attention modules and capture the denoiser's forward inputs while the block runs;
    the original processors come back on exit, also on exceptions."""
    layers = adapter._default_probe_layers() if layers is None else list(layers)
    modules = adapter._probe_modules(layers)
    probe = AttentionProbe(adapter, layers, token_indices, include_image_keys, max_chunk_elements)
    restore: list[Callable[[], None]] = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: adapter._capture_forward_inputs(probe, args, kwargs),
        with_kwargs=True,
    )
    try:
        for name, attn in modules.items():
            wrapped = _RecordingProcessor(attn.processor, adapter._make_recorder(probe, name))
            restore.append(_swap_processor(attn, wrapped))
        yield probe
    finally:
        for undo in reversed(restore):
            undo()
        hook.remove()

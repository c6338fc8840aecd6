"""Keyword column zeroing: the naive inference-time baseline of EraseAnything (ALGORITHMS.md,
"Keyword column zeroing"): every cross-/joint-attention pays no attention to the keyword's text
tokens, in any prompt that contains the keyword. It erases the literal word and nothing else
(synonyms and paraphrases pass): it shows why the real methods exist.

Mechanism. Setting the attention probabilities of the keyword's columns to zero (without
renormalising the row, as prompt-to-prompt's re-weighting does) is the same as zeroing the
keyword's rows of the attention VALUES: ``P V`` only meets column j of P through row j of V.
So the edit multiplies the keyword's rows of every text value projection's output (the
adapter's text_proj points with role "v": SD attn2.to_v; Flux dual-stream add_v_proj) by
``1 - scale``. This works with every attention backend (no processor that recomputes softmax)
and leaves other rows, and every prompt without the keyword, bit-identical. Flux single-stream
blocks (text and image already in one sequence) are not covered.

Where is the keyword? Per prompt, at inference, by a token-id rule: a forward hook on the
adapter's main text encoder sees each prompt's ids and finds the keyword's ids (tokenized alone,
no special tokens; also its lower-case, Capitalised and UPPER-case spellings) as contiguous runs.
It remembers a fingerprint of the resulting embedding rows; a pre-hook on the denoiser matches
each row of the conditioning it receives against those fingerprints (once per conditioning
tensor), so stock pipeline calls, adapter.generate and adapter.predict on adapter.encode(...)
outputs are all covered, whatever the batch layout (CFG halves, num_images_per_prompt).
Embeddings made elsewhere (not by the text encoder, or modified afterwards, e.g. soft prompts)
are not recognised and pass unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..edits import Edit
from ..models import adapter_for
from .config import MethodConfig, setting
from .registry import register_method

NAME = "keyword_zeroing"
_FINGERPRINT_DIMS = 8
_REMEMBERED = 256  # embedding rows with the keyword that are remembered


@dataclass
class KeywordZeroingConfig(MethodConfig):
    """Settings; nothing is trained."""

    keywords: str = setting("", "further keywords to zero besides the concept", sep=";")
    case_variants: bool = setting(True, "also match lower / Capitalised / UPPER spellings")

    @classmethod
    def fast(cls, **overrides) -> "KeywordZeroingConfig":
        return cls(**overrides)


def fit(pipe, concept: str, config: KeywordZeroingConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Instant: the Edit holds only the keywords (no tensors)."""
    config = config or KeywordZeroingConfig()
    adapter = adapter_for(pipe)
    keywords = [concept.strip()] + [k.strip() for k in config.keywords.split(";") if k.strip()]
    if not keywords[0]:
        raise ValueError("empty keyword")
    return Edit(
        method=NAME,
        concepts=[concept.strip()],
        family=adapter.family,
        base_model=str(getattr(pipe, "name_or_path", "") or ""),
        tensors={},
        hyperparameters=asdict(config) | {"keyword_list": keywords},
        metrics={"train_seconds": 0.0},
    )


def keyword_id_runs(tokenizer, keywords: list[str], case_variants: bool = True) -> list[list[int]]:
    """The token-id runs to look for: each keyword tokenized without special tokens."""
    spellings = []
    for k in keywords:
        spellings += [k, k.lower(), k.capitalize(), k.upper()] if case_variants else [k]
    runs = []
    for s in dict.fromkeys(spellings):
        ids = list(tokenizer(s, add_special_tokens=False)["input_ids"])
        if ids and ids not in runs:
            runs.append(ids)
    return runs


def find_runs(ids: list[int], runs: list[list[int]], special: set[int]) -> list[int]:
    """Positions covered by any run in ``ids`` (runs never include special tokens)."""
    hit = set()
    for run in runs:
        k = len(run)
        for i in range(len(ids) - k + 1):
            if ids[i : i + k] == run and not special.intersection(run):
                hit.update(range(i, i + k))
    return sorted(hit)


class _KeywordTracker:
    """Finds the keyword's positions in the conditioning of each denoiser call."""

    def __init__(self, adapter, keywords: list[str], case_variants: bool, scale: float):
        self.adapter = adapter
        tokenizer, encoder = adapter.main_text_encoder()
        self.runs = keyword_id_runs(tokenizer, keywords, case_variants)
        self.special = set(tokenizer.all_special_ids)
        self.factor = 1.0 - float(scale)
        self.seen: deque[tuple[Tensor, Tensor]] = deque(maxlen=_REMEMBERED)  # (fingerprint, position mask)
        # (conditioning tensor, its version, row masks): pipelines pass the same tensor at every
        # step. Holding the tensor keeps its memory from being reused by another one.
        self.cache: tuple[Tensor, int, Tensor | None] | None = None
        self.mask: Tensor | None = None  # (B, L) bool for the running denoiser call
        self.handles = [
            encoder.register_forward_hook(self._on_encode, with_kwargs=True),
            adapter.denoiser.register_forward_pre_hook(self._on_denoise, with_kwargs=True),
            adapter.denoiser.register_forward_hook(self._after_denoise),
        ]
        self.handles += [
            adapter.add_output_edit(point, self._zero)
            for point in adapter.attachment_points("text_proj")
            if point.role == "v"
        ]

    def _on_encode(self, _module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if ids is None or hidden is None:
            return
        for row_ids, row in zip(ids.tolist(), hidden):
            positions = find_runs(row_ids, self.runs, self.special)
            if positions:
                mask = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
                mask[positions] = True
                self.seen.append((row[:, :_FINGERPRINT_DIMS].detach().clone(), mask))
        self.cache = None  # a new encoding may make a known tensor match

    def _masks(self, embeds: Tensor) -> Tensor | None:
        if self.cache is not None and self.cache[0] is embeds and self.cache[1] == embeds._version:
            return self.cache[2]
        masks = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for b, row in enumerate(embeds):
            head = row[:, :_FINGERPRINT_DIMS]
            for fingerprint, mask in reversed(self.seen):
                if fingerprint.shape == head.shape and torch.equal(fingerprint.to(head.device, head.dtype), head):
                    masks[b] = mask.to(masks.device)
                    break
        result = masks if masks.any() else None
        self.cache = (embeds, embeds._version, result)
        return result

    def _on_denoise(self, _module, args, kwargs) -> None:
        _, _, cond, _ = self.adapter.call_inputs(args, kwargs)
        self.mask = self._masks(cond.embeds) if self.factor != 1.0 else None

    def _after_denoise(self, *_args) -> None:
        self.mask = None

    def _zero(self, h: Tensor) -> Tensor:
        mask = self.mask
        if mask is None or h.dim() != 3 or h.shape[:2] != mask.shape:
            return h
        return torch.where(mask[..., None], h * self.factor, h)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(adapter, edit: Edit, scale: float = 1.0) -> _KeywordTracker:
    """Zero (scale 1) or damp (0 < scale < 1: factor 1 - scale) the attention to the keywords;
    scale 0 changes nothing. Only prompts encoded after attaching are recognised."""
    hp = edit.hyperparameters
    return _KeywordTracker(adapter, hp.get("keyword_list", edit.concepts), hp.get("case_variants", True), scale)


PRESETS = {"paper": KeywordZeroingConfig, "fast": KeywordZeroingConfig.fast}
register_method(NAME, KeywordZeroingConfig, PRESETS, fit, attach)

"""Edit kind "inference_hook": an edit with settings and no weights, acting through hooks at
inference (SLD's safe guidance, keyword zeroing, SAFREE).

Such an edit names its hook in ``hyperparameters["hook"]`` (edits saved before: inferred from
the method) and keeps the hook's settings in its other hyperparameters. The hooks are classes
registered here by name with :func:`register_hook`; each is built as
``Hook(adapter, edit, scale)``, registers its torch hooks on the model at once, and is the
attachment (``set_scale``, ``detach``). Hooks skip their work while ``edits_disabled()`` is
active. Several hook edits compose in the order they were applied.

- ``safe_guidance`` (SLD): a forward hook on the denoiser replaces the conditional prediction
  by ``c - scale * g_s`` (see :class:`SafeGuidance`);
- ``keyword_zeroing``: the keyword's rows of every text value projection are multiplied by
  ``1 - scale`` in prompts that hold the keyword (see :class:`KeywordZeroing`);
- ``safree`` (SAFREE): the trigger words' text embeddings are projected away from the keywords'
  subspace for the first denoising steps (:mod:`.safree_hook`, its own module, registered when
  :mod:`erasekit.edits` is imported).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..models.conditioning import id_run_starts, phrase_ids, run_is_whole_words
from .artifact import Edit
from .kind import Attachment, EditKind, register_kind

NAME = "inference_hook"
HOOKS: dict[str, type] = {}
# The hook of each method's edits, for edits saved before ``hyperparameters["hook"]`` existed.
LEGACY_HOOKS = {"sld": "safe_guidance", "keyword_zeroing": "keyword_zeroing"}


def register_hook(name: str):
    """Class decorator: make the class the inference hook ``name`` (built as ``cls(adapter,
    edit, scale)``, with ``set_scale`` and ``detach``)."""

    def register(cls):
        HOOKS[name] = cls
        cls.hook_name = name
        return cls

    return register


def hook_name(edit: Edit) -> str:
    """The hook an inference-hook edit names (or its method's, for an edit saved before)."""
    return edit.hyperparameters.get("hook") or LEGACY_HOOKS.get(edit.method, "")


@register_kind
class InferenceHook(EditKind):
    """Settings plus a named hook; hooks compose in the order they were applied."""

    name = NAME
    combine = "hooks run in the order the edits were applied"

    def check(self, edit: Edit) -> str | None:
        """An inference hook holds settings only, and names a known hook."""
        if edit.tensors:
            return f"an inference-hook edit holds no tensors, this one has {sorted(edit.tensors)[:2]}"
        if hook_name(edit) not in HOOKS:
            return f"unknown inference hook {hook_name(edit)!r}; known: {', '.join(HOOKS)}"
        return None

    def attach(self, adapter, edit: Edit, scale: float = 1.0) -> Attachment:
        """Build the edit's hook on ``adapter``'s model with strength ``scale``."""
        name = hook_name(edit)
        if name not in HOOKS:
            raise ValueError(
                f"edit {edit.id} ({edit.method}) names unknown inference hook {name!r}; known: {', '.join(HOOKS)}"
            )
        return HOOKS[name](adapter, edit, scale)


# ---- safe guidance (SLD) -----------------------------------------------------------------------


@dataclass(frozen=True)
class SafeGuidanceSettings:
    """SLD's settings, read from the edit's hyperparameters (every SLD edit holds them all)."""

    negative_prompt: str
    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    mom_beta: float

    @classmethod
    def of(cls, edit: Edit) -> SafeGuidanceSettings:
        """The settings stored in ``edit``; ValueError naming what is missing."""
        hp = edit.hyperparameters
        missing = [f.name for f in fields(cls) if f.name not in hp]
        if missing:
            raise ValueError(f"edit {edit.id} lacks the safe-guidance settings {missing}")
        return cls(**{f.name: hp[f.name] for f in fields(cls)})


def sld_term(c: Tensor, u: Tensor, s: Tensor, momentum: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """(g_s, new momentum) of the safe pipeline's equations 4, 6, 7 and 8; ``cfg`` has
    guidance_scale, threshold, momentum_scale and mom_beta. Tensors of one shape (B, ...)."""
    diff = c - s
    mu = torch.clamp(diff.abs() * cfg.guidance_scale, max=1.0)
    mu = torch.where(diff >= cfg.threshold, torch.zeros_like(mu), mu)
    g_s = (s - u) * mu + cfg.momentum_scale * momentum
    return g_s, cfg.mom_beta * momentum + (1 - cfg.mom_beta) * g_s


def _sample(output):
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output["sample"]


def _with_sample(output, sample: Tensor):
    if isinstance(output, Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(**{**dict(output), "sample": sample})


@register_hook("safe_guidance")
class SafeGuidance(Attachment):
    """SLD: guide away from the edit's safety concept (``hyperparameters["safety_concept"]``);
    ``scale`` multiplies the safety term (0: the base model).

    A forward hook on the denoiser replaces the conditional prediction c by ``c - scale * g_s``;
    in a CFG batch (two halves with equal latents and timesteps) u is the first half, otherwise
    rows equal to the negative prompt's embedding pass unchanged and u is predicted. A call at
    a timestep not below the previous one starts a new trajectory (momentum 0, step 0).
    """

    def __init__(self, adapter, edit: Edit, scale: float = 1.0):
        config = SafeGuidanceSettings.of(edit)
        safety_concept = edit.hyperparameters.get("safety_concept", edit.concepts[0])
        self.adapter, self.config, self.scale = adapter, config, float(scale)
        self.safety = adapter.encode([safety_concept])
        self.negative = adapter.encode([config.negative_prompt])
        self.busy = False  # our own extra passes go through the hook too
        self.momentum: Tensor | None = None
        self.step = 0
        self.last_t: float | None = None
        self.handle = adapter.denoiser.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, output):
        if self.busy or self.scale == 0 or not self.adapter.edits_enabled:
            return None
        adapter = self.adapter
        latents, t, cond, guidance = adapter.call_inputs(args, kwargs)
        out = _sample(output)
        b, half = latents.shape[0], latents.shape[0] // 2
        self.busy = True
        try:
            with torch.no_grad():
                if b % 2 == 0 and torch.equal(latents[:half], latents[half:]) and torch.equal(t[:half], t[half:]):
                    rows = torch.arange(half, b, device=out.device)
                    u = out[:half].detach()
                else:
                    neg = self.negative.embeds[0].to(cond.embeds.device, cond.embeds.dtype)
                    keep = [
                        i for i, row in enumerate(cond.embeds) if row.shape != neg.shape or not torch.equal(row, neg)
                    ]
                    if not keep:
                        return None
                    rows = torch.tensor(keep, device=out.device)
                    u = adapter.predict(latents[rows], t[rows], self.negative, guidance)
                s = adapter.predict(latents[rows], t[rows], self.safety, guidance)
        finally:
            self.busy = False
        c = out[rows]
        g_s = self._advance(c.detach(), u.to(c.dtype), s.to(c.dtype), float(t[rows].max()))
        if g_s is None:
            return None
        return _with_sample(output, out.index_copy(0, rows, c - self.scale * g_s))

    def _advance(self, c: Tensor, u: Tensor, s: Tensor, t: float) -> Tensor | None:
        """One SLD step: update momentum; g_s once past warm-up, else None."""
        if self.momentum is None or self.momentum.shape != c.shape or self.last_t is None or t >= self.last_t:
            self.momentum, self.step = torch.zeros_like(c), 0
        g_s, self.momentum = sld_term(c, u, s, self.momentum, self.config)
        active = self.step >= self.config.warmup_steps
        self.step += 1
        self.last_t = t
        return g_s if active else None

    def set_scale(self, scale: float) -> None:
        """The multiplier of the safety term."""
        self.scale = float(scale)

    def detach(self) -> None:
        """Unregister the hook."""
        self.handle.remove()


# ---- keyword zeroing ---------------------------------------------------------------------------

_FINGERPRINT_DIMS = 8
_REMEMBERED = 256  # embedding rows with the keyword that are remembered


def keyword_id_runs(tokenizer, keywords: list[str], case_variants: bool = True) -> list[list[int]]:
    """The token-id runs to look for: each keyword tokenized without special tokens, as the
    models' token spans tokenize a phrase (:func:`erasekit.models.conditioning.phrase_ids`)."""
    spellings = []
    for k in keywords:  # title(): "van gogh" -> "Van Gogh", which capitalize() misses for case-sensitive T5
        spellings += [k, k.lower(), k.capitalize(), k.title(), k.upper()] if case_variants else [k]
    runs = []
    for s in dict.fromkeys(spellings):
        ids = phrase_ids(tokenizer, s)
        if ids and ids not in runs:
            runs.append(ids)
    return runs


def find_runs(ids: list[int], runs: list[list[int]], special: set[int], tokenizer=None) -> list[int]:
    """Sorted positions of ``ids`` covered by any occurrence of any run (overlapping occurrences
    included; a run holding a special id never matches), found by the models' id-run search.
    With the ``tokenizer`` of ``ids``, only occurrences that are whole words count, as in the
    models' token spans (:func:`erasekit.models.conditioning.run_is_whole_words`): "gun" is
    not found in "handgun"."""
    hit = set()
    for run in runs:
        for i in id_run_starts(ids, run, special):
            if tokenizer is None or run_is_whole_words(tokenizer, ids, i, i + len(run), special):
                hit.update(range(i, i + len(run)))
    return sorted(hit)


@register_hook("keyword_zeroing")
class KeywordZeroing(Attachment):
    """Zero (scale 1) or damp (0 < scale < 1: factor 1 - scale) the attention to the keywords
    (``hyperparameters["keyword_list"]``, ``["case_variants"]``); scale 0 changes nothing.

    A forward hook on the main text encoder finds the keywords' token-id runs (whole words only)
    in each prompt and remembers a fingerprint of the embedding rows; a pre-hook on the denoiser
    matches the rows of the conditioning it receives; output edits on the adapter's "text_proj"
    points of role "v" multiply the keyword's rows of the values by ``1 - scale``. Only prompts
    encoded after attaching are recognised.
    """

    def __init__(self, adapter, edit: Edit, scale: float = 1.0):
        hp = edit.hyperparameters
        keywords, case_variants = hp.get("keyword_list", edit.concepts), hp.get("case_variants", True)
        self.adapter = adapter
        tokenizer, encoder = adapter.main_text_encoder()
        self.tokenizer = tokenizer
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
            positions = find_runs(row_ids, self.runs, self.special, self.tokenizer)
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

    def set_scale(self, scale: float) -> None:
        """Factor ``1 - scale`` on the keyword's value rows."""
        self.factor = 1.0 - float(scale)

    def detach(self) -> None:
        """Unregister every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []

"""The inference hook "safree": SAFREE's prompt-embedding projection at inference (Yoon et al.,
ICLR 2025; the method and its settings: :mod:`erasekit.methods.safree`), and its math.

Mechanism, the same for every family (only the adapter's surface is used):

- at attach, the keywords are encoded by the adapter's main text encoder (SD: CLIP; Flux: T5)
  and their *pooled* vectors (the encoder's ``pooler_output`` where it has one, as CLIP's EOS
  state after the final layer norm; else the mean of its outputs over the real tokens, words
  and EOS, as for T5) span the toxic subspace C;
- a forward hook on that encoder sees every prompt the pipeline encodes. For each one with at
  least two word tokens (BOS/EOS/padding are never words) it encodes the prompt once more per
  word with that word deleted (the rest shifted left, one more padding token at the end) and
  flags the trigger words (:func:`trigger_mask`); for a prompt with a trigger it projects the
  token embeddings (:func:`project_tokens`), computes the step budget t' from how far the
  projection moved them (:func:`step_budget`), and remembers a fingerprint of the embedding rows
  with the projected rows of the flagged positions;
- a forward pre-hook on the denoiser recognises those rows in the conditioning it receives
  (stock pipeline calls, ``adapter.generate``, ``adapter.predict`` on ``adapter.encode``
  outputs) and, while the call's sampler step is within the budget (:func:`in_budget`),
  replaces the flagged positions by ``lerp(p, p_safe, scale)``; every other position, row, call
  and prompt stays bit-identical. Steps are counted along the trajectory (a call at a timestep
  above the previous one starts a new one), out of the pipeline scheduler's number of timesteps
  when the call's timestep is one of them (a stock pipeline call), else out of
  ``adapter.generation_steps``.
- optional: the negative-prompt switch replaces the empty-prompt (unconditional) rows by the
  encoding of the keywords joined with ", " at every step (the release's hidden negative prompt);
  latent re-attention (:func:`low_frequency_reattention`) on the decoder's skip features of the
  filtered rows, against those of one more denoiser pass with the original rows (families with
  skip features only: ``adapter.skip_stages()``).

Everything is skipped while ``adapter.edits_disabled()`` is active. The pooled CLIP vector that
Flux reads beside T5 is not changed. Prompts encoded before the edit was applied, or embeddings
made elsewhere (soft prompts), are not recognised and pass unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.conditioning import Conditioning
from .artifact import Edit
from .inference_hook import register_hook
from .kind import Attachment

_FINGERPRINT_DIMS = 8
_REMEMBERED = 256  # prompts with a trigger that are remembered
_CACHED = 4  # conditioning tensors whose matches are cached (Flux true CFG alternates two)
_LOO_CHUNK = 64  # leave-one-out prompts per encoder call
RANK_RTOL = 1e-6  # singular values below this fraction of the largest count as dependent (pinv's cut-off)
BETA_SCALE = 10.0  # the release's 10 * beta in the calibrated budget curve


# ---- the math --------------------------------------------------------------------------------


class Subspace:
    """The span of K vectors in R^D, kept as an orthonormal basis U (D, r), r <= K the rank.

    ``project(x)`` is ``P x`` with ``P = V (V^T V)^+ V^T`` for V = vectors^T (D, K): the
    pseudo-inverse makes dependent vectors (a keyword given twice, or a sum of others) span
    the same space. Computed in float64 from the SVD of V, without forming the D x D matrix.
    """

    def __init__(self, vectors: Tensor):
        """``vectors``: (K, D), one vector per row."""
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise ValueError(f"a subspace needs (K, D) vectors with K >= 1, got {tuple(vectors.shape)}")
        u, s, _ = torch.linalg.svd(vectors.detach().double().T, full_matrices=False)
        keep = s > RANK_RTOL * s.max() if float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
        self.basis = u[:, keep]  # (D, r)

    @property
    def rank(self) -> int:
        """r, the dimension of the span."""
        return self.basis.shape[1]

    def project(self, x: Tensor) -> Tensor:
        """P x for x (..., D); float64 (..., D)."""
        u = self.basis.to(x.device)
        return (x.double() @ u) @ u.T

    def reject(self, x: Tensor) -> Tensor:
        """(I - P) x for x (..., D); float64 (..., D)."""
        return x.double() - self.project(x)

    def matrix(self) -> Tensor:
        """P itself, (D, D) float64 (for small D: tests, inspection)."""
        return self.basis @ self.basis.T


def trigger_mask(distances: Tensor, alpha: float) -> Tensor:
    """The trigger words of a prompt (paper Eq. 2-4): ``distances`` (n,) holds
    d_i = ||(I - P_C) p_\\i||, the distance of the prompt without word i from the toxic subspace;
    word i is a trigger iff d_i >= (1 + alpha) * mean_{j != i} d_j (removing it moves the prompt
    away from the subspace more than removing the others does). Bool (n,); all False for n < 2."""
    n = distances.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool, device=distances.device)
    d = distances.double()
    others = (d.sum() - d) / (n - 1)
    return d >= (1 + alpha) * others


def project_tokens(tokens: Tensor, toxic: Subspace, prompt: Subspace, order: str = "paper") -> Tensor:
    """The projected token embeddings (paper Eq. 5), tokens (N, D) -> float64 (N, D):
    ``order="paper"``: P_I (I - P_C) p; ``"release"``: (I - P_C) P_I p (the authors' code
    applies the factors in this order). P_C: ``toxic``; P_I: ``prompt``, the span of the
    leave-one-out pooled vectors."""
    if order == "paper":
        return prompt.project(toxic.reject(tokens))
    if order == "release":
        return toxic.reject(prompt.project(tokens))
    raise ValueError(f"unknown projection order {order!r}; known: paper, release")


def step_budget(beta: float, curve: str = "release", up_t: float = 10.0, t0: float = 5.333, k: float = 2.5) -> int:
    """t', the self-validating filter's step budget, from beta = 1 - mean cos(p, p_proj):
    ``"release"`` (the calibrated curve that made the paper's numbers): round(up_t *
    sigmoid(2k (10 beta - t0))), with (t0, k) = (5.333, 2.5) for nudity: 0 for beta < 0.45 and
    up_t for beta >= 0.6; ``"paper"`` (Eq. 6): round(up_t * sigmoid(beta)). Monotone in beta."""
    if curve == "release":
        x = 2 * k * (BETA_SCALE * beta - t0)
    elif curve == "paper":
        x = beta
    else:
        raise ValueError(f"unknown step-budget curve {curve!r}; known: release, paper")
    x = max(min(x, 700.0), -700.0)  # exp stays finite
    return int(round(up_t / (1 + math.exp(-x))))


def in_budget(step: int, steps: int, t_prime: int, reference_steps: int = 50) -> bool:
    """Whether sampler step ``step`` (0-based) of ``steps`` uses the projected embeddings: its
    position counted in ``reference_steps``-step units (the budget's units; 0: the run's own
    steps) is at most t'. With steps == reference_steps: step <= t' (the release's rule; step 0
    always). A 25-step run with the release's 50-step budget of 10 projects steps 0..5."""
    ref = reference_steps or steps
    return step * ref <= t_prime * steps


def low_frequency_reattention(filtered: Tensor, original: Tensor, s: float, window: int = 1) -> Tensor:
    """Latent re-attention (paper Eq. 7-8) on skip features (R, C, h, w) of the filtered branch
    against the original-prompt branch's: in the Fourier domain, at the low frequencies
    |f_y|, |f_x| <= ``window`` (a (2 window + 1)^2 box around DC) where
    |F(filtered)| > |F(original)|, the coefficients are multiplied by ``s``; inverse FFT. The box
    and the condition are symmetric under f -> -f, so the result is real and no other frequency
    moves. Samples with no such coefficient (identical branches, s == 1) are returned
    bit-identical. (The release's FreeU box is the 2 window x 2 window one [c - window, c +
    window) of the shifted spectrum, not symmetric, and it replaces the coefficients by the
    constant s: neither is copied.)"""
    if s == 1.0 or filtered.numel() == 0:
        return filtered
    h, w = filtered.shape[-2:]
    f_filtered = torch.fft.fftshift(torch.fft.fft2(filtered.float()), dim=(-2, -1))
    f_original = torch.fft.fftshift(torch.fft.fft2(original.to(filtered.device).float()), dim=(-2, -1))
    box = torch.zeros(h, w, dtype=torch.bool, device=filtered.device)
    box[max(h // 2 - window, 0) : h // 2 + window + 1, max(w // 2 - window, 0) : w // 2 + window + 1] = True
    mask = box & (f_filtered.abs() > f_original.abs())
    touched = mask.flatten(1).any(dim=1)  # (R,)
    if not bool(touched.any()):
        return filtered
    scaled = torch.where(mask, f_filtered * s, f_filtered)
    out = torch.fft.ifft2(torch.fft.ifftshift(scaled, dim=(-2, -1))).real.to(filtered.dtype)
    return torch.where(touched.view(-1, *([1] * (filtered.dim() - 1))), out, filtered)


def schedule_index(timesteps: Tensor, t: float) -> int | None:
    """The index of timestep ``t`` in a sampler's ``timesteps`` (N,): the nearest one when it is
    closer than half the gap to its neighbours and than 1% of t (a bf16 Flux call divides t by
    1000 in bf16); None when t is not one of them (or there are none)."""
    ts = timesteps.detach().double().cpu().reshape(-1)
    if not ts.numel():
        return None
    gaps = (ts - t).abs()
    i = int(gaps.argmin())
    neighbours = [abs(float(ts[i] - ts[j])) for j in (i - 1, i + 1) if 0 <= j < len(ts) and ts[j] != ts[i]]
    spacing = min(neighbours, default=math.inf)
    return i if float(gaps[i]) <= min(0.5 * spacing, 1e-2 * max(abs(t), 1.0)) else None


# ---- the hook ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafreeSettings:
    """The hook's settings, read from the edit's hyperparameters (every SAFREE edit holds them)."""

    keyword_list: list
    alpha: float
    order: str
    budget: str
    up_t: float
    reference_steps: int
    t0: float
    k: float
    negative_prompt: bool
    latent_reattention: bool
    lra_window: int
    lra_scales: str

    @classmethod
    def of(cls, edit: Edit) -> SafreeSettings:
        """The settings stored in ``edit``; ValueError naming what is missing."""
        hp = edit.hyperparameters
        missing = [f.name for f in fields(cls) if f.name not in hp]
        if missing:
            raise ValueError(f"edit {edit.id} lacks the SAFREE settings {missing}")
        return cls(**{f.name: hp[f.name] for f in fields(cls)})

    def stage_scales(self) -> list[float]:
        """LRA's s per decoder stage (0: the first to run); stages past the list keep 1."""
        return [float(x) for x in self.lra_scales.split(",") if x.strip()]


@dataclass
class TriggerAnalysis:
    """What SAFREE found in one prompt. ``words``: the word positions (along L); ``distances``:
    d_i per word (n,); ``flagged``: the trigger positions; ``projected``: p_safe at the flagged
    positions (len(flagged), D), in the embeddings' dtype; ``beta``: 1 - mean cos(p, p_proj) over
    the real tokens; ``t_prime``: the step budget."""

    words: list[int]
    distances: Tensor
    flagged: list[int]
    projected: Tensor
    beta: float
    t_prime: int


@dataclass
class _Record:
    fingerprint: Tensor  # (L, _FINGERPRINT_DIMS)
    positions: Tensor  # (k,) long
    projected: Tensor  # (k, D)
    t_prime: int


def _sequence_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


@register_hook("safree")
class Safree(Attachment):
    """SAFREE at inference (see the module docstring); ``scale`` interpolates every change
    between the original embeddings (0: no effect) and SAFREE's (1)."""

    def __init__(self, adapter, edit: Edit, scale: float = 1.0):
        self.settings = settings = SafreeSettings.of(edit)
        keywords = [str(k) for k in settings.keyword_list if str(k).strip()]
        if not keywords:
            raise ConfigError(f"SAFREE edit {edit.id} holds no keyword")
        if settings.latent_reattention and adapter.skip_stages() == 0:
            raise ConfigError(
                f"safree: latent_reattention needs a UNet's up-block skip features; the {adapter.family} family has "
                "none (set latent_reattention=false)"
            )
        self.adapter, self.scale = adapter, float(scale)
        self.tokenizer, self.encoder = adapter.main_text_encoder()
        self.special = set(self.tokenizer.all_special_ids)
        self.busy = False  # our own encoder and denoiser passes go through the hooks too
        self.warned_hidden_states = False
        with torch.no_grad():
            self.toxic = Subspace(self._pooled(adapter.main_token_ids(keywords)))
            self.empty = self.negative = None
            if settings.negative_prompt:
                self.empty = adapter.encode([""])
                self.negative = adapter.encode([", ".join(keywords)])
        self.seen: deque[_Record] = deque(maxlen=_REMEMBERED)
        self.cache: deque[tuple[Tensor, int, list, list]] = deque(maxlen=_CACHED)
        self.last_t: float | None = None
        self.step = 0
        self.lra_scales = settings.stage_scales()
        self.captured: dict[int, tuple[Tensor, ...]] | None = None
        self.lra_rows: Tensor | None = None
        self.handles = [
            self.encoder.register_forward_hook(self._on_encode, with_kwargs=True),
            adapter.denoiser.register_forward_pre_hook(self._on_denoise, with_kwargs=True),
            adapter.denoiser.register_forward_hook(self._after_denoise),
        ]
        if settings.latent_reattention:
            self.handles.append(adapter.add_skip_edit(self._skip))

    # ---- text side ---------------------------------------------------------------------------

    def _real_length(self, ids: list[int]) -> int:
        """Positions [0, n) are real tokens (BOS, words, EOS): up to the first EOS, else up to padding."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos is not None and eos in ids:
            return ids.index(eos) + 1
        return sum(1 for i in ids if i != pad) if pad is not None else len(ids)

    def _pooled(self, ids: Tensor) -> Tensor:
        """Pooled vectors (B, D) of ids (B, L): the encoder's pooler_output, else the mean of its
        outputs over the real tokens. Our own pass: the hooks ignore it."""
        out = []
        self.busy = True
        try:
            for chunk in ids.split(_LOO_CHUNK):
                result = self.encoder(input_ids=chunk.to(self.encoder.device))
                pooled = getattr(result, "pooler_output", None)
                if pooled is None:
                    hidden = _sequence_output(result)
                    lengths = torch.tensor([self._real_length(row) for row in chunk.tolist()], device=hidden.device)
                    mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
                    pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
                out.append(pooled.float())
        finally:
            self.busy = False
        return torch.cat(out)

    def analyse_ids(self, ids: Tensor, hidden: Tensor) -> list[TriggerAnalysis | None]:
        """SAFREE's analysis of each prompt: ids (B, L) as the main encoder read them and its
        outputs hidden (B, L, D). None for a prompt with fewer than two word tokens."""
        with torch.no_grad():
            return self._analyse_ids(ids, hidden.detach())

    def _analyse_ids(self, ids: Tensor, hidden: Tensor) -> list[TriggerAnalysis | None]:
        special, pad = self.special, self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        rows, loo = [], []
        for row in ids.tolist():
            real = self._real_length(row)
            words = [i for i in range(real) if row[i] not in special]
            rows.append((real, words))
            for i in words if len(words) >= 2 else ():
                loo.append(row[:i] + row[i + 1 :] + [pad])
        if not loo:
            return [None] * len(rows)
        pooled = self._pooled(torch.tensor(loo, dtype=torch.long))
        results, start = [], 0
        for (real, words), tokens in zip(rows, hidden):
            if len(words) < 2:
                results.append(None)
                continue
            p_loo, start = pooled[start : start + len(words)], start + len(words)
            distances = self.toxic.reject(p_loo).norm(dim=-1)
            mask = trigger_mask(distances, self.settings.alpha)
            flagged = [w for w, m in zip(words, mask.tolist()) if m]
            p = tokens[:real].detach()
            p_proj = project_tokens(p, self.toxic, Subspace(p_loo), self.settings.order)
            beta = 1.0 - float(torch.nn.functional.cosine_similarity(p.double(), p_proj, dim=-1).mean())
            t_prime = step_budget(beta, self.settings.budget, self.settings.up_t, self.settings.t0, self.settings.k)
            projected = p_proj[flagged].to(tokens.dtype)
            results.append(TriggerAnalysis(words, distances.float(), flagged, projected, beta, t_prime))
        return results

    def analyse(self, prompt: str) -> TriggerAnalysis | None:
        """:meth:`analyse_ids` of one prompt, tokenized and encoded as the pipeline does."""
        ids = self.adapter.main_token_ids([prompt])
        self.busy = True
        try:
            with torch.no_grad():
                hidden = _sequence_output(self.encoder(input_ids=ids.to(self.encoder.device)))
        finally:
            self.busy = False
        return self.analyse_ids(ids, hidden)[0]

    def _on_encode(self, _module, args, kwargs, output) -> None:
        if self.busy or not self.adapter.edits_enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if kwargs.get("output_hidden_states"):
            # SD's clip_skip reads an earlier layer (then the final norm): the conditioning is not
            # this output, so it would never match what is remembered here. Say so, once.
            if not self.warned_hidden_states:
                warnings.warn(
                    "SAFREE acts on the text encoder's last layer; this pipeline reads its hidden states "
                    "(clip_skip), so SAFREE leaves those prompts unchanged",
                    stacklevel=2,
                )
                self.warned_hidden_states = True
            return
        hidden = _sequence_output(output)
        analyses = self.analyse_ids(ids.detach().cpu(), hidden)
        for row, found in zip(hidden, analyses):
            if found is not None and found.flagged:
                positions = torch.tensor(found.flagged, dtype=torch.long)
                fingerprint = row[:, :_FINGERPRINT_DIMS].detach().clone()
                self.seen.append(_Record(fingerprint, positions, found.projected, found.t_prime))
        self.cache.clear()  # a new encoding may make a known tensor match

    # ---- denoiser side -----------------------------------------------------------------------

    def _match(self, embeds: Tensor) -> tuple[list[tuple[int, _Record]], list[int]]:
        """(rows holding a remembered prompt with its record, rows of the empty prompt when the
        negative-prompt switch is on), cached per conditioning tensor."""
        for tensor, version, matches, negatives in self.cache:
            if tensor is embeds and version == embeds._version:
                return matches, negatives
        matches, negatives = [], []
        empty = None if self.empty is None else self.empty.embeds[0].to(embeds.device, embeds.dtype)
        for b, row in enumerate(embeds):
            head = row[:, :_FINGERPRINT_DIMS]
            for record in reversed(self.seen):
                fingerprint = record.fingerprint
                if fingerprint.shape == head.shape and torch.equal(fingerprint.to(head.device, head.dtype), head):
                    matches.append((b, record))
                    break
            else:
                if empty is not None and row.shape == empty.shape and torch.equal(row, empty):
                    negatives.append(b)
        self.cache.append((embeds, embeds._version, matches, negatives))
        return matches, negatives

    def _position(self, t: float) -> tuple[int, int]:
        """(step, steps) of a denoiser call at timestep ``t``. The step is counted along the
        trajectory: a call at a timestep above the previous call's starts a new one (step 0), one
        below it is the next step, an equal one the same step (true CFG's second branch). The
        steps are those of the pipeline scheduler's timesteps when ``t`` is one of them (a stock
        pipeline call), else ``adapter.generation_steps``."""
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t
        timesteps = getattr(getattr(self.adapter.pipe, "scheduler", None), "timesteps", None)
        if isinstance(timesteps, Tensor) and schedule_index(timesteps, t) is not None:
            return self.step, timesteps.numel()
        return self.step, max(int(self.adapter.generation_steps), 1)

    def _on_denoise(self, _module, args, kwargs):
        if self.busy:
            return None
        self.lra_rows, self.captured = None, None
        if self.scale == 0 or not self.adapter.edits_enabled:
            return None
        latents, t, cond, guidance = self.adapter.call_inputs(args, kwargs)
        matches, negatives = self._match(cond.embeds)
        if not matches and not negatives:
            return None
        embeds, pooled = cond.embeds, cond.pooled
        step, steps = self._position(float(t.max()))
        s = self.settings
        active = [(b, r) for b, r in matches if in_budget(step, steps, r.t_prime, s.reference_steps)]
        if not active and not negatives:
            return None
        new_embeds = embeds.clone()
        new_pooled = None if pooled is None else pooled.clone()
        for b, record in active:
            positions = record.positions.to(embeds.device)
            rows = embeds[b, positions]
            new_embeds[b, positions] = torch.lerp(rows, record.projected.to(rows.device, rows.dtype), self.scale)
        for b in negatives:
            target = self.negative.to(embeds.device, embeds.dtype)
            new_embeds[b] = torch.lerp(embeds[b], target.embeds[0], self.scale)
            if new_pooled is not None and target.pooled is not None:
                new_pooled[b] = torch.lerp(pooled[b], target.pooled[0], self.scale)
        if s.latent_reattention and active:
            self._capture_original(latents, t, cond, guidance, [b for b, _ in active])
        return self.adapter.with_call_conditioning(args, kwargs, Conditioning(new_embeds, new_pooled))

    def _capture_original(self, latents: Tensor, t: Tensor, cond: Conditioning, guidance, rows: list[int]) -> None:
        """One more denoiser pass on the filtered rows with their original conditioning,
        recording its skip features for latent re-attention in the call that follows."""
        index = torch.tensor(rows, device=latents.device)
        original = Conditioning(
            cond.embeds[index], None if cond.pooled is None else cond.pooled[index.to(cond.pooled.device)]
        )
        self.captured = {}
        self.busy = True
        try:
            with torch.no_grad():
                self.adapter.predict(latents[index], t[index.to(t.device)], original, guidance)
        finally:
            self.busy = False
        self.lra_rows = index

    def _skip(self, stage: int, features: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.captured is None:
            return features
        if self.busy:  # the original-branch pass: record
            self.captured[stage] = tuple(f.detach() for f in features)
            return features
        reference, rows = self.captured.get(stage), self.lra_rows
        scales = self.lra_scales
        s = 1.0 + self.scale * ((scales[stage] if stage < len(scales) else 1.0) - 1.0)
        if reference is None or rows is None or s == 1.0:
            return features
        out = []
        for f, ref in zip(features, reference):
            changed = low_frequency_reattention(f[rows], ref, s, self.settings.lra_window)
            out.append(f.index_copy(0, rows, changed))
        return tuple(out)

    def _after_denoise(self, *_args) -> None:
        if not self.busy:
            self.lra_rows, self.captured = None, None

    # ---- the attachment ----------------------------------------------------------------------

    def set_scale(self, scale: float) -> None:
        """Interpolate between the original embeddings (0: no effect) and SAFREE's (1)."""
        self.scale = float(scale)

    def detach(self) -> None:
        """Unregister every hook."""
        for h in self.handles:
            h.remove()
        self.handles = []

"""Loss terms shared by the trained methods (Receler, ESD, EraseAnything), written once.

Every function here is the exact float computation its callers used before it was shared (same
operations in the same order), so an edit trained through it is bit for bit what it was.

- :func:`negative_guidance`: ESD's erase target ``base - eta * (e_c - e_a)``; ``base`` is the
  anchor's prediction (ALGORITHMS' building block, EraseAnything, Receler) or the concept's (the
  ESD release's form, where eta 2 equals the building block's eta 1).
- :func:`frozen_predictions`: the concept and anchor predictions of the FROZEN model (every edit
  off) in one batched pass (ESD, EraseAnything). Receler makes the two passes separately: its
  concept pass runs under an attention probe that must record the concept's maps alone.
- :func:`prediction_loss`: the mean squared error of a prediction, in float32.
- :func:`attention_feature`: keyword-column attention maps averaged to one map per image
  (Receler's concept mask, EraseAnything's L_rsc features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import Conditioning

TARGET_BASES = ("anchor", "concept")


def negative_guidance(e_cond: torch.Tensor, e_anchor: torch.Tensor, eta: float, base: str = "anchor") -> torch.Tensor:
    """The negative-guidance target ``base - eta * (e_cond - e_anchor)``, same shape as the inputs
    (the model's prediction space: epsilon, v or velocity). ``base``: "anchor" (``e_anchor``) or
    "concept" (``e_cond``, the ESD release's form)."""
    if base not in TARGET_BASES:
        raise ValueError(f"the target's base must be one of {TARGET_BASES}, got {base!r}")
    start = e_anchor if base == "anchor" else e_cond
    return start - eta * (e_cond - e_anchor)


def frozen_predictions(
    adapter, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, anchor: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_cond, e_anchor): the frozen model's predictions (every edit switched off, no grad) at
    ``x_t`` (B, *latent), ``t`` (B,) on ``cond`` and ``anchor`` (batch 1 or B), from one batched
    pass (anchor first)."""
    b = x_t.shape[0]
    with torch.no_grad(), adapter.edits_disabled():
        both = Conditioning.cat([anchor.expand_to(b), cond.expand_to(b)])
        out = adapter.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    e_anchor, e_cond = out.chunk(2)
    return e_cond, e_anchor


def prediction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``pred`` against ``target`` (any equal shapes), computed in float32."""
    return F.mse_loss(pred.float(), target.float())


def attention_feature(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, HW): attention maps (B, heads, HW, n_tokens), one per layer (same HW), averaged over
    heads, the keyword's token columns and layers, in float32."""
    return torch.stack([m.float().mean(dim=(1, 3)) for m in maps]).mean(0)

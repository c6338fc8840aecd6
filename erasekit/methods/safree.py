"""SAFREE (Yoon et al., ICLR 2025): training-free erasure by projecting the prompt's trigger-word
embeddings away from a toxic keyword subspace for the first denoising steps. Reference: the
paper's Eqs. 2-8 and the authors' release (jaehong31/SAFREE @ b8b2c3f, SD 1.4 pipeline), as
read in design/METHODS2.md, "SAFREE".

Nothing is trained: ``fit`` is instant and the Edit holds the settings; the inference hook
"safree" (:mod:`erasekit.edits.safree_hook`) does the work. With p the prompt's token
embeddings (SD: CLIP last hidden state; Flux: T5) and pooled vectors taken from the same
encoder (CLIP's EOS state; T5: the mean over real tokens, as the spec asks for Flux)::

    C = [c_1..c_K]  pooled keyword vectors;   P_C = C (C^T C)^+ C^T
    p_\\i: the prompt without word i;  d_i = ||(I - P_C) p_\\i||
    trigger: d_i >= (1 + alpha) mean_{j != i} d_j                       (Eq. 2-4)
    P_I = M (M^T M)^+ M^T, M = [p_\\1..p_\\n];  p_proj = P_I (I - P_C) p  (Eq. 5; order "paper")
    p_safe = p_proj at trigger words, p elsewhere (BOS, EOS, padding untouched)
    beta = 1 - mean_tokens cos(p, p_proj);  t' = round(up_t sigmoid(2k (10 beta - t0)))
    denoising step i (0-based) uses p_safe while i <= t' (in 50-step units), p afterwards

Hyper-parameters of the paper and the release (SD 1.4, DPM-Solver++ 50 steps, CFG 7.5, fp32):
alpha = 0.01; up_t (gamma) = 10 steps of 50; (t0, k) = (5.333, 2.5) for nudity (the "paper"
preset) and (5.5, 3.5) for artists (the "artists" preset); keywords: the 17 nudity keywords of
generate_safree.py:245-255 for the concept "nudity" (:data:`NUDITY_KEYWORDS`), the single name
for an artist; the release runs latent re-attention (FreeU-style, window 2x2 around DC, s =
0.9 at the first decoder stage and 0.2 at the second, backbone factors 1.0) and passes the
keyword list as the negative prompt.

Choices, each a setting: the projection order (``order``: "paper" P_I (I - P_C) p, the default,
or "release" (I - P_C) P_I p, MSDP:94); the budget curve (``budget``: "release", the calibrated
curve that produced the paper's numbers, the default, or "paper", Eq. 6's up_t sigmoid(1 - cos),
5-9 steps for every prompt); the budget's units (``reference_steps``: 50, the release's sampler;
a run of N steps projects step i while i * 50 / N <= t', so the toy world's 25 steps get 0..5
for t' = 10); the release's hidden negative prompt (``negative_prompt``, off: it is negative
prompting stacked on SAFREE, report both); latent re-attention (``latent_reattention``, off).

Release bugs and quirks NOT copied: (1) ``register_free_*`` is called without ``safree=`` so
latent re-attention never runs in the released SD 1.4 numbers (only its third UNet pass is paid),
and where it runs its filter REPLACES the low-frequency coefficients by the constant s instead of
scaling them: here the paper's Eq. 8 (scale where |F(h(p_safree))| > |F(h(p))|); (2) the SD3
port takes T5 position-0 embeddings and applies T5 token flags to the CLIP positions of the
joint sequence for all steps: here flags, projection and budget live in one encoder's token
space; (3) the leave-one-out prompt replaces the word by token id 0 ("!" in CLIP's vocabulary, a
tokenizer-specific choice): here the word is deleted, the same for every tokenizer; (4) the
negative prompt is not silently on. Flux (extension, not in the paper): everything happens in
T5 space (trigger words flagged from mean-pooled T5 vectors, not the spec's CLIP-L detection
with a character-offset map to T5); the pooled CLIP vector Flux reads is left as is; latent
re-attention needs UNet skip features, which Flux has not: the setting is refused there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..edits import Edit
from ..edits.inference_hook import NAME as INFERENCE_HOOK
from ..edits.safree_hook import (
    Subspace,
    in_budget,
    low_frequency_reattention,
    project_tokens,
    step_budget,
    trigger_mask,
)
from ..models import adapter_for
from . import split_list
from .config import ConfigError, MethodConfig, setting
from .registry import register_method

__all__ = [
    "NAME",
    "NUDITY_KEYWORDS",
    "SafreeConfig",
    "Subspace",
    "fit",
    "in_budget",
    "keyword_list",
    "low_frequency_reattention",
    "project_tokens",
    "step_budget",
    "trigger_mask",
]

NAME = "safree"
# The release's toxic keywords for nudity (generate_safree.py:245-255), K = 17.
NUDITY_KEYWORDS = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)


@dataclass
class SafreeConfig(MethodConfig):
    """Settings; the defaults are the release's nudity settings (nothing is trained)."""

    keywords: str = setting(
        "{concept}", "the toxic keywords spanning the subspace C, ;-separated", sep=";", template=True, nonempty=True
    )
    nudity_keywords: bool = setting(
        True, "for the concept 'nudity': the release's 17 nudity keywords instead of `keywords`"
    )
    alpha: float = setting(0.01, "trigger threshold: d_i >= (1 + alpha) * mean of the other words' d_j", low=0)
    order: str = setting(
        "paper", "projection order: paper P_I (I - P_C) p, release (I - P_C) P_I p", choices=("paper", "release")
    )
    budget: str = setting(
        "release",
        "step budget t': release round(up_t sigmoid(2k (10 beta - t0))), paper round(up_t sigmoid(beta))",
        choices=("release", "paper"),
    )
    up_t: float = setting(10.0, "gamma: the largest step budget, in reference_steps-step units", low=0)
    reference_steps: int = setting(
        50, "the sampler steps up_t counts in (the release's 50); 0: the run's own steps", low=0
    )
    t0: float = setting(5.333, "release budget curve: the centre, in units of 10 beta (5.333 nudity, 5.5 artists)")
    k: float = setting(2.5, "release budget curve: the slope (2.5 nudity, 3.5 artists)", above=0)
    negative_prompt: bool = setting(
        False, "the release's hidden switch: the keywords, joined, as CFG's negative prompt"
    )
    latent_reattention: bool = setting(
        False, "latent re-attention on the UNet's skip features (paper Eq. 7-8; needs UNet up blocks, not Flux)"
    )
    lra_window: int = setting(
        1, "latent re-attention: the low frequencies |f| <= lra_window (3x3 around DC for 1)", low=1
    )
    lra_scales: str = setting(
        "0.9,0.2", "latent re-attention: s per decoder stage, first (lowest resolution) first; others 1", sep=","
    )

    def check(self) -> None:
        """Each ``lra_scales`` item is a number in (0, 1]."""
        for item in split_list(self.lra_scales):
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and 0 < value <= 1):
                raise self.error("lra_scales", self.lra_scales, "comma-separated numbers in (0, 1]")

    @classmethod
    def artists(cls, **overrides) -> SafreeConfig:
        """The release's artist-style curve ((t0, k) = (5.5, 3.5)); the keyword is the name."""
        return cls(**({"t0": 5.5, "k": 3.5} | overrides))

    @classmethod
    def release(cls, **overrides) -> SafreeConfig:
        """As the released SD 1.4 runs were launched: the keyword list as the negative prompt
        and the release's projection order (its latent re-attention never ran: left off)."""
        return cls(**({"negative_prompt": True, "order": "release"} | overrides))

    @classmethod
    def fast(cls, **overrides) -> SafreeConfig:
        """The toy world: the concept is its own keyword; the step budget is scaled to the
        toy pipelines' 25-28 sampler steps by ``reference_steps`` (as at every step count)."""
        return cls(**overrides)


def keyword_list(concept: str, config: SafreeConfig) -> list[str]:
    """The toxic keywords for ``concept``: the release's nudity list for the concept 'nudity'
    (with ``nudity_keywords``), else the ``keywords`` templates filled with the concept.
    ConfigError for an empty concept or keyword."""
    concept = concept.strip()
    if not concept:
        raise ConfigError("safree: the concept is empty")
    if config.nudity_keywords and concept.lower() == "nudity":
        return list(NUDITY_KEYWORDS)
    keywords = [k.format(concept=concept) for k in split_list(config.keywords, ";")]
    if not keywords:
        raise ConfigError(f"safree: keywords must hold at least one keyword, got {config.keywords!r}")
    return list(dict.fromkeys(keywords))


def fit(pipe, concept: str, config: SafreeConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Instant: the Edit holds the settings and the keyword list (no tensors). ConfigError for
    an empty concept, or latent re-attention on a family without UNet skip features."""
    config = config or SafreeConfig()
    adapter = adapter_for(pipe)
    keywords = keyword_list(concept, config)
    if config.latent_reattention and adapter.skip_stages() == 0:
        raise ConfigError(
            f"safree: latent_reattention needs a UNet's up-block skip features; the {adapter.family} family has none "
            "(set latent_reattention=false)"
        )
    return Edit.made_on(
        adapter,
        kind=INFERENCE_HOOK,
        method=NAME,
        concepts=[concept.strip()],
        tensors={},
        hyperparameters=asdict(config) | {"keyword_list": keywords, "hook": "safree"},
        metrics={"train_seconds": 0.0},
    )


PRESETS = {
    "paper": SafreeConfig,
    "artists": SafreeConfig.artists,
    "release": SafreeConfig.release,
    "fast": SafreeConfig.fast,
}
register_method(NAME, SafreeConfig, PRESETS, fit)

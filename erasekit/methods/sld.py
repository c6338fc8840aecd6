"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023): inference-time guidance away
from the concept, no training. Reference: diffusers' StableDiffusionPipelineSafe (its
equations 3-8 and its SafetyConfig presets).

Per denoising step, with c / u / s the conditional, unconditional and safety-concept predictions::

    mu = clamp(|c - s| * guidance_scale, max=1), and 0 where c - s >= threshold
    g_s = mu * (s - u) + momentum_scale * m ;  m <- mom_beta * m + (1 - mom_beta) * g_s
    guided = u + w * ((c - u) - g_s)          (g_s only from step warmup_steps on)

Mechanism: a forward hook on the denoiser (skipped while ``edits_disabled()`` is active)
replaces the conditional prediction c by ``c - scale * g_s``: whatever the pipeline then does
with it (``u + w (c' - u)``) is the SLD output, so it works through the stock pipeline call,
adapter.generate, rollouts and guided_predict unchanged. It needs no knowledge of the family:

- a CFG batch (two halves with equal latents and timesteps, diffusers' [uncond, cond] layout:
  the SD pipeline, ``guided_predict``): u is the first half, c the second; one extra denoiser
  pass for s on the conditional half (the safe pipeline batches the same three predictions);
- any other call (Flux's true CFG runs cond and uncond as two calls; guidance-distilled Flux
  runs one; SD without CFG): rows equal to the embedding of ``negative_prompt`` are
  unconditional calls and pass unchanged; the others get two extra passes, u (on
  ``negative_prompt``) and s, with the call's own guidance embedding. For a
  guidance-distilled model every prediction is already guided, so c - s and s - u are the
  guided differences (about w times the unguided ones): the threshold then compares guided
  differences (a documented approximation; there is no unguided prediction to use).

Steps: the hook counts the calls it modifies; a call at a timestep not below the previous one
starts a new trajectory (momentum 0, step 0). Calling the model repeatedly at one timestep
therefore stays at step 0: warm-up suppresses the guidance there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..edits import Edit
from ..models import adapter_for
from .config import MethodConfig, setting
from .registry import register_method

NAME = "sld"


@dataclass
class SLDConfig(MethodConfig):
    """Hyper-parameters; the defaults are StableDiffusionPipelineSafe's (= SafetyConfig.MEDIUM)."""

    safety_prompt: str = setting("{concept}", "the safety concept s", template=True)
    negative_prompt: str = setting("", "u for calls that are not CFG batches (and how u calls are recognised)")
    warmup_steps: int = setting(10, "sampler steps before the safety guidance starts", low=0)
    guidance_scale: float = setting(1000.0, "sld_guidance_scale: mu = clamp(|c - s| * scale, max=1)", low=0)
    threshold: float = setting(0.01, "sld_threshold: no guidance where c - s >= threshold", low=0)
    momentum_scale: float = setting(0.3, "sld_momentum_scale: weight of the momentum in g_s", low=0)
    mom_beta: float = setting(0.4, "sld_mom_beta: momentum decay", low=0, high=1)

    @classmethod
    def weak(cls, **overrides) -> "SLDConfig":
        return cls(**({"warmup_steps": 15, "guidance_scale": 20.0, "threshold": 0.0, "momentum_scale": 0.0, "mom_beta": 0.0} | overrides))

    @classmethod
    def strong(cls, **overrides) -> "SLDConfig":
        return cls(**({"warmup_steps": 7, "guidance_scale": 2000.0, "threshold": 0.025, "momentum_scale": 0.5, "mom_beta": 0.7} | overrides))

    @classmethod
    def maximum(cls, **overrides) -> "SLDConfig":
        return cls(**({"warmup_steps": 0, "guidance_scale": 5000.0, "threshold": 1.0, "momentum_scale": 0.5, "mom_beta": 0.7} | overrides))

    @classmethod
    def fast(cls, **overrides) -> "SLDConfig":
        """The toy world samples few steps: MEDIUM with a one-step warm-up."""
        return cls(**({"warmup_steps": 1} | overrides))


def fit(pipe, concept: str, config: SLDConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Instant: the Edit holds the SLD settings (no tensors)."""
    config = config or SLDConfig()
    adapter = adapter_for(pipe)
    return Edit(
        method=NAME,
        concepts=[concept],
        family=adapter.family,
        base_model=str(getattr(pipe, "name_or_path", "") or ""),
        tensors={},
        hyperparameters=asdict(config) | {"safety_concept": config.safety_prompt.format(concept=concept)},
        metrics={"train_seconds": 0.0},
    )


def sld_term(c: Tensor, u: Tensor, s: Tensor, momentum: Tensor, cfg: SLDConfig) -> tuple[Tensor, Tensor]:
    """(g_s, new momentum) of the safe pipeline's equations 4, 6, 7 and 8."""
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


class _SafeGuidance:
    def __init__(self, adapter, config: SLDConfig, safety_concept: str, scale: float):
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
                    keep = [i for i, row in enumerate(cond.embeds) if row.shape != neg.shape or not torch.equal(row, neg)]
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

    def remove(self) -> None:
        self.handle.remove()


def attach(adapter, edit: Edit, scale: float = 1.0) -> _SafeGuidance:
    """Guide away from the edit's safety concept; ``scale`` multiplies the safety term
    (0: the base model)."""
    hp = edit.hyperparameters
    fields = SLDConfig.__dataclass_fields__
    config = SLDConfig(**{k: v for k, v in hp.items() if k in fields})
    return _SafeGuidance(adapter, config, hp.get("safety_concept", edit.concepts[0]), scale)


PRESETS = {
    "paper": SLDConfig,
    "medium": SLDConfig,
    "weak": SLDConfig.weak,
    "strong": SLDConfig.strong,
    "max": SLDConfig.maximum,
    "fast": SLDConfig.fast,
}
register_method(NAME, SLDConfig, PRESETS, fit, attach)

"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023): inference-time guidance away
from the concept, no training. Reference: diffusers' StableDiffusionPipelineSafe (its
equations 3-8 and its SafetyConfig presets).

Per denoising step, with c / u / s the conditional, unconditional and safety-concept predictions::

    mu = clamp(|c - s| * guidance_scale, max=1), and 0 where c - s >= threshold
    g_s = mu * (s - u) + momentum_scale * m ;  m <- mom_beta * m + (1 - mom_beta) * g_s
    guided = u + w * ((c - u) - g_s)          (g_s only from step warmup_steps on)

Mechanism (the inference hook "safe_guidance" of :mod:`erasekit.edits.inference_hook`; this
module only produces the Edit): a forward hook on the denoiser (skipped while ``edits_disabled()`` is active)
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

from ..edits import Edit
from ..edits.inference_hook import NAME as INFERENCE_HOOK
from ..edits.inference_hook import sld_term  # noqa: F401 (re-exported)
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
    def weak(cls, **overrides) -> SLDConfig:
        return cls(
            **(
                {"warmup_steps": 15, "guidance_scale": 20.0, "threshold": 0.0, "momentum_scale": 0.0, "mom_beta": 0.0}
                | overrides
            )
        )

    @classmethod
    def strong(cls, **overrides) -> SLDConfig:
        return cls(
            **(
                {
                    "warmup_steps": 7,
                    "guidance_scale": 2000.0,
                    "threshold": 0.025,
                    "momentum_scale": 0.5,
                    "mom_beta": 0.7,
                }
                | overrides
            )
        )

    @classmethod
    def maximum(cls, **overrides) -> SLDConfig:
        return cls(
            **(
                {"warmup_steps": 0, "guidance_scale": 5000.0, "threshold": 1.0, "momentum_scale": 0.5, "mom_beta": 0.7}
                | overrides
            )
        )

    @classmethod
    def fast(cls, **overrides) -> SLDConfig:
        """The toy world samples few steps: MEDIUM with a one-step warm-up."""
        return cls(**({"warmup_steps": 1} | overrides))


def fit(pipe, concept: str, config: SLDConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Instant: the Edit holds the SLD settings (no tensors)."""
    config = config or SLDConfig()
    adapter = adapter_for(pipe)
    return Edit.made_on(
        adapter,
        kind=INFERENCE_HOOK,
        method=NAME,
        concepts=[concept],
        tensors={},
        hyperparameters=asdict(config)
        | {"safety_concept": config.safety_prompt.format(concept=concept), "hook": "safe_guidance"},
        metrics={"train_seconds": 0.0},
    )


PRESETS = {
    "paper": SLDConfig,
    "medium": SLDConfig,
    "weak": SLDConfig.weak,
    "strong": SLDConfig.strong,
    "max": SLDConfig.maximum,
    "fast": SLDConfig.fast,
}
register_method(NAME, SLDConfig, PRESETS, fit)

"""ESD (Gandikota et al., ICCV 2023): erase a concept by fully fine-tuning one parameter group
with negative guidance. Spec: shared design ALGORITHMS.md, sections "Shared building blocks"
and "Baselines".

- ESD-x (``group="esd-x"``): the layers that attend to the text (adapter parameter group
  "cross_attn": SD every attn2; Flux the text-stream projections of the joint attention).
  ESD-u (``group="esd-u"``): every other Linear / Conv2d layer ("non_cross_attn").
- Each iteration: x_t from a partial rollout of the EDITED model (CFG on the concept prompt,
  ``t_enc ~ U[0, N)`` of N steps; ``rollout_source="pool"`` reuses a pool of such rollouts, see
  :mod:`.rollouts`); the teacher terms e_c = eps(x_t, c, t) and e_u = eps(x_t, "", t)
  come from the FROZEN model; loss ``|| eps'(x_t, c, t) - target ||^2``.
- Target. The release's train script writes ``target = e_c - eta * (e_c - e_u)`` with eta 2
  (``target_base="concept"``, the default). That is ALGORITHMS' building block
  ``e_u - eta' * (e_c - e_u)`` with eta' = eta - 1 = 1; ``target_base="uncond"`` uses the
  building block's form with ``eta`` as given. :meth:`ESDConfig.guidance_eta` gives the
  building block's eta of any config (the Edit records it as ``eta_algorithms``).
- Frozen teacher without a second model: the group trains as live weight deltas
  (:func:`erasekit.edits.weight_delta.train_deltas`): the original tensors are kept aside and
  swapped in while ``adapter.edits_disabled()`` is active. Teacher passes never overlap a
  student graph (they run first, under no_grad), so swapping ``param.data`` is safe and costs
  no copy.
- The Edit stores the group's weight deltas (``delta.<parameter>``, in the parameters' dtype), a
  weight-delta edit: see :mod:`erasekit.edits.weight_delta` for attach / detach /
  :func:`export_merged`.

Departures from the release: the release rolls out the FROZEN model (ALGORITHMS asks for the
edited one: we follow ALGORITHMS) and it samples with the pipeline's own scheduler state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..edits import Edit
from ..edits.weight_delta import NAME as WEIGHT_DELTA
from ..edits.weight_delta import PREFIX, attached_parameters, export_merged, train_deltas  # noqa: F401 (re-exported)
from ..models import FamilyAdapter, adapter_for, frozen
from .config import setting
from .losses import frozen_predictions, negative_guidance, prediction_loss
from .memory import MemorySettings, training_memory
from .registry import register_method
from .rollouts import RolloutSettings, source_from_config
from .training import TrainingRun

NAME = "esd"
GROUPS = {"esd-x": "cross_attn", "esd-u": "non_cross_attn"}
TARGET_BASES = ("concept", "uncond")
# The release's defaults per model family (its SD and Flux scripts differ); used where the
# config leaves a field at None.
RELEASE_DEFAULTS = {
    "sd": {"iterations": 200, "lr": 5e-5},
    "flux": {"iterations": 1400, "lr": 1e-4},
}


@dataclass
class ESDConfig(RolloutSettings, MemorySettings):
    """Hyper-parameters; the defaults are the authors' release (``iterations`` / ``lr`` None:
    the release's value for the model family, see RELEASE_DEFAULTS)."""

    group: str = setting(
        "esd-x",
        "the trained parameter group: esd-x (cross-attention) or esd-u (everything else)",
        choices=tuple(GROUPS),
    )
    iterations: int | None = setting(None, "training iterations (none: the release's value for the family)", low=1)
    lr: float | None = setting(None, "Adam learning rate (none: the release's value for the family)", above=0)
    eta: float = setting(
        2.0,
        "negative guidance in target_base's form; ALGORITHMS' form, target = e(anchor) - eta (e(c) - e(anchor)), "
        "is this eta with target_base uncond and this eta - 1 with concept (the release's eta 2 = 1)",
        low=0,
    )
    target_base: str = setting(
        "concept",
        "concept: e_c - eta (e_c - e_u) (release); uncond: e_u - eta (e_c - e_u) (ALGORITHMS' form)",
        choices=TARGET_BASES,
    )
    prompt: str = setting("{concept}", "the erased prompt c", template=True)
    uncond_prompt: str = setting("", "the unconditional prompt of e_u")
    checkpoint_every: int = setting(100, "with a checkpoint folder: save every this many iterations", low=1)
    seed: int = setting(0, "seed of every random draw of training", low=0)

    @classmethod
    def fast(cls, **overrides) -> ESDConfig:
        """The toy-world preset: fewer iterations, a higher learning rate, shorter rollouts."""
        base = dict(iterations=100, lr=2e-4, rollout_steps=20, checkpoint_every=50)
        return cls(**(base | overrides))

    def guidance_eta(self) -> float:
        """``eta`` in ALGORITHMS' form, target = e_u - eta' (e_c - e_u): eta' = eta with
        ``target_base="uncond"``; eta - 1 with the release's "concept" (e_c - eta (e_c - e_u))."""
        return algorithms_eta(self.eta, self.target_base)

    def resolved(self, family: str) -> ESDConfig:
        """A copy with the family's release defaults filled in, checked again (``fit`` uses it)."""
        defaults = RELEASE_DEFAULTS.get(family, RELEASE_DEFAULTS["sd"])
        return ESDConfig(**(asdict(self) | {k: v for k, v in defaults.items() if getattr(self, k) is None}))


def algorithms_eta(eta: float, target_base: str) -> float:
    """ALGORITHMS' eta of ESD's ``eta`` in ``target_base``'s form: e_c - eta (e_c - e_u) =
    e_u - (eta - 1) (e_c - e_u), so the release's form ("concept") is one more."""
    if target_base not in TARGET_BASES:
        raise ValueError(f"target_base must be one of {TARGET_BASES}, got {target_base!r}")
    return eta - 1.0 if target_base == "concept" else eta


def esd_target(e_cond: torch.Tensor, e_uncond: torch.Tensor, eta: float, target_base: str) -> torch.Tensor:
    """The negative-guidance target (see the module docstring), same shape as the inputs:
    :func:`.losses.negative_guidance` based on the concept's prediction (the release's form,
    ``target_base="concept"``) or the unconditional one (``"uncond"``)."""
    if target_base not in TARGET_BASES:
        raise ValueError(f"target_base must be one of {TARGET_BASES}, got {target_base!r}")
    return negative_guidance(e_cond, e_uncond, eta, base="concept" if target_base == "concept" else "anchor")


def trainable_parameters(model, config: ESDConfig) -> int:
    """Parameters of the group ESD fine-tunes on ``model`` (a pipeline or an adapter, a
    meta-device one included)."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    return sum(p.numel() for p in adapter.parameter_group(GROUPS[config.group]).values())


def iterations(config: ESDConfig, family: str, concept: str) -> int:
    """The iterations ``fit`` runs: the config's, else the release's for the family."""
    return config.resolved(family).iterations


# ---- training --------------------------------------------------------------------------------


def fit(
    pipe,
    concept: str,
    config: ESDConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Edit:
    """Fine-tune the config's parameter group of ``pipe``'s denoiser to erase ``concept``;
    returns the Edit (weight deltas, not applied; the pipeline is left as it was).

    With ``checkpoint_dir``, state is saved every ``config.checkpoint_every`` iterations and a
    later call with the same folder, concept, model and config resumes from the last
    checkpoint (:class:`.training.TrainingRun`).
    """
    adapter = adapter_for(pipe)
    config = (config or ESDConfig()).resolved(adapter.family)
    prompt = config.prompt.format(concept=concept)
    params = adapter.parameter_group(GROUPS[config.group])
    busy = sorted(attached_parameters(adapter) & set(params))
    if busy:
        raise ValueError(f"weight edits are applied to parameters ESD would train ({busy[0]}, ...); remove them first")

    cond = adapter.encode([prompt])
    uncond = adapter.encode([config.uncond_prompt])
    steps = config.rollout_steps or adapter.default_steps
    source = source_from_config(adapter, config, steps)
    g = torch.Generator().manual_seed(config.seed)  # every random draw of training goes through g

    run = TrainingRun(pipe, NAME, WEIGHT_DELTA, concept, config, config.iterations, checkpoint_dir, progress)
    teacher = train_deltas(adapter, params)
    with frozen(adapter.denoiser), training_memory(adapter, config):  # only the edit trains
        try:
            opt = torch.optim.Adam(teacher.trainable(), lr=config.lr)
            saved = run.resume()
            if saved is not None:
                teacher.load_state(saved)

            for _ in run.loop(params.values(), teacher.state, {"opt": opt}, generator=g, sources=[source]):
                with run.phase("rollout"):
                    x_t, t = source.draw(cond, uncond, g)
                with run.phase("teacher"):
                    e_cond, e_uncond = frozen_predictions(adapter, x_t, t, cond, uncond)  # the frozen teacher
                    target = esd_target(e_cond, e_uncond, config.eta, config.target_base)
                with run.phase("student"):
                    loss = prediction_loss(adapter.predict(x_t, t, cond), target)
                run.log(loss, loss=loss.item())
                with run.phase("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                with run.phase("optimizer"):
                    opt.step()
            deltas = teacher.deltas()
        finally:
            teacher.detach()

    return Edit.made_on(
        adapter,
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=[concept],
        tensors={PREFIX + n: d for n, d in deltas.items()},
        hyperparameters=asdict(config)
        | {
            "rollout_steps": steps,
            "parameters": sum(p.numel() for p in params.values()),
            "eta_algorithms": config.guidance_eta(),
        },
        metrics=run.metrics({"final_loss": run.last("loss")}),
    )


PRESETS = {"paper": ESDConfig, "fast": ESDConfig.fast}
register_method(
    NAME,
    ESDConfig,
    PRESETS,
    fit,
    variants={g: {"group": g} for g in GROUPS},
    trainable_parameters=trainable_parameters,
    iterations=iterations,
)

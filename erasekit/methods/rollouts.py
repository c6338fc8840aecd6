"""Where the ESD-family losses get their noisy latent x_t: one :class:`XtSource` per call site.

Every method that trains on ESD's negative-guidance target (Receler, ESD, EraseAnything) draws
``(x_t, t)`` from a source built by :func:`source_from_config`; the config fields that choose it
are the same on every method's config:

``rollout_source``
    ``"fresh"``: the release recipe. Each draw takes ``t_enc ~ U[0, high)`` from the training
    generator and runs a fresh partial rollout of ``t_enc`` guided sampler steps with the
    CURRENT model (:meth:`FamilyAdapter.rollout`). About ``(high - 1) / 2`` guided steps per
    draw.

    ``"pool"``: keeps ``rollout_pool`` trajectories of the current model, each the state x after
    every sampler step 0 .. high - 1 from one noise draw (:meth:`FamilyAdapter.rollout_trajectory`;
    ``high - 1`` guided steps each). A draw picks a trajectory and ``t_enc ~ U[0, high)`` from the
    training generator and returns the stored state: no denoiser call. The pool is built at the
    first draw; before every ``rollout_refresh``-th draw after it, the oldest trajectory is
    replaced by a new one of the current model (round robin; 0 never refreshes). A run of D draws
    costs ``(pool + (D - 1) // refresh) * (high - 1)`` guided steps: for long runs about
    ``refresh / 2`` times fewer than "fresh".
    What it gives up: a draw's x_t comes from a model up to about ``pool * refresh`` draws old,
    and the run sees ``pool + D / refresh`` noise draws instead of D. A trajectory is rolled out
    on the conditioning of the draw that triggers it; when the prompt changes from draw to draw
    (EraseAnything's shuffled prompts) later draws reuse it for their own prompt variant.

``rollout_pool`` (P >= 1), ``rollout_refresh`` (R >= 0): the pool's size and refresh period, in
draws. ``rollout_steps`` / ``rollout_guidance``: N and the guidance of every rollout, both modes.
"fresh" stays the default. On the toy world (benchmarks/RESULTS.md, "x_t sources") the pool's
default 2 x 7 cut Receler's rollout calls 3.1x with a mean H 4.8 points above fresh over three
seeds (one seed 5.3 below), and 4 x 10 cut them 3.8x with a mean H 4.1 below; the spread between
training seeds (31 points of H for fresh) is far larger, so equal quality is not yet shown.

Cost is counted, not estimated: :attr:`XtSource.calls` is the number of denoiser forward calls
made while the source rolls out (a forward pre-hook on the denoiser), reported as the Edit's
``rollout_denoiser_calls``. One call is one guided sampler step: both classifier-free-guidance
branches in one batched pass (one pass for guidance-distilled Flux).

Checkpoints: :meth:`XtSource.state_tensors` (the pool's latents and timesteps, the draw and call
counters) goes into the method's checkpoint, :meth:`XtSource.load_state_tensors` restores it, so
a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import MethodConfig, setting
from .hooks import active_hooks

SOURCES = ("fresh", "pool")


@dataclass
class RolloutSettings(MethodConfig):
    """The config fields that choose a method's x_t source; the configs of the methods that
    train on ESD's target (Receler, ESD, EraseAnything) inherit them."""

    rollout_steps: int | None = setting(
        None, "N, the sampler steps of the ESD partial rollout (none: the family's, 50 DDIM / 28 Euler)", low=1
    )
    rollout_guidance: float | None = setting(
        None, "guidance scale of the rollouts (none: the family's default)", low=0
    )
    rollout_source: str = setting(
        "fresh", "x_t: a fresh rollout per draw (the release) or a pool of trajectories", choices=SOURCES
    )
    rollout_pool: int = setting(2, "pool: trajectories kept", low=1)
    rollout_refresh: int = setting(
        7, "pool: the oldest trajectory is replaced every this many draws (0: never)", low=0
    )


class XtSource:
    """A stream of ``(x_t, t)`` for one call site of a training run (see the module docstring).

    ``num_steps``: N, the sampler's step count; ``high``: draws take ``t_enc ~ U[0, high)``
    (``high <= N``; default N). ``name`` prefixes this source's checkpoint tensors.
    ``height`` / ``width``: image size of the rollouts (None: the model's default).
    """

    def __init__(
        self,
        adapter,
        mode: str = "fresh",
        num_steps: int | None = None,
        high: int | None = None,
        guidance: float | None = None,
        pool: int = 2,
        refresh: int = 7,
        name: str = "rollout",
        height: int | None = None,
        width: int | None = None,
    ):
        if mode not in SOURCES:
            raise ValueError(f"rollout_source must be one of {', '.join(SOURCES)}, got {mode!r}")
        self.num_steps = int(num_steps or adapter.default_steps)
        self.high = self.num_steps if high is None else int(high)
        if not 1 <= self.high <= self.num_steps:
            raise ValueError(f"t_enc range must be [0, high) with 1 <= high <= {self.num_steps}, got high={high}")
        if mode == "pool" and (int(pool) < 1 or int(refresh) < 0):
            raise ValueError(f"rollout_pool must be >= 1 and rollout_refresh >= 0, got {pool} and {refresh}")
        self.adapter, self.mode, self.guidance, self.name = adapter, mode, guidance, name
        self.pool_size, self.refresh = int(pool), int(refresh)
        self.size = {"height": height, "width": width}
        self.calls = 0  # denoiser forward calls spent on rollouts
        self.draws = 0
        self.states: Tensor | None = None  # (P, high, B, *latent): x after k steps at [:, k]
        self.timesteps: Tensor | None = None  # (P, high): the training timestep of each state

    # ---- drawing ---------------------------------------------------------------------------

    def draw(self, cond, uncond, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One ``(x_t, t)``: x_t (B, *latent) in the adapter's layout, t (B,) its timestep.
        Every random number comes from ``generator``."""
        if self.mode == "fresh":
            t_enc = int(torch.randint(0, self.high, (1,), generator=generator))
            with (
                active_hooks().rollout(self, t_enc) as steps,
                self._counting(),
            ):  # steps: t_enc unless a benchmark caps it
                x, t = self.adapter.rollout(
                    cond,
                    uncond,
                    steps,
                    num_steps=self.num_steps,
                    guidance=self.guidance,
                    generator=generator,
                    **self.size,
                )
        else:
            self._maintain(cond, uncond, generator)
            i = int(torch.randint(0, self.pool_size, (1,), generator=generator))
            t_enc = int(torch.randint(0, self.high, (1,), generator=generator))
            x = self.states[i, t_enc].clone()
            t = self.timesteps[i, t_enc].expand(x.shape[0]).clone()
        self.draws += 1
        return x, t

    def _maintain(self, cond, uncond, generator) -> None:
        if self.states is None:
            trajectories = [self._trajectory(cond, uncond, generator) for _ in range(self.pool_size)]
            self.states = torch.stack([xs for xs, _ in trajectories])
            self.timesteps = torch.stack([ts for _, ts in trajectories])
        elif self.refresh and self.draws % self.refresh == 0:
            slot = (self.draws // self.refresh - 1) % self.pool_size  # the oldest trajectory
            self.states[slot], self.timesteps[slot] = self._trajectory(cond, uncond, generator)

    def _trajectory(self, cond, uncond, generator) -> tuple[Tensor, Tensor]:
        with self._counting():
            return self.adapter.rollout_trajectory(
                cond,
                uncond,
                self.high - 1,
                num_steps=self.num_steps,
                guidance=self.guidance,
                generator=generator,
                **self.size,
            )

    @contextmanager
    def _counting(self):
        def count(*_):
            self.calls += 1

        handle = self.adapter.denoiser.register_forward_pre_hook(count)
        try:
            yield
        finally:
            handle.remove()

    # ---- checkpoints -----------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """What a resumed run needs, as named tensors ``{name}.{draws|calls|states|timesteps}``
        (the pool's tensors only once it is built)."""
        out = {f"{self.name}.draws": torch.tensor(self.draws), f"{self.name}.calls": torch.tensor(self.calls)}
        if self.states is not None:
            out |= {f"{self.name}.states": self.states, f"{self.name}.timesteps": self.timesteps}
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_tensors` (missing keys: the state of a source never drawn from)."""
        self.draws = int(tensors.get(f"{self.name}.draws", torch.tensor(0)))
        self.calls = int(tensors.get(f"{self.name}.calls", torch.tensor(0)))
        states = tensors.get(f"{self.name}.states")
        if self.mode == "pool" and states is not None:
            if states.shape[:2] != (self.pool_size, self.high):
                raise ValueError(
                    f"checkpointed rollout pool has shape {tuple(states.shape)}, expected "
                    f"({self.pool_size}, {self.high}, ...)"
                )
            self.states = states.to(self.adapter.device, self.adapter.dtype)
            self.timesteps = tensors[f"{self.name}.timesteps"].to(self.adapter.device)


def source_from_config(
    adapter,
    config: RolloutSettings,
    num_steps: int,
    high: int | None = None,
    name: str = "rollout",
    height: int | None = None,
    width: int | None = None,
) -> XtSource:
    """The source a method config's ``rollout_*`` fields describe (see the module docstring)."""
    return XtSource(
        adapter,
        config.rollout_source,
        num_steps,
        high,
        config.rollout_guidance,
        config.rollout_pool,
        config.rollout_refresh,
        name,
        height,
        width,
    )


def rollout_metrics(*sources: XtSource) -> dict[str, int]:
    """``rollout_denoiser_calls`` (all sources together) and ``rollout_draws`` for an Edit's metrics."""
    return {"rollout_denoiser_calls": sum(s.calls for s in sources), "rollout_draws": sum(s.draws for s in sources)}

"""Observation hooks around every training run: the seam a benchmark (benchmarks/scale.py) or a
user interface uses to time iterations and rollouts, or to stop a run early, without touching a
method's code.

A :class:`TrainingHooks` subclass overrides what it needs; ``with training_hooks(hooks): erase(...)``
makes it active for the runs inside the block (a context variable: per thread / task). With no
hooks active, :func:`active_hooks` returns the default, which observes nothing and changes
nothing. The training-run helper (:mod:`.training`) calls the iteration hooks; the x_t sources
(:mod:`.rollouts`) call :meth:`TrainingHooks.rollout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class TrainingHooks:
    """Callbacks of a training run; every default does nothing (and changes nothing)."""

    #: stop the loop after this many iterations of this call (None: run them all). The Edit is
    #: still built, from the weights reached; no final checkpoint is written for an early stop.
    max_iterations: int | None = None

    def loop_started(self, run) -> None:
        """Called once before the first iteration; ``run`` is the :class:`~.training.TrainingRun`
        (``run.start``: the first iteration, after a resume; ``run.iterations``: the planned total)."""

    def iteration_started(self, run, iteration: int) -> None:
        """Called before iteration ``iteration`` (0-based) runs."""

    def iteration_ended(self, run, iteration: int, record: dict) -> None:
        """Called after iteration ``iteration`` (its weights checked, its checkpoint written);
        ``record``: its entry of the loss history."""

    def loop_ended(self, run) -> None:
        """Called once after the last iteration (also after an early stop)."""

    @contextmanager
    def rollout(self, source, t_enc: int) -> Iterator[int]:
        """Around one fresh partial rollout of ``t_enc`` sampler steps drawn by ``source`` (an
        :class:`~.rollouts.XtSource`; ``source.high``: draws take ``t_enc ~ U[0, high)``).
        Yields the number of steps to really run: ``t_enc`` unless a benchmark caps it."""
        yield t_enc


_DEFAULT = TrainingHooks()
_ACTIVE: ContextVar[TrainingHooks] = ContextVar("erasekit_training_hooks", default=_DEFAULT)


def active_hooks() -> TrainingHooks:
    """The hooks of the innermost :func:`training_hooks` block, else the do-nothing default."""
    return _ACTIVE.get()


@contextmanager
def training_hooks(hooks: TrainingHooks) -> Iterator[TrainingHooks]:
    """Make ``hooks`` active for the training runs inside the block."""
    token = _ACTIVE.set(hooks)
    try:
        yield hooks
    finally:
        _ACTIVE.reset(token)

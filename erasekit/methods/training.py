"""The training-run helper of the trained methods (Receler, ESD, EraseAnything, MACE).

A :class:`TrainingRun` owns what every training loop needs besides its step: the checkpoint
identity and resume, periodic checkpoints, the progress bar, the loss history, wall time, the
finiteness checks, the hooks a benchmark observes (:mod:`.hooks`), and the Edit's training
metrics. A method's ``fit`` builds its trainable tensors and optimizer, then reads::

    run = TrainingRun(pipe, NAME, KIND, concept, config, iterations, checkpoint_dir, progress)
    saved = run.resume()                       # checkpoint tensors, or None (run.start = 0)
    ...restore the method's own tensors from ``saved``...
    for it in run.loop(params, state=lambda: {...}, optimizers={"opt": opt}, generator=g, sources=[src]):
        ...forward, losses...
        run.log(loss, erase=erase.item())      # every loss finite, else TrainingDiverged
        opt.zero_grad(); loss.backward(); opt.step()
    metrics = run.metrics({"final_loss": ...})

``run.loop`` restores the optimizers, the generator and the x_t sources on resume; after each
iteration it checks that the trained tensors are still finite and saves a checkpoint every
``config.checkpoint_every`` iterations and at the end (the method's ``state()`` tensors, the
optimizers' states as ``{name}.{index}.{key}``, ``generator_state``, the sources' tensors).

Checkpoint identity: ``checkpoint.json`` records the method, the edit kind, the concept(s), the
model (:func:`.checkpoints.model_identity`) and the settings (the config and whatever the method
adds). Resuming from a checkpoint made for anything else is a :class:`~.checkpoints.CheckpointMismatch`
naming the field; nothing is trained or written.

Where the time goes: a method wraps the parts of its step in ``with run.phase("rollout"):`` (and
"teacher", "adversary", "student", "backward", "optimizer", ...); the Edit's metrics then hold
``phase_seconds`` (exclusive wall seconds per phase, ``other`` for the rest of the loop) and
``denoiser_calls`` (forward calls of the denoiser inside the loop, rollouts included). Each phase
is also a ``torch.profiler.record_function`` range named ``erasekit.<phase>``.

A non-finite loss or trained tensor stops the run with :class:`TrainingDiverged` (one line: the
method, the iteration, the setting to lower); the checkpoint of that iteration and the Edit are
not written (an earlier checkpoint stays).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..models import adapter_for
from .checkpoints import load_checkpoint, load_optimizer_tensors, model_identity, optimizer_tensors, save_checkpoint
from .hooks import active_hooks
from .rollouts import rollout_metrics


class TrainingDiverged(UserError, FloatingPointError):
    """A loss or a trained tensor became NaN or infinite; the message names the method, the
    iteration and the setting to lower."""


class TrainingRun:
    """One training run of ``method`` on ``pipe`` for ``concepts`` (a name or a list).

    ``edit_kind``: the kind of the Edit it makes; ``config``: the method's config (a dataclass;
    ``checkpoint_every`` is read from it); ``iterations``: the run's total (resolved);
    ``checkpoint_dir``: where checkpoints go (None: no checkpoints, no resume); ``progress``:
    show a tqdm bar; ``settings``: what else makes the run (JSON-able; a checkpoint made with
    other values is refused); ``lower``: the config field named when training diverges.
    """

    def __init__(
        self,
        pipe,
        method: str,
        edit_kind: str,
        concepts: str | Sequence[str],
        config,
        iterations: int,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        settings: Mapping | None = None,
        lower: str = "lr",
    ):
        self.method, self.edit_kind, self.config = method, edit_kind, config
        self.concepts = [concepts] if isinstance(concepts, str) else list(concepts)
        self.iterations = int(iterations)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = int(getattr(config, "checkpoint_every", 0) or self.iterations)
        self.progress, self.lower = progress, lower
        self.identity = {
            "method": method,
            "edit_kind": edit_kind,
            "concepts": self.concepts,
            # Hashing a folder reads it (once: cached); only a run that checkpoints needs it.
            "model": model_identity(pipe) if self.checkpoint_dir is not None else None,
            "config": asdict(config),
        } | dict(settings or {})
        self.start = 0
        self.done = 0
        self.history: list[dict] = []
        self.trainable_parameters = 0
        self.seconds = 0.0
        self.created = time.time()
        self.setup_seconds = 0.0
        self.sources: list = []
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.denoiser_calls = 0
        self.pipe = pipe
        self._phases: list[str] = []
        self._phase_mark = 0.0
        self._saved: dict[str, torch.Tensor] | None = None
        self._resumed = False
        self._logged: dict | None = None

    # ---- resume --------------------------------------------------------------------------------

    def resume(self) -> dict[str, torch.Tensor] | None:
        """The tensors of the checkpoint in ``checkpoint_dir`` (None if there is none or no
        folder); sets :attr:`start` to its iteration. A checkpoint of another method, edit kind,
        concept, model or settings raises :class:`~.checkpoints.CheckpointMismatch`."""
        if not self._resumed:
            self._resumed = True
            if self.checkpoint_dir is not None:
                loaded = load_checkpoint(self.checkpoint_dir, self.identity)
                if loaded is not None:
                    self.start, self._saved = loaded
        return self._saved

    # ---- the loop ------------------------------------------------------------------------------

    def loop(
        self,
        trained: Iterable[torch.Tensor],
        state: Callable[[], dict[str, torch.Tensor]] = dict,
        optimizers: Mapping[str, torch.optim.Optimizer | None] | None = None,
        generator: torch.Generator | None = None,
        sources: Sequence = (),
        auxiliary: Iterable[torch.Tensor] = (),
    ) -> Iterator[int]:
        """Yield the iterations still to run (0-based, from :attr:`start`), under a progress bar.

        ``trained``: the tensors that become the Edit (their element count is the run's
        trainable parameter count); ``auxiliary``: further trained tensors that are checked but
        not counted (Receler's adversarial prompt). ``state()``: the method's own checkpoint
        tensors; ``optimizers`` (name -> optimizer, None skipped), ``generator`` and ``sources``
        (x_t sources) are restored here on resume and saved with every checkpoint. The loop body
        must call :meth:`log` once per iteration.
        """
        self.trained = [t for t in trained]
        checked = self.trained + [t for t in auxiliary if t is not None]
        self.trainable_parameters = sum(t.numel() for t in self.trained)
        optimizers = {k: v for k, v in (optimizers or {}).items() if v is not None}
        self.sources = list(sources)
        saved = self.resume()
        if saved is not None:
            for name, opt in optimizers.items():
                load_optimizer_tensors(opt, saved, name)
            if generator is not None:
                generator.set_state(saved["generator_state"])
            for source in self.sources:
                source.load_state_tensors(saved)

        hooks = active_hooks()
        stop = (
            self.iterations
            if hooks.max_iterations is None
            else min(self.iterations, self.start + hooks.max_iterations)
        )
        label = self.concepts[0] if len(self.concepts) == 1 else "; ".join(self.concepts)
        counter = adapter_for(self.pipe).denoiser.register_forward_pre_hook(self._count_call)
        t0 = time.time()
        self.setup_seconds = t0 - self.created
        self.done = self.start
        hooks.loop_started(self)
        bar = tqdm(
            range(self.start, stop),
            desc=f"{self.method} '{label}'",
            disable=not self.progress,
            initial=self.start,
            total=self.iterations,
        )
        try:
            for it in bar:
                hooks.iteration_started(self, it)
                self._logged = None
                yield it
                if self._logged is None:
                    raise RuntimeError(f"{self.method}: the training step must call run.log(loss) every iteration")
                self._check_tensors(checked, it)
                self.done = it + 1
                due = self.done % self.checkpoint_every == 0 or self.done == self.iterations
                if self.checkpoint_dir is not None and due:
                    tensors = dict(state())
                    for name, opt in optimizers.items():
                        tensors |= optimizer_tensors(opt, name)
                    if generator is not None:
                        tensors["generator_state"] = generator.get_state()
                    for source in self.sources:
                        tensors |= source.state_tensors()
                    save_checkpoint(self.checkpoint_dir, self.done, tensors, self.identity)
                hooks.iteration_ended(self, it, self._logged)
        finally:
            bar.close()
            self.seconds += time.time() - t0
            counter.remove()
        hooks.loop_ended(self)

    def _count_call(self, *_) -> None:
        self.denoiser_calls += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's wall seconds as phase ``name`` of the step (exclusive: time spent in a
        phase opened inside it counts for that one), and label it ``erasekit.<name>`` for
        torch.profiler. On an asynchronous device the seconds are where the host waited."""
        now = time.perf_counter()
        if self._phases:
            self.phase_seconds[self._phases[-1]] += now - self._phase_mark
        self._phases.append(name)
        self._phase_mark = now
        try:
            with torch.profiler.record_function(f"erasekit.{name}"):
                yield
        finally:
            now = time.perf_counter()
            self.phase_seconds[self._phases.pop()] += now - self._phase_mark
            self._phase_mark = now

    def log(self, loss: torch.Tensor | Sequence[torch.Tensor], /, **record) -> dict:
        """Check the iteration's loss (a tensor, or several: e.g. both levels of a bi-level
        step) and add ``record`` (floats, text) to the loss history as ``{"iteration": n, **record}``.
        Call it before ``backward``: a NaN or infinite loss raises :class:`TrainingDiverged`
        before it can reach the weights."""
        it = self.done  # the current iteration, 0-based
        for value in [loss] if torch.is_tensor(loss) else list(loss):
            v = float(value.detach()) if torch.is_tensor(value) else float(value)
            if not math.isfinite(v):
                self._diverged(f"the loss became {v}", it)
        entry = {"iteration": it + 1, **record}
        self.history.append(entry)
        self._logged = entry
        return entry

    def _check_tensors(self, tensors: list[torch.Tensor], it: int) -> None:
        """TrainingDiverged if any trained tensor holds a NaN or an infinity (one reduction per
        tensor: a NaN or infinity makes its float32 sum non-finite)."""
        if not tensors:
            return
        with torch.no_grad():
            sums = torch.stack([t.detach().sum(dtype=torch.float32).cpu() for t in tensors])
        if not bool(torch.isfinite(sums).all()):
            self._diverged("a trained tensor became NaN or infinite", it)

    def _diverged(self, what: str, it: int) -> None:
        now = getattr(self.config, self.lower, None)
        raise TrainingDiverged(
            f"{self.method}: {what} at iteration {it + 1} of {self.iterations}; training stopped and nothing "
            f"was written for it; lower {self.lower} (now {now})"
        )

    # ---- results -------------------------------------------------------------------------------

    def last(self, key: str, where: Callable[[dict], bool] | None = None):
        """The latest value of ``key`` in the loss history (among entries ``where`` accepts); None if none."""
        for entry in reversed(self.history):
            if key in entry and (where is None or where(entry)):
                return entry[key]
        return None

    def mean(self, key: str) -> float | None:
        """The mean of ``key`` over this call's loss history (iterations done before a resume are
        not in it), rounded to 4 places; None if no entry holds it."""
        values = [entry[key] for entry in self.history if key in entry]
        return round(sum(values) / len(values), 4) if values else None

    def metrics(self, summary: Mapping | None = None) -> dict:
        """The Edit's metrics: ``train_seconds`` (the loop's wall seconds in this call), the
        method's ``summary`` (final losses), the x_t sources' ``rollout_denoiser_calls`` and
        ``rollout_draws``, ``denoiser_calls`` and ``phase_seconds`` (see the module docstring; the
        latter only when the method marks phases), then ``iterations`` (done, resumed ones included),
        ``resumed_from`` (the checkpoint's iteration, 0 without one), ``trainable_parameters``
        and ``setup_seconds`` (from the run's creation to its loop)."""
        out = {"train_seconds": round(self.seconds, 2)} | dict(summary or {})
        if self.sources:
            out |= rollout_metrics(*self.sources)
        out["denoiser_calls"] = self.denoiser_calls
        if self.phase_seconds:
            other = max(0.0, self.seconds - sum(self.phase_seconds.values()))
            out["phase_seconds"] = {k: round(v, 3) for k, v in self.phase_seconds.items()} | {"other": round(other, 3)}
        return out | {
            "iterations": self.done,
            "resumed_from": self.start,
            "trainable_parameters": self.trainable_parameters,
            "setup_seconds": round(self.setup_seconds, 2),
        }


def count_parameters(shapes: Iterable[Sequence[int]]) -> int:
    """The number of elements of tensors of the given shapes."""
    return sum(math.prod(s) for s in shapes)

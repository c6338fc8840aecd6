"""Where one training iteration of each ESD-family method spends its time.

Each method runs through ``erasekit.erase`` for a few iterations (``--iterations``, after one
warm-up iteration that is not counted) and reads the phases it marks itself
(``TrainingRun.phase``: rollout, teacher, adversary, student, backward, optimizer; "other" is the
rest of the loop: loss history, finiteness checks, progress bar). Printed per method: seconds
per iteration, each phase's share, and denoiser forward calls per iteration (rollouts included).

Models: the toy pipelines (``toy:sd``, ``toy:flux``) and ``sd14``, SD 1.4's full architecture
with random weights at ``--size`` px (benchmarks/scale.py builds it; nothing is downloaded).

Fresh rollouts draw ``t_enc ~ U[0, N)``: a few iterations give a noisy rollout share, so the
table also gives ``rollout s/call`` (seconds per guided sampler step) and the recipe's expected
rollout seconds per iteration, ``(N - 1) / 2`` steps per fresh draw.

    python benchmarks/profile_methods.py --models toy:sd,toy:flux --presets paper,fast --threads 1
    python benchmarks/profile_methods.py --models sd14 --methods esd-x,receler --iterations 2
    python benchmarks/profile_methods.py --models toy:sd --methods receler --ops 15   # torch.profiler top ops

Wall seconds (``time.perf_counter``): run it on an idle core, or compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from erasekit.methods import erase, make_config
from erasekit.methods.hooks import TrainingHooks, training_hooks
from erasekit.models import load_pipeline
from erasekit.toyworld import pipeline_path

METHODS = ("esd-x", "esd-u", "receler", "eraseanything", "advunlearn")
PHASES = ("rollout", "teacher", "adversary", "student", "backward", "optimizer", "other")
# Settings every profile run adds: a set-up that is not profiled kept short (EraseAnything's
# preserve images), and AdvUnlearn's adversary acting from the first iteration (the release
# attacks every iteration after 200 of warm-up: the profile is of those iterations).
PROFILE_SETTINGS = {
    "eraseanything": {"preserve_images": "1", "preserve_steps": "2"},
    "advunlearn": {"warmup": "0"},
}
TOY_CONCEPT = "circle"


class _Snapshot(TrainingHooks):
    """Copies the run's phase seconds and denoiser calls after the warm-up iteration and at the end."""

    def __init__(self, iterations: int):
        self.max_iterations = iterations + 1
        self.marks: list[tuple[dict, int, float]] = []

    def _mark(self, run) -> None:
        self.marks.append((dict(run.phase_seconds), run.denoiser_calls, time.perf_counter()))

    def iteration_started(self, run, iteration):
        if iteration == run.start + 1:
            self._mark(run)

    def loop_ended(self, run):
        self._mark(run)


def load(model: str, size: int):
    """(pipeline, concept) for a model name."""
    if model == "sd14":
        sys.path.insert(0, str(Path(__file__).parent))
        from scale import CONCEPT, build_sd14

        return build_sd14(size), CONCEPT
    family = model.split(":", 1)[1]
    return load_pipeline(pipeline_path(family)), TOY_CONCEPT


def profile(pipe, concept: str, method: str, preset: str, iterations: int, overrides: dict) -> dict:
    """One method's row: seconds per iteration, phase seconds per iteration, calls per iteration."""
    config = make_config(method, preset, PROFILE_SETTINGS.get(method, {}) | overrides)
    snap = _Snapshot(iterations)
    with training_hooks(snap):
        edit = erase(pipe, concept, method, config, progress=False)
    (p0, c0, t0), (p1, c1, t1) = snap.marks[0], snap.marks[-1]
    n = max(1, edit.metrics["iterations"] - 1)
    phases = {k: (p1.get(k, 0.0) - p0.get(k, 0.0)) / n for k in set(p0) | set(p1)}
    total = (t1 - t0) / n
    phases["other"] = max(0.0, total - sum(phases.values()))
    hp = edit.hyperparameters
    steps = int(hp.get("rollout_steps") or 0)
    calls = (c1 - c0) / n
    return {
        "method": method,
        "preset": preset,
        "iterations": n,
        "seconds_per_iteration": total,
        "phases": phases,
        "denoiser_calls_per_iteration": calls,
        "rollout_steps": steps,
        "rollout_source": hp.get("rollout_source"),
    }


def ops_table(pipe, concept: str, method: str, preset: str, rows: int) -> str:
    """torch.profiler's top ``rows`` operators by self CPU time over 2 iterations (after 1)."""
    config = make_config(method, preset, PROFILE_SETTINGS.get(method, {}))
    snap = _Snapshot(2)
    with training_hooks(snap), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        erase(pipe, concept, method, config, progress=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def markdown(model: str, rows: list[dict]) -> str:
    head = "| method | preset | s/iter | " + " | ".join(PHASES) + " | denoiser calls/iter |"
    lines = [f"**{model}**", "", head, "|" + "---|" * (len(PHASES) + 4)]
    for r in rows:
        total = r["seconds_per_iteration"] or 1.0
        shares = [f"{100 * r['phases'].get(p, 0.0) / total:.0f}%" for p in PHASES]
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['seconds_per_iteration']:.3f} | "
            + " | ".join(shares)
            + f" | {r['denoiser_calls_per_iteration']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="toy:sd,toy:flux", help="comma-separated: toy:sd, toy:flux, sd14")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--presets", default="paper", help="comma-separated presets, e.g. paper,fast")
    ap.add_argument("--iterations", type=int, default=None, help="timed iterations (default: 12 toy, 2 sd14)")
    ap.add_argument("--size", type=int, default=64, help="sd14: image size in px")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra settings, every run")
    ap.add_argument("--ops", type=int, default=0, help="also print torch.profiler's top N operators per method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(s.split("=", 1) for s in args.set)
    out = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
        "command": " ".join(sys.argv),
        "models": {},
    }
    print(f"# profile, {out['date']}, {out['machine']}\n`{out['command']}`\n")
    for model in args.models.split(","):
        pipe, concept = load(model.strip(), args.size)
        iterations = args.iterations or (2 if model == "sd14" else 12)
        rows = []
        for method in args.methods.split(","):
            for preset in args.presets.split(","):
                row = profile(pipe, concept, method.strip(), preset.strip(), iterations, overrides)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.ops:
                    print(f"\n{model} {method} {preset}\n" + ops_table(pipe, concept, method, preset, args.ops))
        out["models"][model] = rows
        print(markdown(model, rows) + "\n", flush=True)
        del pipe
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""What erasing costs: each ESD-family method's paper recipe against erasekit's recommended preset.

For each method, seed and recipe (``--recipes``: "paper", the release's settings with fresh
rollouts, first; then e.g. the recommended preset, ``fast`` on the toy world, or a preset with
settings, ``fast+rollout_source=pool``), the bench trains the edit on the toy pipeline,
scores it with the object suite and, with ``--attacks``, attacks it (worst-case H, as the fair
bench). Runs are interleaved (seed 0: paper, fast; seed 1: paper, fast; ...) so that a machine
busy with other work slows both recipes alike. Rows go to ``--out`` as the bench writes them
(rows.jsonl), so a cut-off run resumes where it stopped. The paper recipes are the releases'
iteration counts: on a CPU, Receler's (500 iterations x 50 adversarial steps) takes about half an
hour per fit on the toy pipelines and AdvUnlearn's (1000 iterations, each attack step a fresh
rollout) many hours; benchmarks/profile_methods.py gives their cost per iteration instead.

Printed: per run, the fit's wall and CPU seconds, the denoiser calls of its training loop
(rollouts included) and its figures; per method and recipe, the means over seeds, the ratios of
CPU seconds and denoiser calls against the first recipe, and the difference in worst-case H (H
without ``--attacks``) with each recipe's spread over seeds. The issue's target: >= 3x less time at a
worst-case H within 2 points.

    python benchmarks/cost.py --model toy:sd --methods esd-x,eraseanything --concept triangle --seeds 0,1,2 \\
        --attacks textual-inversion,ring-a-bell,unlearndiffatk --out /tmp/cost-sd

CPU seconds (``time.process_time`` of the fit) are the cost figure: with one torch thread they
do not grow when other processes share the cores, wall seconds do.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from datetime import date

import torch

from erasekit.bench import run_bench


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def parse_recipe(spec: str) -> tuple[str, dict[str, str]]:
    """ "PRESET[+KEY=VALUE...]" -> (preset, settings), e.g. "fast+rollout_source=pool"."""
    preset, *sets = spec.split("+")
    return preset, dict(item.split("=", 1) for item in sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy:sd")
    ap.add_argument("--methods", default="esd-x,receler,eraseanything,advunlearn")
    ap.add_argument(
        "--recipes",
        default="paper,fast",
        help="PRESET[+KEY=VALUE...], the first the reference; e.g. paper,fast,fast+rollout_source=pool",
    )
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--attacks", default="", help="comma-separated attacks (worst-case H); empty: plain H")
    ap.add_argument("--attack-set", action="append", default=[], metavar="ATTACK.KEY=VALUE")
    ap.add_argument("--attack-n", type=int, default=4)
    ap.add_argument("--n", type=int, default=12, help="prompts per suite set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="erasekit-cost")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    attack_configs: dict[str, dict[str, str]] = {}
    for item in args.attack_set:
        name, _, kv = item.partition(".")
        key, _, value = kv.partition("=")
        attack_configs.setdefault(name, {})[key] = value
    rows: list[dict] = []
    for seed in seeds:
        for method in methods:
            for recipe in recipes:
                preset, settings = parse_recipe(recipe)
                result = run_bench(
                    models=[args.model],
                    methods=[method],
                    concepts=[args.concept],
                    preset=preset,
                    overrides={method: settings} if settings else None,
                    n=args.n,
                    out=args.out,
                    seeds=[seed],
                    attacks=attacks,
                    attack_n=args.attack_n,
                    attack_configs=attack_configs,
                    progress=False,
                    command=" ".join(sys.argv),
                )
                row = next(r for r in result["rows"] if r["method"] == method)
                row["recipe"] = recipe
                rows.append(row)
                m = row.get("train_metrics", {})
                print(
                    f"{method} {recipe} seed {seed}: fit {row.get('fit_seconds', 0):.0f} s wall, "
                    f"{row.get('fit_cpu_seconds', 0):.0f} s CPU, {m.get('denoiser_calls', '?')} denoiser calls, "
                    f"H {row['h']:.1f}, worst H {row['worst_h']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    figure = "worst H" if attacks else "H"
    key = "worst_h" if attacks else "h"
    print(
        f"\n{date.today()} · {platform.processor() or platform.machine()}, {args.threads} torch thread(s) · "
        f"{args.model}, {args.concept}, seeds {args.seeds}, n {args.n}"
        + (f", attacks {', '.join(attacks)} ({args.attack_n} prompts)" if attacks else "")
        + f" · `python benchmarks/cost.py {' '.join(sys.argv[1:])}`\n"
    )
    print("| method | recipe | seed | iterations | fit s (wall) | fit s (CPU) | denoiser calls | H | worst H |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("train_metrics", {})
        print(
            f"| {r['method']} | {r['recipe']} | {r['seed']} | {m.get('iterations', '-')} | {r['fit_seconds']:.0f} | "
            f"{r['fit_cpu_seconds']:.0f} | {m.get('denoiser_calls', '-')} | {r['h']:.1f} | {r['worst_h']:.1f} |"
        )
    ref = recipes[0]
    print(f"\nmeans over seeds; ratios and differences against {ref}:\n")
    print(f"| method | recipe | CPU s | {ref} / this, CPU s | {ref} / this, calls | {figure} | difference |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        by = {p: [r for r in rows if r["method"] == method and r["recipe"] == p] for p in recipes}
        cpu = {p: statistics.mean(r["fit_cpu_seconds"] for r in by[p]) for p in recipes}
        calls = {p: statistics.mean(r["train_metrics"]["denoiser_calls"] for r in by[p]) for p in recipes}
        fig = {p: [r[key] for r in by[p]] for p in recipes}
        for p in recipes:
            diff = statistics.mean(fig[p]) - statistics.mean(fig[ref])
            print(
                f"| {method} | {p} | {cpu[p]:.0f} | {cpu[ref] / cpu[p]:.1f}x | {calls[ref] / max(calls[p], 1):.1f}x | "
                f"{_mean_sd(fig[p])} | {diff:+.1f} |"
            )


if __name__ == "__main__":
    main()

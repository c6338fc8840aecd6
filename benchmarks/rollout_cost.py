"""Cost and quality of the x_t sources on the toy world: the release recipe (a fresh partial
rollout per iteration) against a pool of trajectories (``rollout_source=pool``).

For each concept, recipe and seed, both sources train from scratch on the shipped toy pipeline;
each edit is applied, measured with the object-erasure suite (Acc_E, Acc_R, Acc_L, H) and
removed. Rollout cost is the denoiser calls the run counted (``rollout_denoiser_calls``: one call
per guided sampler step). Prints markdown tables: every run, then means per recipe and source.

    python benchmarks/rollout_cost.py --concept circle --seeds 0,1 --n 12 --pools 4x10,2x7
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from statistics import mean

import torch

from erasekit.edits import apply, remove
from erasekit.evaluation.metrics import pooled_accuracies
from erasekit.methods import erase, make_config
from erasekit.models import load_pipeline
from erasekit.toyworld import pipeline_path
from erasekit.toyworld.detector import ToyDetector
from erasekit.toyworld.suite import run_object_suite

# name -> (method, --set overrides on the "fast" preset)
RECIPES = {
    "receler-eraser-eta3": ("receler", {"eta": "3", "reg_weight": "0", "adv_tokens": "0"}),
    "esd": ("esd", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="flux")
    ap.add_argument("--concept", action="append", default=None, help="default: circle")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--pools", default="2x7", help="comma-separated pool runs, each rollout_pool x rollout_refresh")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra settings, both sources")
    ap.add_argument("--n", type=int, default=12, help="prompts per suite set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    concepts = args.concept or ["circle"]
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    extra = dict(s.split("=", 1) for s in args.set)
    sources = {"fresh": {"rollout_source": "fresh"}}
    for spec in args.pools.split(","):
        size, refresh = spec.strip().split("x")
        sources[f"pool {size}x{refresh}"] = {
            "rollout_source": "pool",
            "rollout_pool": size,
            "rollout_refresh": refresh,
        }
    detector = ToyDetector.load()
    pipe = load_pipeline(pipeline_path(args.family))
    rows = []
    for concept in concepts:
        base, _ = run_object_suite(pipe, concept, detector, n=args.n, progress=False)
        rows.append(
            dict(
                concept=concept,
                recipe="base",
                source="-",
                seed="-",
                calls=0,
                draws=0,
                seconds=0.0,
                acc_e=base.acc_e,
                acc_r=base.acc_r,
                acc_l=base.acc_l,
                h=base.h,
            )
        )
        for recipe in args.recipes.split(","):
            method, settings = RECIPES[recipe]
            for seed in seeds:
                for source, source_settings in sources.items():
                    config = make_config(method, "fast", settings | extra | source_settings | {"seed": seed})
                    t0 = time.time()
                    edit = erase(pipe, concept, method, config, progress=False)
                    seconds = time.time() - t0
                    apply(pipe, edit)
                    res, _ = run_object_suite(pipe, concept, detector, n=args.n, progress=False)
                    remove(pipe, edit)
                    row = dict(
                        concept=concept,
                        recipe=recipe,
                        source=source,
                        seed=seed,
                        calls=edit.metrics["rollout_denoiser_calls"],
                        draws=edit.metrics["rollout_draws"],
                        seconds=seconds,
                        acc_e=res.acc_e,
                        acc_r=res.acc_r,
                        acc_l=res.acc_l,
                        h=res.h,
                    )
                    rows.append(row)
                    print(
                        " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                        flush=True,
                    )
    print(
        f"\n{date.today()} · {platform.machine()}, {torch.get_num_threads()} thread(s) · {args.family} toy pipeline, "
        f"preset fast, n={args.n} · `python benchmarks/rollout_cost.py {' '.join(sys.argv[1:])}`\n"
    )
    print("| concept | recipe | source | seed | rollout denoiser calls | fit s | Acc_E | Acc_R | Acc_L | H |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concept']} | {r['recipe']} | {r['source']} | {r['seed']} | {r['calls']} | {r['seconds']:.0f} | "
            f"{r['acc_e']:.1f} | {r['acc_r']:.1f} | {r['acc_l']:.1f} | {r['h']:.1f} |"
        )
    print("\nmeans over concepts and seeds (H of the mean accuracies; fresh / source: ratio of rollout calls):\n")
    print("| recipe | source | runs | rollout calls | fresh / source | fit s | Acc_E | Acc_R | Acc_L | H |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        fresh_calls = mean(r["calls"] for r in rows if r["recipe"] == recipe and r["source"] == "fresh")
        for source in sources:
            sel = [r for r in rows if r["recipe"] == recipe and r["source"] == source]
            m = {k: mean(r[k] for r in sel) for k in ("calls", "seconds")} | pooled_accuracies(sel)
            print(
                f"| {recipe} | {source} | {len(sel)} | {m['calls']:.0f} | {fresh_calls / m['calls']:.2f}x "
                f"| {m['seconds']:.0f} | "
                f"{m['acc_e']:.1f} | {m['acc_r']:.1f} | {m['acc_l']:.1f} | {m['h']:.1f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Erasure on the toy world: Acc_E, Acc_R, Acc_L, H and wall time per method variant.

For each toy pipeline and concept: the unedited model, then each variant trained from scratch,
applied, measured with the object-erasure suite, and removed. Receler's ablation rows follow
the paper (eraser only, + regulariser, + adversarial prompts, all), then all + our extensions
(a preservation term that keeps the erasers silent on the other objects' prompts; the erase loss
on the clean prompt beside the adversarial one); EraseAnything's drop one part
at a time (no attention loss, no reverse self-contrastive loss, no shuffling) and replace the
alternation of the two levels by gradient surgery.

The suite's prompts and sampling seeds are fixed; ``--seeds`` trains each variant once per
training seed (the config's ``seed``: initialisation, rollouts, prompt draws) and reports the
means over concepts and seeds, with the H of each seed beside them, so that a difference
between two variants can be told from the spread between training runs.

    python benchmarks/toyworld_erasure.py --family sd --concept circle --variants all,eraser-only
    python benchmarks/toyworld_erasure.py --method eraseanything --n 12 --threads 1
    python benchmarks/toyworld_erasure.py --family flux --variants all --seeds 0,1,2 --n 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date

import torch

from erasekit.edits import apply, remove
from erasekit.evaluation.generation import generate_images
from erasekit.evaluation.metrics import pooled_accuracies
from erasekit.methods import erase, make_config
from erasekit.models import adapter_for, load_pipeline
from erasekit.toyworld import pipeline_path
from erasekit.toyworld.detector import ToyDetector
from erasekit.toyworld.suite import object_prompts, run_object_suite

VARIANTS = {
    "receler": {
        "eraser-only": {"reg_weight": "0", "adv_tokens": "0"},
        "+reg": {"adv_tokens": "0"},
        "+adv": {"reg_weight": "0"},
        "all": {},
        "all+preserve": {"preserve_weight": "0.1"},  # our extensions, not paper rows
        "all+clean": {"adv_clean_erase": "true"},
    },
    "eraseanything": {
        "all": {},
        "no-attn": {"attn_weight": "0"},
        "no-rsc": {"rsc_weight": "0"},
        "no-shuffle": {"shuffle_prob": "0"},
        "gradient-surgery": {"gradient_surgery": "true"},
    },
}


def anchor_rates(pipe, concept: str, anchor: str, detector, n: int) -> tuple[float, float]:
    """Two references from the unedited model, on the simple set's ``n`` seeds: the % of images
    from the erase target's anchor prompt in which ``concept`` is detected (what an edit that
    only makes the model ignore the concept's words leaves), and the same with the concept as
    the negative prompt (guidance away from the concept at sampling time: what an edit that
    reached the negative-guidance target would leave)."""
    seeds = [c.seed for c in object_prompts(concept, n=n, n_locality=0) if c.set == "simple"]
    adapter, prompts = adapter_for(pipe), [anchor] * len(seeds)
    plain = generate_images(adapter, prompts, seeds, progress=False)
    away = generate_images(adapter, prompts, seeds, progress=False, negative_prompt=concept)
    return 100.0 * detector.detect(plain, concept).rate, 100.0 * detector.detect(away, concept).rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", action="append", default=None, help="sd and/or flux (default both)")
    ap.add_argument("--concept", action="append", default=None, help="default: circle, triangle, heart")
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated (default: every variant of the method; base: the unedited model only)",
    )
    ap.add_argument("--method", default="receler")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--n", type=int, default=24, help="prompts per suite set")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = VARIANTS.get(args.method, {"default": {}})
    families = args.family or ["sd", "flux"]
    concepts = args.concept or ["circle", "triangle", "heart"]
    variants = args.variants.split(",") if args.variants else list(table)
    variants = [v for v in variants if v != "base"]  # the unedited rows are always there
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown} for {args.method}; known: {list(table)}")
    extra = dict(s.split("=", 1) for s in args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    if "seed" in extra:
        raise SystemExit("give training seeds with --seeds, not --set seed=...")
    detector = ToyDetector.load()
    anchor = getattr(make_config(args.method, args.preset, extra), "anchor_prompt", "")
    rows = []
    for family in families:
        pipe = load_pipeline(pipeline_path(family))
        for concept in concepts:
            base, _ = run_object_suite(pipe, concept, detector, n=args.n, progress=False)
            rates = anchor_rates(pipe, concept, anchor, detector, args.n)
            rows.append(
                dict(
                    family=family,
                    concept=concept,
                    variant="base",
                    seed=None,
                    acc_e=base.acc_e,
                    acc_r=base.acc_r,
                    acc_l=base.acc_l,
                    h=base.h,
                    per_set=base.per_set,
                    seconds=0.0,
                    anchor=anchor,
                    anchor_rate=rates[0],
                    negative_prompt_rate=rates[1],
                )
            )
            for variant in variants:
                for seed in seeds:
                    config = make_config(args.method, args.preset, table[variant] | extra | {"seed": str(seed)})
                    t0 = time.time()
                    edit = erase(pipe, concept, args.method, config, progress=False)
                    seconds = time.time() - t0
                    apply(pipe, edit)
                    res, _ = run_object_suite(pipe, concept, detector, n=args.n, progress=False)
                    remove(pipe, edit)
                    rows.append(
                        dict(
                            family=family,
                            concept=concept,
                            variant=variant,
                            seed=seed,
                            acc_e=res.acc_e,
                            acc_r=res.acc_r,
                            acc_l=res.acc_l,
                            h=res.h,
                            per_set=res.per_set,
                            seconds=seconds,
                        )
                    )
                    print(
                        f"{family} {concept} {variant} seed {seed}: Acc_E {res.acc_e:.1f} Acc_R {res.acc_r:.1f} "
                        f"Acc_L {res.acc_l:.1f} H {res.h:.1f} ({seconds:.0f} s)",
                        flush=True,
                    )
    print(
        f"\n{date.today()} · {platform.machine()}, {torch.get_num_threads()} threads · "
        f"method {args.method}, preset {args.preset} · "
        f"`python benchmarks/toyworld_erasure.py {' '.join(sys.argv[1:])}`\n"
    )
    print(
        "| family | concept | variant | seed | Acc_E | Acc_R | Acc_L | H | paraphrase | synonym | indirect | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["per_set"]
        seed = "-" if r["seed"] is None else r["seed"]
        print(
            f"| {r['family']} | {r['concept']} | {r['variant']} | {seed} | {r['acc_e']:.1f} | {r['acc_r']:.1f} "
            f"| {r['acc_l']:.1f} | {r['h']:.1f} | {p['paraphrase']:.1f} | {p['synonym']:.1f} | {p['indirect']:.1f} "
            f"| {r['seconds']:.0f} |"
        )
    print(f"\nmeans over concepts and seeds ({', '.join(map(str, seeds))}); H of each seed's means over concepts:\n")
    print("| family | variant | Acc_E | Acc_R | Acc_L | H | H by seed |")
    print("|---|---|---|---|---|---|---|")
    for family in families:
        for variant in ["base"] + variants:
            sel = [r for r in rows if r["family"] == family and r["variant"] == variant]
            by_seed = (
                " / ".join(f"{pooled_accuracies([r for r in sel if r['seed'] == s])['h']:.1f}" for s in seeds)
                if variant != "base"
                else "-"
            )
            m = pooled_accuracies(sel)
            print(
                f"| {family} | {variant} | {m['acc_e']:.1f} | {m['acc_r']:.1f} | {m['acc_l']:.1f} | {m['h']:.1f} "
                f"| {by_seed} |"
            )
    print(
        f"\n% of the unedited model's images from the anchor prompt {anchor!r} (simple set's seeds) "
        "showing the concept,"
        " plain and with the concept as negative prompt:\n"
    )
    print("| family | concept | anchor | anchor, concept as negative prompt |")
    print("|---|---|---|---|")
    for r in rows:
        if r["variant"] == "base":
            print(f"| {r['family']} | {r['concept']} | {r['anchor_rate']:.1f} | {r['negative_prompt_rate']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

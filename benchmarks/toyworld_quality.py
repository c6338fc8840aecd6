"""Quality of the toy-world pipelines: does the detector find what the prompt asks for?

For each pipeline and each object, the object-erasure suite's prompts on the UNEDITED model:
% of images showing the prompted object per prompt set (simple prompts; held-out paraphrases,
synonyms and indirect mentions) and % showing the prompted colour. Targets (issue: toy world):
simple >= 90, paraphrase / synonym / indirect >= 80, colour >= 90.

    python benchmarks/toyworld_quality.py [--pipeline sd=PATH] [--n 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date

import torch

from erasekit.evaluation.generation import generate_images
from erasekit.models import adapter_for, load_pipeline
from erasekit.toyworld import pipeline_path
from erasekit.toyworld.detector import ToyDetector
from erasekit.toyworld.grammar import OBJECT_NAMES
from erasekit.toyworld.suite import object_prompts, score_cases

COLUMNS = ("simple", "paraphrase", "synonym", "indirect")


def measure(path: str, n: int, detector: ToyDetector) -> dict:
    """Per object: % of images showing the prompted object per set, and the prompted colour."""
    adapter = adapter_for(load_pipeline(path))
    rows = {}
    t0 = time.time()
    for obj in OBJECT_NAMES:
        cases = object_prompts(obj, n=n, n_locality=0)
        images = generate_images(adapter, [c.prompt for c in cases], [c.seed for c in cases], progress=obj)
        res = score_cases(cases, images, detector, obj)
        rows[obj] = {s: res.per_set[s] for s in COLUMNS} | {"color": res.color_accuracy}
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in COLUMNS + ("color",)}
    return {
        "per_object": rows,
        "mean": mean,
        "seconds": round(time.time() - t0, 1),
        "images": n * 4 * len(OBJECT_NAMES),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", action="append", default=[], help="family=PATH (default: the shipped pipelines)")
    ap.add_argument("--n", type=int, default=24, help="prompts per set and object")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    paths = dict(p.split("=", 1) for p in args.pipeline) or {f: str(pipeline_path(f)) for f in ("sd", "flux")}
    detector = ToyDetector.load()
    results = {fam: measure(path, args.n, detector) for fam, path in paths.items()}
    print(
        f"\n{date.today()} · {platform.machine()}, {torch.get_num_threads()} threads · "
        f"`python benchmarks/toyworld_quality.py {' '.join(sys.argv[1:])}`\n"
    )
    print("| pipeline | object | simple | paraphrase | synonym | indirect | colour |")
    print("|---|---|---|---|---|---|---|")
    for fam, res in results.items():
        for obj, r in list(res["per_object"].items()) + [("**mean**", res["mean"])]:
            print(f"| {fam} | {obj} | " + " | ".join(f"{r[k]:.1f}" for k in COLUMNS + ("color",)) + " |")
    for fam, res in results.items():
        print(f"\n{fam}: {res['images']} images in {res['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Several concepts erased in ONE edit (UCE, MACE, RECE take "a, b, c"), on both toy pipelines.

Per pipeline and method: one edit for all the concepts (fast preset, seed 0); then, on the same
prompts and seeds as the unedited model, Acc_E per erased concept (% of its simple prompts
"an image of a X" whose image shows it), Acc_R per concept (its synonym and paraphrase prompts),
and Acc_L on the objects NOT erased (% of their paraphrase prompts showing them). Prints one
table row per pipeline x method, with the fit seconds.

    python benchmarks/multi_concept.py [--models sd,flux] [--methods uce,mace,rece]
        [--concepts circle,triangle,heart] [--n 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd,flux")
    ap.add_argument("--methods", default="uce,mace,rece")
    ap.add_argument("--concepts", default="circle,triangle,heart")
    ap.add_argument("--n", type=int, default=12, help="prompts per set and object")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from erasekit import apply, erase, remove
    from erasekit.bench import BENCH_FAST
    from erasekit.evaluation.detectors import detect_all
    from erasekit.methods import make_config
    from erasekit.models import adapter_for, load_pipeline
    from erasekit.toyworld.detector import ToyDetector
    from erasekit.toyworld.grammar import OBJECT_NAMES
    from erasekit.toyworld.suite import object_prompts

    erased = args.concepts.split(",")
    kept = [o for o in OBJECT_NAMES if o not in erased]
    cases = []  # (case, object it should show, role)
    for concept in erased:
        for c in object_prompts(concept, args.n, 0):
            if c.set in ("simple", "synonym", "paraphrase"):
                cases.append((c, concept, "E" if c.set == "simple" else "R"))
    for other in kept:
        cases += [(c, other, "L") for c in object_prompts(other, args.n, 0) if c.set == "paraphrase"]
    detector = ToyDetector.load()
    head = " | ".join(f"Acc_E {c}" for c in erased)
    print(f"| model | method | {head} | Acc_R (all) | Acc_L ({', '.join(kept)}) | fit s |")
    print("|---|---|" + "---|" * len(erased) + "---|---|---|")

    def rates(adapter) -> dict[str, float]:
        images = []
        for start in range(0, len(cases), 32):
            chunk = cases[start : start + 32]
            with torch.no_grad():
                images += list(adapter.generate([c.prompt for c, _, _ in chunk], [c.seed for c, _, _ in chunk]))
        found = detect_all(detector, [(img * 255).round() / 255 for img in images], [o for _, o, _ in cases])
        out: dict[str, list[bool]] = {}
        for (_, obj, role), f in zip(cases, found):
            out.setdefault(f"E {obj}" if role == "E" else role, []).append(bool(f[0]))
        return {k: 100 * sum(v) / len(v) for k, v in out.items()}

    for model in args.models.split(","):
        pipe = load_pipeline(f"toy:{model}")
        pipe.set_progress_bar_config(disable=True)
        adapter = adapter_for(pipe)
        runs = [("base", None, 0.0)]
        for method in args.methods.split(","):
            config = make_config(method, "fast", BENCH_FAST.get(method, {}))
            began = time.time()
            runs.append((method, erase(pipe, ", ".join(erased), method, config, progress=False), time.time() - began))
        for label, edit, seconds in runs:
            if edit is not None:
                apply(pipe, edit)
            try:
                r = rates(adapter)
            finally:
                if edit is not None:
                    remove(pipe, edit)
            cells = " | ".join(f"{r[f'E {c}']:.1f}" for c in erased)
            fit = f"{seconds:.1f}" if edit is not None else ""
            print(f"| toy:{model} | {label} | {cells} | {r['R']:.1f} | {r['L']:.1f} | {fit} |", flush=True)


if __name__ == "__main__":
    main()

"""What exporting a Receler edit costs: its erasers distilled into a LoRA (erasekit export) against
the erasers themselves, on the toy suite and under the attacks, on both toy pipelines.

For each pipeline: Receler (fast preset, seed ``--seed``) erases the concept; `erasekit.export` writes the
distilled LoRA (diffusers-lora; the kohya file holds the same factors); the LoRA read back from
the exported file and the original edit are scored on the same prompts, seeds and detector
(Acc_E, Acc_R, Acc_L, H) and attacked with the same attacks (success %). Prints one table row per
pipeline x edit, and the distillation's residual and seconds.

    python benchmarks/export_receler.py [--models sd,flux] [--concept triangle] [--n 12]
        [--attacks textual-inversion,ring-a-bell,unlearndiffatk] [--attack-n 4] [--rank 16]
        [--threads 1] [--iterations N] [--seed 0] [--distill-into attention-output,prompt-keys-values]

``--distill-into``: one exported LoRA per place (``erasekit export --distill-into``), all scored
beside the erasers in the same evaluation and attack runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd,flux")
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--n-locality", type=int, default=8)
    ap.add_argument("--attacks", default="textual-inversion,ring-a-bell,unlearndiffatk")
    ap.add_argument("--attack-n", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=None, help="Receler's iterations (default: the fast preset's)")
    ap.add_argument("--seed", type=int, default=0, help="Receler's training seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--distill-into", default="prompt-keys-values,attention-output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from erasekit import Edit, erase, evaluate
    from erasekit.evaluation.attacks import attack
    from erasekit.export import LORA_WEIGHTS, export
    from erasekit.methods import make_config
    from erasekit.models import load_pipeline

    attacks = [a for a in args.attacks.split(",") if a]
    iters = {"iterations": str(args.iterations)} if args.iterations else {}
    iters["seed"] = str(args.seed)
    cols = " | ".join(attacks)
    print(f"| model | edit | Acc_E | Acc_R | Acc_L | H | {cols} | residual | seconds |")
    print("|---|---|---|---|---|---|" + "---|" * len(attacks) + "---|---|")
    for model in args.models.split(","):
        pipe = load_pipeline(f"toy:{model}")
        pipe.set_progress_bar_config(disable=True)
        began = time.time()
        edit = erase(pipe, args.concept, "receler", make_config("receler", "fast", iters), progress=False)
        fit_s = time.time() - began
        rows = [(edit, "receler (erasers)", "", fit_s)]
        with tempfile.TemporaryDirectory() as tmp:
            for into in args.distill_into.split(","):
                began = time.time()
                out = Path(tmp) / into
                record = export(
                    edit, pipe, "diffusers-lora", out, distill_rank=args.rank, distill_into=into, progress=False
                )
                seconds = time.time() - began
                tensors = load_file(str(out / LORA_WEIGHTS))
                method = f"receler-distilled-{into}"
                distilled = Edit(method, list(edit.concepts), edit.family, edit.base_model, tensors, kind="lora")
                label = f"exported LoRA (rank {args.rank}, {into})"
                rows.append((distilled, label, f"{record['relative_error']:.3f}", seconds))
            edits = [e for e, *_ in rows]
            suite = {"n": args.n, "n_locality": args.n_locality}
            ev = evaluate(pipe, "toy-objects", args.concept, edits=edits, suite_options=suite, progress=False)
            at = {"asr": {e.method: {} for e in edits}}
            if attacks:
                at = attack(
                    pipe,
                    "toy-objects",
                    args.concept,
                    edits=edits,
                    out=Path(tmp) / "attack",
                    attacks=attacks,
                    n=args.attack_n,
                    suite_options=suite,
                    progress=False,
                )
        metrics = {r["edit_id"]: r["metrics"] for r in ev["runs"] if r["edit_id"]}
        for e, label, residual, seconds in rows:
            m = metrics[e.id]
            asr = at["asr"][e.method]
            rates = " | ".join(f"{asr.get(a, float('nan')):.1f}" for a in attacks)
            print(
                f"| toy:{model} | {label} | {m['acc_e']:.1f} | {m['acc_r']:.1f} | {m['acc_l']:.1f} | {m['h']:.1f} "
                f"| {rates} | {residual} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

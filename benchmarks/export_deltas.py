"""What exporting a weight-delta edit (ESD-u, ESD-x, UCE) as a LoRA file costs: the edit applied by
erasekit against the exported file loaded by stock diffusers, on the toy suite.

For each method (fast preset, seed 0) the edit is exported with `erasekit.export` in ``--format``
(kohya: one .safetensors that Automatic1111 / ComfyUI load; diffusers-lora) at each ``--ranks``
(truncated SVD); a fresh pipeline loads the file with stock ``load_lora_weights`` and is scored
with the same prompts, seeds and detector as the edit applied by erasekit. Prints per method the
erasekit row, then one row per rank: the SVD's relative error (deltas of biases and norms, which no
LoRA carries, counted in it) and the suite's figures from the stock-loaded file.

    python benchmarks/export_deltas.py [--model toy:sd] [--methods esd-u,esd-x,uce]
        [--concept triangle] [--ranks 4,64] [--format kohya] [--n 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy:sd")
    ap.add_argument("--methods", default="esd-u,esd-x,uce")
    ap.add_argument("--concept", default="triangle")
    ap.add_argument("--ranks", default="4,64")
    ap.add_argument("--format", default="kohya", choices=["kohya", "diffusers-lora"])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--n-locality", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from erasekit import erase
    from erasekit.evaluation.evaluate import evaluate_run
    from erasekit.export import LORA_WEIGHTS, export
    from erasekit.methods import make_config
    from erasekit.models import load_pipeline

    suite = {"n": args.n, "n_locality": args.n_locality}

    def scored(pipe, edit=None) -> dict:
        pipe.set_progress_bar_config(disable=True)
        return evaluate_run(pipe, "toy-objects", args.concept, edit=edit, suite_options=suite)["metrics"]

    def row(method: str, what: str, m: dict, error: str, seconds: str) -> None:
        figures = " | ".join(f"{m[k]:.1f}" for k in ("acc_e", "acc_r", "acc_l", "h"))
        print(f"| {args.model} | {method} | {what} | {error} | {figures} | {seconds} |", flush=True)

    print("| model | method | edit | relative error | Acc_E | Acc_R | Acc_L | H | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    pipe = load_pipeline(args.model)
    row("-", "unedited", scored(pipe), "", "")
    for method in args.methods.split(","):
        pipe = load_pipeline(args.model)
        pipe.set_progress_bar_config(disable=True)
        edit = erase(pipe, args.concept, method, make_config(method, "fast", {}), progress=False)
        row(method, "applied by erasekit", scored(pipe, edit), "", "")
        with tempfile.TemporaryDirectory() as tmp:
            for rank in (int(r) for r in args.ranks.split(",")):
                out = Path(tmp) / (f"r{rank}.safetensors" if args.format == "kohya" else f"r{rank}")
                began = time.time()
                record = export(edit, args.model, args.format, out, rank=rank, progress=False)
                seconds = f"{time.time() - began:.1f}"
                stock = load_pipeline(args.model)
                if args.format == "kohya":
                    stock.load_lora_weights(str(out.parent), weight_name=out.name)
                else:
                    stock.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)
                label = f"{args.format} rank {rank}, stock load_lora_weights"
                row(method, label, scored(stock), f"{record['relative_error']:.4f}", seconds)


if __name__ == "__main__":
    main()

"""The ``erasekit`` command line: argument parsing and printing only; the library does the work."""

from __future__ import annotations

import argparse
import os
import sys


def _toyworld_train(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.family == "detector":
        from .toyworld.detector import train_detector

        accuracy = train_detector(args.out, seed=args.seed)
        print("test accuracy on fresh renders: " + ", ".join(f"{h} {100 * a:.2f}%" for h, a in accuracy.items()))
        return 0
    from .toyworld.train import TrainConfig, train

    cfg = TrainConfig(
        family=args.family,
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        vae_steps=args.vae_steps,
        dataset_size=args.dataset_size,
        batch_size=args.batch_size,
        lr=args.lr,
        vae=args.vae,
        threads=args.threads,
    )
    path = train(cfg)
    print(f"saved {cfg.family} to {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .toyworld.demo import run_demo

    result = run_demo(args.out, concept=args.concept, n=args.n)
    print(f"concept '{result['concept']}' on the unedited toy pipelines (detector: {result['detector']['name']})")
    for family, r in result["families"].items():
        print(f"  {family:5s} Acc_E {r['acc_e']:5.1f}  Acc_R {r['acc_r']:5.1f}  Acc_L {r['acc_l']:5.1f}  H {r['h']:5.1f}")
    print(f"wrote {args.out}/index.html and {args.out}/results.json in {result['seconds']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the toy world end to end: samples and the erasure suite, as an HTML page")
    demo.add_argument("--out", default="erasekit-demo", help="output folder (index.html, results.json)")
    demo.add_argument("--concept", default="circle", help="toy-world object to evaluate")
    demo.add_argument("--n", type=int, default=12, help="prompts per suite set")
    demo.set_defaults(func=_demo)

    toy = sub.add_parser("toyworld", help="the embedded toy text-to-image world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tr = toy_sub.add_parser("train", help="train a toy-world pipeline from scratch")
    tr.add_argument("--family", required=True, choices=["sd", "flux", "vae", "detector"])
    tr.add_argument("--out", required=True, help="folder to write the pipeline to")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--vae-steps", type=int, default=1500)
    tr.add_argument("--dataset-size", type=int, default=24_000)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--vae", default=None, help="reuse the autoencoder in this folder instead of training one")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.set_defaults(func=_toyworld_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns on every import that torchvision is absent (PIL is used instead): noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``erasekit`` command line: argument parsing and printing only; the library does the work."""

from __future__ import annotations

import argparse
import sys


def _toyworld_train(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    toy = sub.add_parser("toyworld", help="the embedded toy text-to-image world")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    tr = toy_sub.add_parser("train", help="train a toy-world pipeline from scratch")
    tr.add_argument("--family", required=True, choices=["sd", "flux", "vae"])
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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

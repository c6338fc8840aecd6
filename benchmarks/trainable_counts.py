"""Trainable parameters of every registered method on the released architectures (SD 1.4's UNet,
FLUX.1-dev's transformer), counted on the meta device from the method registry (no weights, no
training): what each method's paper preset changes.

    python benchmarks/trainable_counts.py [--methods receler,eraseanything,...] [--preset paper]
"""

from __future__ import annotations

import argparse

import torch
from real_configs import FLUX1_DEV_TRANSFORMER, SD14_UNET


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=None, help="comma-separated rows (default: every registered one)")
    ap.add_argument("--preset", default="paper")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from erasekit.methods import make_config, method_rows, resolve_method
    from erasekit.models import FamilyAdapter

    rows = args.methods.split(",") if args.methods else list(method_rows())
    with torch.device("meta"):
        models = {
            "SD 1.4 UNet": UNet2DConditionModel(**SD14_UNET),
            "FLUX.1-dev transformer": FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER),
        }
    adapters = {name: FamilyAdapter.for_denoiser(m) for name, m in models.items()}
    totals = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print("| method | " + " | ".join(adapters) + " |")
    print("|---|" + "---|" * len(adapters))
    print("| (whole denoiser) | " + " | ".join(f"{totals[n]:,}" for n in adapters) + " |")
    for row in rows:
        spec, fixed = resolve_method(row)
        config = make_config(spec.name, args.preset, fixed)
        cells = []
        for adapter in adapters.values():
            try:
                cells.append(f"{spec.trainable_parameters(adapter, config):,}")
            except Exception as exc:  # a method without a count: say why
                cells.append(f"n/a ({type(exc).__name__})")
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Trainable parameters of every registered method on the released architectures (SD 1.4's UNet,
FLUX.1-dev's transformer; and, for methods that train text encoders, SD 1.4's CLIP-L and
FLUX.1's CLIP-L + T5-XXL), counted on the meta device from the method registry (no weights, no
training): what each method's paper preset changes.

    python benchmarks/trainable_counts.py [--methods receler,eraseanything,...] [--preset paper]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from real_configs import CLIP_L_TEXT, FLUX1_DEV_TRANSFORMER, SD14_UNET, T5_XXL


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
    text_encoder_table(rows, args.preset)


def text_encoder_table(rows: list[str], preset: str) -> None:
    """The rows that train text encoders, counted on pipelines that hold only their text encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erasekit.methods import make_config, resolve_method
    from erasekit.models import UnsupportedPipelineError

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    tokenizer = object()  # only its presence marks a text tower
    pipes = {
        "SD 1.4 text encoder (CLIP-L)": SimpleNamespace(text_encoder=clip, tokenizer=tokenizer),
        "FLUX.1 text encoders (CLIP-L + T5-XXL)": SimpleNamespace(
            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer
        ),
    }
    lines = []
    for row in rows:
        spec, fixed = resolve_method(row)
        config = make_config(spec.name, preset, fixed)
        try:
            counts = [spec.trainable_parameters(pipe, config) for pipe in pipes.values()]
        except (UnsupportedPipelineError, AttributeError, TypeError):  # a denoiser method: needs its adapter
            continue
        if any(counts):
            lines.append(f"| {row} | " + " | ".join(f"{c:,}" for c in counts) + " |")
    if lines:
        print("\n| method | " + " | ".join(pipes) + " |")
        print("|---|" + "---|" * len(pipes))
        totals = [
            sum(
                p.numel()
                for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                if enc
                for p in enc.parameters()
            )
            for pipe in pipes.values()
        ]
        print("| (whole text encoders) | " + " | ".join(f"{t:,}" for t in totals) + " |")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

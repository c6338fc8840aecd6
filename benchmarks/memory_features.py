"""Measured: what gradient checkpointing saves in one EraseAnything training step, on a
FLUX.1-dev-shaped transformer narrowed to fit a CPU.

The transformer is FLUX.1-dev's block structure (dual-stream then single-stream blocks, the
real 4096-wide T5 input, 512 text tokens, 512 px images: 1024 image tokens) at ``--heads`` x 128
channels and ``--dual`` / ``--single`` blocks, random weights, float32 on the CPU. One step =
the LoRA student's forward with the keyword-layer probe, an MSE loss and backward, as in
EraseAnything's lower level. Peak resident memory is sampled during the step (the model and
inputs exist before it starts), for: no checkpointing, and checkpointing of every block but the
probed one (``gradient_checkpointing=True``). Activation bytes per block and per token-channel
come out of two depths, so FLUX.1-dev's (19 + 38 blocks, 3072 channels, bf16) can be derived.
glibc is told to serve every allocation above 64 KiB with mmap, so that freed tensors leave the
resident set at once and its peak tracks live tensors (otherwise heap fragmentation inflates it).

    python benchmarks/memory_features.py --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F
from real_configs import FLUX1_DEV_TRANSFORMER  # benchmarks/real_configs.py, beside this script

from erasekit.edits.lora import attach_lora, init_lora, lora_shapes, lora_targets
from erasekit.evaluation.resources import PeakMemory
from erasekit.methods import eraseanything as ea
from erasekit.models import Conditioning, FamilyAdapter

MIB = 1024**2


def build(heads: int, dual: int, single: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(FLUX1_DEV_TRANSFORMER) | {"num_attention_heads": heads, "num_layers": dual, "num_single_layers": single}
    return FluxTransformer2DModel(**cfg).eval().requires_grad_(False)


def step_peak_mib(heads: int, dual: int, single: int, checkpointing: bool, size: int = 512, text: int = 512) -> dict:
    """Peak RSS growth (MiB) and seconds of one LoRA training step."""
    transformer = build(heads, dual, single)
    adapter = FamilyAdapter.for_denoiser(transformer)
    adapter.default_height = adapter.default_width = size
    shapes = lora_shapes(adapter, 8, lora_targets(adapter, ea.EraseAnythingConfig.targets))
    init = init_lora(shapes, torch.Generator().manual_seed(0))
    handle = attach_lora(adapter, init, "bench", trainable=True)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, text, 4096, generator=g), torch.randn(1, 768, generator=g))
    x = adapter.sample_noise(1, height=size, width=size, generator=g)
    t = torch.tensor([500.0])
    layers = adapter.keyword_layers()
    tokens = x.shape[1] + text
    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        with adapter.gradient_checkpointing(keep=layers) if checkpointing else torch.enable_grad():
            with adapter.probe(layers=layers, token_indices=[3]) as probe:
                pred = adapter.predict(x, t, cond, guidance=3.5)
            loss = F.mse_loss(pred, torch.zeros_like(pred)) + 1e-3 * probe.last(layers[0]).pow(2).mean()
            loss.backward()
            del pred, loss, probe
        seconds = time.perf_counter() - t0
    handle.remove()
    return {
        "heads": heads,
        "width": heads * 128,
        "dual": dual,
        "single": single,
        "checkpointing": checkpointing,
        "tokens": tokens,
        "peak_increase_mib": round(mem.increase_mb, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depths", default="2,4;4,8", help="dual,single block counts; two depths separated by ';'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # M_MMAP_THRESHOLD (-3): see the module docstring
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except (OSError, AttributeError):
        print("not glibc: peaks include allocator caching", flush=True)
    start = time.time()
    rows = []
    for depth in args.depths.split(";"):
        dual, single = (int(v) for v in depth.split(","))
        for ckpt in (False, True):
            rows.append(step_peak_mib(args.heads, dual, single, ckpt))
            print(json.dumps(rows[-1]), flush=True)
    header = (
        f"{date.today()} · {platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
        f"· torch {torch.__version__} · float32 · `python benchmarks/memory_features.py {' '.join(sys.argv[1:])}` "
        f"· {time.time() - start:.0f} s wall"
    )
    lines = [
        header,
        "",
        "| width | dual + single blocks | tokens | checkpointing | peak +MiB (measured) | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['dual']} + {r['single']} | {r['tokens']} | {'yes' if r['checkpointing'] else 'no'} "
            f"| {r['peak_increase_mib']:.0f} | {r['seconds']:.1f} |"
        )
    if len(rows) == 4:
        a, b = rows[0], rows[2]
        blocks = (b["dual"] + b["single"]) - (a["dual"] + a["single"])
        for ckpt, (lo, hi) in (("no", (rows[0], rows[2])), ("yes", (rows[1], rows[3]))):
            per_block = (hi["peak_increase_mib"] - lo["peak_increase_mib"]) * MIB / blocks
            coeff = per_block / (a["tokens"] * a["width"])
            lines.append(
                f"\nCheckpointing {ckpt}: {per_block / MIB:.1f} MiB per added block = "
                f"{coeff:.1f} bytes per token-channel (float32)."
            )
    text = "\n".join(lines)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

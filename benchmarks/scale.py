"""Speed and memory of every erasure method on the released architectures.

SD 1.4 (always): the full UNet (859.5 M parameters), CLIP ViT-L/14 text encoder and KL
autoencoder with random weights (nothing is downloaded), float32, on this machine's device at a
small resolution (``--size``, default 64 px: 8x8 latents), batch 1. FLUX.1-dev: the same
measurements in bfloat16 when a CUDA device is present; without one, parameter counts (meta
device) and a memory estimate per method, marked as estimates.

How each figure is obtained (the table's "how" columns):

- Training methods run through ``erasekit.erase`` with the paper preset and a few iterations
  (one warm-up, then timed ones). Iteration boundaries and rollouts are observed through the
  training hooks (``erasekit.methods.hooks``): the ESD partial rollouts inside are cut to at most
  ``--rollout-cap`` sampler steps and their expected full cost is added back: E[t_enc] of each
  draw's range times the seconds of one rollout step as timed in the same run ("derived" figures).
  Trained parameters and recipe iterations come from the method registry (counted without
  training; FLUX.1-dev on the meta device). Receler's adversarial inner loop runs with 1
  and with 3 steps; the difference gives the cost of one step, and the recipe's 50 are added
  back. EraseAnything's preserve images (a one-off set-up) are generated with 1 image x 1 step;
  the recipe's set-up is estimated as images x steps guidance passes (the fastest pass timed at
  the start and around the inference measurements).
- UCE (closed form) runs as in the recipe: measured.
- Keyword zeroing and SLD have no training: the table gives their extra seconds per sampler
  step (one classifier-free-guidance pass with and without the edit) and per image.
- ESD-u fine-tunes nearly the whole UNet with Adam: more memory than this machine can spare,
  so it is estimated (see ``esd_u_estimate``) unless ``--measure-esd-u`` is given.
- Peak memory: growth of the resident set (CPU) or of allocated CUDA memory during ``erase``,
  and the process total at the peak.
- Seconds: on CUDA wall seconds; on CPU the process's CPU seconds (``time.process_time``), so
  that a shared, busy machine does not inflate them; with one torch thread on an idle machine
  they equal wall seconds.

    python benchmarks/scale.py --size 64 --threads 1 --json scale.json
    python benchmarks/scale.py --skip-sd --gradient-checkpointing --json scale-gpu.json  # on a GPU: FLUX.1-dev in bf16

Training runs use the methods' memory settings (:mod:`erasekit.methods.memory`): text encoders
released by default; ``--gradient-checkpointing`` turns checkpointing on for every training run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
from real_configs import (  # benchmarks/real_configs.py, beside this script
    CLIP_L_TEXT,
    FLUX1_DEV_TRANSFORMER,
    FLUX1_SCHEDULER,
    FLUX1_VAE,
    SD14_SCHEDULER,
    SD14_UNET,
    SD14_VAE,
    T5_XXL,
)

from erasekit.edits import apply, remove
from erasekit.evaluation.resources import PeakMemory, release_free_memory, rss_bytes
from erasekit.methods import erase, make_config, resolve_method
from erasekit.methods.hooks import TrainingHooks, training_hooks
from erasekit.models import adapter_for

CONCEPT = "car"
SYNONYMS = "automobile,motorcar"
IRRELEVANT = "dog,tree,house,boat,bird,chair,cup,flower"
WORDS = (
    "a an the photo image picture of "
    + CONCEPT
    + " "
    + SYNONYMS.replace(",", " ")
    + " "
    + IRRELEVANT.replace(",", " ")
).split()
GIB = 1024**3


# ---- the models ----------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_sd14(size: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """StableDiffusionPipeline with SD 1.4's UNet, CLIP text encoder and VAE, random weights;
    the adapter's defaults set to ``size`` px (latents (1, 4, size/8, size/8))."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.toyworld.offline_tokenizers import clip_word_tokenizer

    torch.manual_seed(0)
    tok = clip_word_tokenizer(WORDS, model_max_length=77)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with torch.device(device), _default_dtype(dtype):
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD14_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids)),
            tokenizer=tok,
            unet=UNet2DConditionModel(**SD14_UNET),
            scheduler=DDIMScheduler(**SD14_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _finish(pipe, size)


def build_flux1_dev(
    size: int, device: str, dtype: torch.dtype = torch.bfloat16, layers: tuple[int, int, int] | None = None
):
    """FluxPipeline with FLUX.1-dev's transformer, T5-XXL, CLIP and VAE, random weights, made
    directly in ``dtype`` on ``device``. ``layers`` (dual, single, T5) shrinks the stacks (and
    the text to 32 tokens), to check this code path on a small machine."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erasekit.toyworld.offline_tokenizers import clip_word_tokenizer, t5_word_tokenizer

    torch.manual_seed(0)
    clip_tok = clip_word_tokenizer(WORDS, model_max_length=77)
    t5_tok = t5_word_tokenizer(WORDS, model_max_length=512)
    transformer_cfg, t5_cfg = dict(FLUX1_DEV_TRANSFORMER), dict(T5_XXL)
    if layers:
        transformer_cfg |= {"num_layers": layers[0], "num_single_layers": layers[1]}
        t5_cfg["num_layers"] = layers[2]
    ids = {
        "bos_token_id": clip_tok.bos_token_id,
        "eos_token_id": clip_tok.eos_token_id,
        "pad_token_id": clip_tok.pad_token_id,
    }
    with torch.device(device), _default_dtype(dtype):
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER),
            vae=AutoencoderKL(**FLUX1_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids)),
            tokenizer=clip_tok,
            text_encoder_2=T5EncoderModel(
                T5Config(**t5_cfg, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)
            ),
            tokenizer_2=t5_tok,
            transformer=FluxTransformer2DModel(**transformer_cfg),
        )
    return _finish(pipe, size, max_sequence_length=32 if layers else 512)


def _finish(pipe, size: int, **defaults):
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.erasekit_defaults = {"height": size, "width": size, **defaults}
    adapter_for(pipe)
    return pipe


def component_parameters(pipe) -> dict[str, int]:
    """Parameters per pipeline component."""
    return {
        n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
    }


# ---- timing --------------------------------------------------------------------------------


def _now(device) -> float:
    """The benchmark's clock in seconds. CUDA: wall time, once the queued work is done. CPU: the
    process's CPU time (all threads): what the work costs whatever else the shared machine runs;
    with one torch thread on an idle machine it equals wall time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class _Timer(TrainingHooks):
    """Training hooks (erasekit.methods.hooks) that stamp when each iteration starts and the loop
    ends, and time every partial rollout, cut to ``cap`` sampler steps (all on :func:`_now`'s clock)."""

    def __init__(self, cap: int, device):
        self.cap, self.device = cap, device
        self.stamps: list[float] = []
        # (start, seconds, requested t_enc, steps run, the source's t_enc bound "high")
        self.rollouts: list[tuple[float, float, int, int, int]] = []

    def iteration_started(self, run, iteration):
        self.stamps.append(_now(self.device))

    def loop_ended(self, run):
        self.stamps.append(_now(self.device))

    @contextlib.contextmanager
    def rollout(self, source, t_enc):
        t0 = _now(self.device)
        ran = min(int(t_enc), self.cap)
        yield ran
        self.rollouts.append((t0, _now(self.device) - t0, int(t_enc), ran, source.high))


@dataclasses.dataclass
class FitTiming:
    """One instrumented ``erase``: set-up seconds (call to first iteration), seconds per
    iteration, the seconds each iteration spent in (capped) rollouts (all on :func:`_now`'s
    clock), the sampler steps its rollouts would take on average in the recipe (uncapped:
    (high - 1) / 2 per draw, t_enc ~ U[0, high)), and memory (MiB)."""

    setup_s: float
    iteration_s: list[float]
    rollout_s: list[float]
    requested_t_enc: list[int]
    expected_rollout_steps: list[float]
    rollout_step_s: float | None  # seconds per sampler step of the rollouts that ran any
    peak_increase_mb: float
    peak_total_mb: float
    memory_kind: str
    seconds: float


def timed_fit(pipe, method: str, overrides: dict[str, str], rollout_cap: int, device) -> FitTiming:
    """Run ``erase(pipe, CONCEPT, method, paper preset + overrides)`` under :class:`_Timer`'s
    training hooks (rollouts cut to ``rollout_cap`` sampler steps)."""
    config = make_config(method, "paper", overrides)
    timer = _Timer(rollout_cap, device)
    with training_hooks(timer), PeakMemory(device) as mem:
        t0 = _now(device)
        erase(pipe, CONCEPT, method, config, progress=False)
        total = _now(device) - t0
    stamps, rollouts = timer.stamps, timer.rollouts
    iteration_s, rollout_s, t_encs, expected = [], [], [], []
    for a, b in zip(stamps, stamps[1:]):
        inside = [r for r in rollouts if a <= r[0] < b]
        iteration_s.append(b - a)
        rollout_s.append(sum(r[1] for r in inside))
        t_encs.append(sum(r[2] for r in inside))
        expected.append(sum((r[4] - 1) / 2 for r in inside))
    per_step = [r[1] / r[3] for r in rollouts if r[3]]
    return FitTiming(
        stamps[0] - t0 if stamps else total,
        iteration_s,
        rollout_s,
        t_encs,
        expected,
        statistics.mean(per_step) if per_step else None,
        mem.increase_mb,
        mem.peak_mb,
        mem.kind,
        total,
    )


def cfg_pass_seconds(adapter, reps: int, device) -> float:
    """Seconds of one classifier-free-guidance pass at batch 1 (one rollout or sampler step):
    the fastest of ``reps`` after a warm-up, on prompts encoded now (so that text-side edits
    see them)."""
    cond, uncond = adapter.encode([f"a photo of a {CONCEPT}"]), adapter.encode([""])
    g = torch.Generator().manual_seed(0)
    x = adapter.sample_noise(1, generator=g)
    t = adapter.sample_timesteps(1, generator=g)
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):  # the first is a warm-up
            t0 = _now(device)
            adapter.guided_predict(x, t, cond, uncond, adapter.default_guidance)
            times.append(_now(device) - t0)
    return min(times[1:])


def adam_seconds_per_parameter(device, n: int = 25_000_000, dtype=torch.float32) -> float:
    """Seconds per parameter of one torch Adam step (measured on ``n`` parameters)."""
    p = torch.nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
    p.grad = torch.randn(n, device=device, dtype=dtype)
    opt = torch.optim.Adam([p], lr=1e-4)
    opt.step()  # allocates the states
    t0 = _now(device)
    opt.step()
    return (_now(device) - t0) / n


# ---- per method ----------------------------------------------------------------------------


def recipe_iterations(method: str, config, family: str) -> int:
    """Iterations of the method's recipe (0: no training loop), from the method registry."""
    return resolve_method(method)[0].training_iterations(config, family, CONCEPT)


def trained_parameters(adapter, method: str, config) -> int:
    """Parameters the method trains (or, for UCE, rewrites) on this model, from the method
    registry (counted without training; on a meta-device model too)."""
    return resolve_method(method)[0].trainable_parameters(adapter, config)


def _row(model, method, **kw) -> dict:
    return {"model": model, "method": method} | kw


def memory_overrides(args) -> dict[str, str]:
    """Settings every timed training run gets from the command line (erasekit.methods.memory)."""
    return {"gradient_checkpointing": "true"} if args.gradient_checkpointing else {}


def measure_training(pipe, label: str, args, device) -> list[dict]:
    """Rows for esd-x, receler and eraseanything on ``pipe``, before :func:`derive`."""
    adapter = adapter_for(pipe)
    rows = []
    cap, warm, timed = args.rollout_cap, 1, args.iters
    ea_words = {"synonyms": SYNONYMS, "irrelevant": IRRELEVANT}

    def run(method, overrides, iterations):
        release_free_memory()
        print(f"  {label} {method} {overrides} ...", flush=True)
        return timed_fit(
            pipe, method, overrides | memory_overrides(args) | {"iterations": str(iterations)}, cap, device
        )

    # ESD-x
    cfg = make_config("esd", "paper", {"group": "esd-x"})
    f = run("esd", {"group": "esd-x"}, warm + timed)
    train = [i - r for i, r in zip(f.iteration_s[warm:], f.rollout_s[warm:])]
    rows.append(_iteration_row(label, "esd-x", adapter, "esd", cfg, f, statistics.mean(train)))

    # Receler: the adversarial inner loop at 1 and 3 steps gives the cost of one step.
    cfg = make_config("receler", "paper")
    f1 = run("receler", {"adv_steps": "1"}, warm + timed)
    f3 = run("receler", {"adv_steps": "3"}, 1)  # the process is warm: its only iteration is timed
    t1 = statistics.mean(i - r for i, r in zip(f1.iteration_s[warm:], f1.rollout_s[warm:]))
    t3 = f3.iteration_s[0] - f3.rollout_s[0]
    adv_step = max(0.0, (t3 - t1) / 2)
    train = t1 + (cfg.adv_steps - 1) * adv_step
    rows.append(
        _iteration_row(
            label,
            "receler",
            adapter,
            "receler",
            cfg,
            f1,
            train,
            extra={
                "adv_step_s": adv_step,
                "iteration_adv1_s": t1,
                "iteration_adv3_s": t3,
                "peak_increase_adv3_mb": f3.peak_increase_mb,
            },
        )
    )

    # EraseAnything: alternating levels; an even number of timed iterations covers both.
    cfg = make_config("eraseanything", "paper", ea_words)
    n_timed = timed + timed % 2
    f = run("eraseanything", ea_words | {"preserve_images": "1", "preserve_steps": "1"}, warm + n_timed)
    train = statistics.mean(i - r for i, r in zip(f.iteration_s[warm:], f.rollout_s[warm:]))
    passes = cfg.preserve_images * (
        cfg.preserve_steps or adapter.generation_steps
    )  # the preserve images, batch 1 each
    rows.append(_iteration_row(label, "eraseanything", adapter, "eraseanything", cfg, f, train, setup_passes=passes))
    return rows


def _iteration_row(
    label,
    name,
    adapter,
    method,
    cfg,
    f: FitTiming,
    train_s: float,
    setup_passes: int | None = None,
    extra: dict | None = None,
    warm: int = 1,
) -> dict:
    """A training method's row; :func:`derive` completes it. ``setup_passes``: the recipe's
    set-up costs that many guidance passes (estimated) instead of the measured set-up; ``warm``:
    the untimed iterations at the start of ``f``."""
    return _row(
        label,
        name,
        trained_params=trained_parameters(adapter, method, cfg),
        s_per_iteration_how="derived",
        iterations=recipe_iterations(method, cfg, adapter.family),
        total_how="derived" if setup_passes is None else "estimated",
        peak_increase_mb=f.peak_increase_mb,
        peak_total_mb=f.peak_total_mb,
        memory_how="measured",
        memory_kind=f.memory_kind,
        detail={
            "train_step_s": train_s,
            "expected_rollout_steps": statistics.mean(f.expected_rollout_steps[warm:]),
            "setup_measured_s": f.setup_s,
            "setup_passes": setup_passes,
            "timed_iterations_s": f.iteration_s,
            "rollout_s": f.rollout_s,
            "requested_t_enc": f.requested_t_enc,
            "rollout_step_s": f.rollout_step_s,
        }
        | (extra or {}),
    )


def derive(row: dict, cfg_s: float) -> dict:
    """Seconds per iteration (the measured step without rollouts + the expected rollout steps x
    the seconds of one rollout step as timed in the same run, else one guidance pass ``cfg_s``)
    and the recipe's total (set-up + iterations x that)."""
    d = row["detail"]
    per_it = d["train_step_s"] + d["expected_rollout_steps"] * (d["rollout_step_s"] or cfg_s)
    setup = d["setup_measured_s"] if d["setup_passes"] is None else d["setup_passes"] * cfg_s
    d |= {"cfg_pass_s": cfg_s, "setup_s": setup}
    return row | {"s_per_iteration": per_it, "total_s": setup + row["iterations"] * per_it}


def measure_uce(pipe, label: str, device) -> dict:
    adapter = adapter_for(pipe)
    cfg = make_config("uce", "paper")
    release_free_memory()
    print(f"  {label} uce ...", flush=True)
    with PeakMemory(device) as mem:
        t0 = _now(device)
        erase(pipe, CONCEPT, "uce", cfg, progress=False)
        s = _now(device) - t0
    return _row(
        label,
        "uce",
        trained_params=trained_parameters(adapter, "uce", cfg),
        s_per_iteration=None,
        s_per_iteration_how="closed form",
        iterations=0,
        total_s=s,
        total_how="measured",
        peak_increase_mb=mem.increase_mb,
        peak_total_mb=mem.peak_mb,
        memory_how="measured",
        memory_kind=mem.kind,
    )


def measure_inference(pipe, label: str, method: str, reps: int, device) -> dict:
    """Extra seconds per sampler step (and per image) of a no-training method: guidance passes
    without and with the edit, interleaved twice, the fastest of each compared."""
    adapter = adapter_for(pipe)
    print(f"  {label} {method} ...", flush=True)
    edit = erase(pipe, CONCEPT, method, make_config(method, "paper"), progress=False)
    base, edited = [], []
    for _ in range(2):
        base.append(cfg_pass_seconds(adapter, reps, device))
        apply(pipe, edit)
        try:
            with PeakMemory(device) as mem:
                edited.append(cfg_pass_seconds(adapter, reps, device))
        finally:
            remove(pipe, edit)
    base_cfg_s, s = min(base), min(edited)
    steps = adapter.generation_steps
    return _row(
        label,
        method,
        trained_params=0,
        s_per_iteration=None,
        s_per_iteration_how="no training",
        iterations=0,
        total_s=0.0,
        total_how="no training",
        step_overhead_s=s - base_cfg_s,
        image_overhead_s=steps * (s - base_cfg_s),
        inference_steps=steps,
        peak_increase_mb=mem.increase_mb,
        peak_total_mb=mem.peak_mb,
        memory_how="measured",
        memory_kind=mem.kind,
        detail={"cfg_pass_with_edit_s": s, "cfg_pass_base_s": base_cfg_s},
    )


def esd_u_estimate(pipe, label: str, esd_x: dict, cfg_s: float, device) -> dict:
    """ESD-u from measured parts: ESD-x's iteration, plus one more backward's worth of weight
    gradients (about one forward pass: half a guidance pass at batch 2), plus a torch Adam step
    over the group (its measured seconds per parameter); memory: the process before training
    plus, per trained parameter, the student copy, its gradient and Adam's two states."""
    adapter = adapter_for(pipe)
    cfg = make_config("esd", "paper", {"group": "esd-u"})
    n = trained_parameters(adapter, "esd", cfg)
    size = next(adapter.denoiser.parameters()).element_size()
    adam = adam_seconds_per_parameter(device) * n
    per_it = esd_x["s_per_iteration"] + cfg_s / 2 + adam
    iters = recipe_iterations("esd", cfg, adapter.family)
    base_mb = (
        (rss_bytes() or 0) / 2**20 if torch.device(device).type == "cpu" else torch.cuda.memory_allocated() / 2**20
    )
    states = 4 * size  # bytes per trained parameter: student copy, gradient, exp_avg, exp_avg_sq
    activations = max(
        0.0, esd_x["peak_increase_mb"] - esd_x["trained_params"] * states / 2**20
    )  # ESD-x's, less its own states
    increase = n * states / 2**20 + activations
    return _row(
        label,
        "esd-u",
        trained_params=n,
        s_per_iteration=per_it,
        s_per_iteration_how="estimated",
        iterations=iters,
        total_s=iters * per_it,
        total_how="estimated",
        peak_increase_mb=increase,
        peak_total_mb=base_mb + increase,
        memory_how="estimated",
        memory_kind=esd_x["memory_kind"],
        detail={"adam_step_s": adam},
    )


# ---- FLUX.1-dev without a GPU: counts and estimates -------------------------------------------


def flux_estimates(size: int = 512) -> list[dict]:
    """FLUX.1-dev per method from the meta-device architecture: parameter counts (exact) and
    memory at ``size`` px, batch 1 (estimates): bf16 weights of every component; trainable
    parts: Receler's erasers and EraseAnything's LoRA in float32 with gradient and Adam's two
    states (16 B per parameter), ESD's group trained in place in bf16 (student copy, gradient
    and two Adam states: 8 B per parameter; the frozen original is the model's own tensor);
    activations for one backward pass through every block: 34 * L * d bytes per block (bf16,
    fused attention; Korthikanti et al. 2022), L = image tokens + 512 text tokens, d = 3072.

    Two more totals for the training methods, with erasekit's memory features
    (:mod:`erasekit.methods.memory`): "released" without the text encoders' weights (encoded
    once, parked on the CPU); "released + checkpointing" with activations of 2 * L * d bytes
    (the block's input) per checkpointed block, plus one block's full activations while it is
    recomputed, plus the full activations of the blocks probed with gradient (EraseAnything:
    its keyword layer)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erasekit.models import FamilyAdapter

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        counts = {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "text_encoder_2 (T5-XXL)": sum(p.numel() for p in T5EncoderModel(T5Config(**T5_XXL)).parameters()),
            "text_encoder (CLIP-L)": sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).parameters()),
            "vae": sum(p.numel() for p in AutoencoderKL(**FLUX1_VAE).parameters()),
        }
    adapter = FamilyAdapter.for_denoiser(transformer)
    weights_gb = 2 * sum(counts.values()) / GIB
    blocks = FLUX1_DEV_TRANSFORMER["num_layers"] + FLUX1_DEV_TRANSFORMER["num_single_layers"]
    d = FLUX1_DEV_TRANSFORMER["num_attention_heads"] * FLUX1_DEV_TRANSFORMER["attention_head_dim"]
    tokens = (size // 16) ** 2 + 512
    act_gb = 34 * tokens * d * blocks / GIB
    infer_gb = 34 * tokens * d / GIB  # inference keeps about one block's activations alive
    text_gb = 2 * (counts["text_encoder_2 (T5-XXL)"] + counts["text_encoder (CLIP-L)"]) / GIB
    rows = []
    for name, method, over, per_param in (
        ("receler", "receler", {}, 16),
        ("eraseanything", "eraseanything", {}, 16),
        ("esd-x", "esd", {"group": "esd-x"}, 8),
        ("esd-u", "esd", {"group": "esd-u"}, 8),
        ("uce", "uce", {}, 0),
        ("keyword_zeroing", "keyword_zeroing", {}, 0),
        ("sld", "sld", {}, 0),
    ):
        cfg = make_config(method, "paper", over)
        n = trained_parameters(adapter, method, cfg)
        train_gb = n * per_param / GIB
        iters = recipe_iterations(method, cfg, "flux")
        acts = act_gb if iters else infer_gb
        est = {
            "weights_bf16": weights_gb,
            "trained_states": train_gb,
            "activations": acts,
            "total": weights_gb + train_gb + acts,
        }
        if iters:
            probed = len(adapter.keyword_layers()) if name == "eraseanything" else 0
            ckpt_acts = (2 * tokens * d * (blocks - probed) + 34 * tokens * d * (1 + probed)) / GIB
            est |= {
                "total_released": est["total"] - text_gb,
                "total_released_checkpointing": weights_gb - text_gb + train_gb + ckpt_acts,
            }
        rows.append(
            _row("FLUX.1-dev", name, trained_params=n, iterations=iters, memory_how="estimated", estimate_gb=est)
        )
    return [{"counts": counts, "size": size, "tokens": tokens}, *rows]


# ---- report --------------------------------------------------------------------------------


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown(rows: list[dict], flux: list[dict] | None, header: str) -> str:
    lines = [
        header,
        "",
        "| model | method | trained params | s / iteration | how | recipe iterations | recipe total | how | "
        "extra s / step (/ image) | peak +GiB (total GiB) | how |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = "-"
        if "step_overhead_s" in r:
            overhead = f"{r['step_overhead_s']:+.2f} ({r['image_overhead_s']:+.0f} s / {r['inference_steps']} steps)"
        total = r["total_s"]
        total_txt = (
            "-"
            if r["total_how"] == "no training"
            else (f"{total / 3600:.1f} h" if total >= 3600 else f"{total:.0f} s")
        )
        lines.append(
            f"| {r['model']} | {r['method']} | {r['trained_params']:,} | {_f(r['s_per_iteration'])} "
            f"| {r['s_per_iteration_how']} "
            f"| {r['iterations'] or '-'} | {total_txt} | {r['total_how']} | {overhead} "
            f"| {r['peak_increase_mb'] / 1024:.2f} ({r['peak_total_mb'] / 1024:.1f}) | {r['memory_how']} |"
        )
    if flux:
        info, frows = flux[0], flux[1:]
        counts = ", ".join(f"{k} {v:,}" for k, v in info["counts"].items())
        lines += [
            "",
            f"FLUX.1-dev, no GPU: parameter counts (meta device, exact): {counts}. Memory per method at "
            f"{info['size']} px, batch 1 ({info['tokens']} tokens), all **estimated**:",
            "",
            "| model | method | trained params | recipe iterations | weights bf16 GiB | trained states GiB "
            "| activations GiB "
            "| total GiB | text encoders released | released + checkpointing | how |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in frows:
            e = r["estimate_gb"]
            lines.append(
                f"| {r['model']} | {r['method']} | {r['trained_params']:,} | {r['iterations'] or '-'} "
                f"| {e['weights_bf16']:.1f} | {e['trained_states']:.2f} | {e['activations']:.1f} | {e['total']:.1f} "
                f"| {_f(e.get('total_released'), '{:.1f}')} "
                f"| {_f(e.get('total_released_checkpointing'), '{:.1f}')} | estimated |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="SD image size in px (latents size/8)")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    ap.add_argument("--rollout-cap", type=int, default=1, help="sampler steps a rollout really runs while timing")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of a guidance pass (the fastest counts)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--measure-esd-u",
        action="store_true",
        help="train ESD-u for real (needs about 4x the UNet's size in free memory)",
    )
    ap.add_argument("--flux-size", type=int, default=512)
    ap.add_argument(
        "--flux-layers", default=None, help="dual,single,t5 layer counts (a small stand-in to check the GPU path)"
    )
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="train with gradient_checkpointing=true (erasekit.methods.memory)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    start = time.time()
    rows: list[dict] = []
    cuda = torch.cuda.is_available()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    def measure(pipe, label, device):
        adapter = adapter_for(pipe)
        first = cfg_pass_seconds(adapter, args.reps, device)
        training = measure_training(pipe, label, args, device)
        if args.measure_esd_u:
            f = timed_fit(
                pipe,
                "esd",
                {"group": "esd-u", "iterations": str(1 + args.iters)} | memory_overrides(args),
                args.rollout_cap,
                device,
            )
            train = statistics.mean(i - r for i, r in zip(f.iteration_s[1:], f.rollout_s[1:]))
            training.append(
                _iteration_row(
                    label, "esd-u", adapter, "esd", make_config("esd", "paper", {"group": "esd-u"}), f, train
                )
            )
        others = [measure_uce(pipe, label, device)] + [
            measure_inference(pipe, label, m, args.reps, device) for m in ("keyword_zeroing", "sld")
        ]
        # One guidance pass: the fastest seen, at the start and between the inference runs.
        cfg_s = min([first] + [r["detail"]["cfg_pass_base_s"] for r in others if "detail" in r])
        print(f"  {label}: one guidance pass {cfg_s:.2f} s (first measured {first:.2f} s)", flush=True)
        training = [derive(r, cfg_s) for r in training]
        if not args.measure_esd_u:
            training.append(esd_u_estimate(pipe, label, training[0], cfg_s, device))
        return training + others

    if not args.skip_sd:
        device = "cuda" if cuda else "cpu"
        print(f"building SD 1.4 ({args.size} px) on {device} ...", flush=True)
        t0 = time.time()
        pipe = build_sd14(args.size, device)
        print(f"  built in {time.time() - t0:.0f} s: {component_parameters(pipe)}", flush=True)
        rows += measure(pipe, f"SD 1.4 @{args.size}px", device)
        del pipe
        release_free_memory()
    flux = None
    if cuda or args.flux_layers:
        layers = tuple(int(x) for x in args.flux_layers.split(",")) if args.flux_layers else None
        device = "cuda" if cuda else "cpu"
        print(
            f"building FLUX.1-dev{' (shrunk ' + str(layers) + ')' if layers else ''} "
            f"({args.flux_size} px) on {device} ...",
            flush=True,
        )
        pipe = build_flux1_dev(args.flux_size, device, dtype=torch.bfloat16 if cuda else torch.float32, layers=layers)
        label = f"FLUX.1-dev{'-shrunk' if layers else ''} @{args.flux_size}px"
        rows += measure(pipe, label, device)
        del pipe
    if not cuda:
        flux = flux_estimates(args.flux_size)
    where = torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    header = (
        f"{date.today()} · {where}, {torch.get_num_threads()} torch threads"
        + (f", load average {load[0]:.1f} at start" if load else "")
        + f" · torch {torch.__version__} · SD 1.4 in float32 at {args.size} px, batch 1, random weights"
        + ("" if cuda else " · seconds are CPU seconds of the process")
        + f" · `python benchmarks/scale.py {' '.join(sys.argv[1:])}` · {time.time() - start:.0f} s wall"
        + ("" if cuda else " · no GPU: FLUX.1-dev not measured")
    )
    text = markdown(rows, flux, header)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "flux_estimates": flux}, f, indent=2)


if __name__ == "__main__":
    main()

"""Train the toy-world pipelines from scratch on rendered scenes (``erasekit toyworld train``).

Stages: render a fixed data set; train a small KL autoencoder (or reuse one); train the denoiser
together with its text encoders on random captions of the rendered scenes (text encoders are
frozen afterwards, as in released models); save an ordinary diffusers pipeline folder.
Deterministic for a given seed, thread count and machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from ..files import atomic_folder, check_output_folder
from ..models.loading import write_defaults
from .architectures import TEXT_LENGTH, build_vae, flux_components, sd_components
from .grammar import OBJECT_NAMES, Scene, canonical_caption, mentions, object_by_name, sample_scene, training_caption
from .render import IMAGE_SIZE, render_batch

SAMPLING_DEFAULTS = {
    "sd": {"num_inference_steps": 25, "guidance": 5.0},
    "flux": {"num_inference_steps": 28, "guidance": 4.0},
}


@dataclass
class TrainConfig:
    family: str  # "sd" | "flux" | "vae"
    out: str
    seed: int = 0
    dataset_size: int = 24_000
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    steps: int = 4000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    vae: str | None = None  # folder of a trained VAE to reuse instead of training one
    # Train the text encoders with the denoiser (the recipe of the shipped pipelines) or keep
    # them frozen at their random initialisation.
    train_text_encoders: bool = True
    threads: int | None = None
    snapshot_every: int = 1000
    # Caption curriculum: the first ``canonical_steps`` steps see only canonical captions (one
    # word order, the object's own name); afterwards a ``canonical_share`` of captions stay
    # canonical and the rest come from the full grammar. Without it the SD-style UNet, which has
    # no pooled text path, learns colours but never reads the object word.
    canonical_steps: int = 0
    canonical_share: float = 0.0
    # Objects the model never sees: the renderer never draws them and no caption names them (by
    # name, synonym or indirect mention). Everything else as without it: an oracle of erasure.
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        self.exclude = tuple(self.exclude)
        for name in self.exclude:
            object_by_name(name)  # ValueError naming the known objects
        if set(OBJECT_NAMES) <= set(self.exclude):
            raise ValueError("--exclude leaves no object to train on")

    @property
    def objects(self) -> tuple[str, ...]:
        """The objects the training scenes draw from."""
        return tuple(o for o in OBJECT_NAMES if o not in self.exclude)


def like_shipped(
    family: str, out: str, exclude: tuple[str, ...] = (), threads: int | None = None, seed: int | None = None
) -> TrainConfig:
    """The recorded config of the shipped ``family`` pipeline (its ``training.json``: seed, steps,
    curriculum, batch, learning rate, ...) writing to ``out``, reusing the shipped autoencoder,
    with ``exclude`` and ``threads`` as given: retraining it without some objects changes nothing else.
    ``seed`` replaces the recorded seed when given (another draw of the same recipe)."""
    from . import weights_dir

    if family not in ("sd", "flux"):
        raise ValueError(f"no shipped pipeline of family {family!r}: expected 'sd' or 'flux'")
    recorded = json.loads((weights_dir() / family / "training.json").read_text())["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {k: v for k, v in recorded.items() if k in fields}
    settings |= {"out": str(out), "vae": str(weights_dir() / family / "vae"), "threads": threads, "exclude": exclude}
    if seed is not None:
        settings["seed"] = seed
    return TrainConfig(**settings)


def render_dataset(size: int, seed: int, objects: tuple[str, ...] = OBJECT_NAMES) -> tuple[list[Scene], torch.Tensor]:
    """``size`` random scenes of ``objects`` and their images as float (N, 3, 32, 32) in [-1, 1]."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, objects=objects) for _ in range(size)]
    seeds = [seed * 10_000_000 + i for i in range(size)]
    imgs = []
    for start in tqdm(range(0, size, 2000), desc="render", leave=False):
        imgs.append(render_batch(scenes[start : start + 2000], seeds[start : start + 2000]))
    arr = np.concatenate(imgs)
    return scenes, torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(images: torch.Tensor, cfg: TrainConfig) -> AutoencoderKL:
    """Fit the autoencoder to reconstruct ``images`` (MSE + small KL); returns it in eval mode."""
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    for step in bar:
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-5 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``images``: (N, 4, 16, 16), unscaled."""
    return torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])


def training_batch(
    scenes: list[Scene], step: int, cfg: TrainConfig, rng: random.Random, g: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """The dataset indices (batch_size,) and captions of training step ``step``. A caption that
    names an excluded object is a bug, and stops training."""
    idx = torch.randint(len(scenes), (cfg.batch_size,), generator=g)
    captions = [_caption(scenes[i], step, cfg, rng) for i in idx.tolist()]
    for caption in captions:
        for name in cfg.exclude:
            if mentions(caption, name):
                raise RuntimeError(f"caption {caption!r} names the excluded object {name!r}")
    return idx, captions


def _caption(scene: Scene, step: int, cfg: TrainConfig, rng: random.Random) -> str:
    """The training caption of ``scene`` at ``step``: empty (dropout), canonical or from the grammar."""
    if rng.random() < cfg.caption_dropout:
        return ""
    if step < cfg.canonical_steps or (cfg.canonical_share and rng.random() < cfg.canonical_share):
        return canonical_caption(scene)
    return training_caption(scene, rng)


def _sd_loss(pipe: StableDiffusionPipeline, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
    x_t = pipe.scheduler.add_noise(x0, noise, t)
    target = noise if pipe.scheduler.config.prediction_type == "epsilon" else pipe.scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(pipe.unet(x_t, t, embeds).sample, target)


def _flux_loss(pipe: FluxPipeline, x0: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
    embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device="cpu", max_sequence_length=TEXT_LENGTH)
    b, c, h, w = x0.shape
    x0 = FluxPipeline._pack_latents(x0, b, c, h, w)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(b, generator=g))  # logit-normal timesteps
    x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x0.dtype)
    pred = pipe.transformer(
        hidden_states=x_t,
        timestep=sigma,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
    ).sample
    return F.mse_loss(pred, noise - x0)


def _assemble(family: str, vae: AutoencoderKL, latents: torch.Tensor, seed: int):
    """A pipeline of fresh components (initialised from ``seed``) around the trained VAE,
    latent scaling set from data."""
    torch.manual_seed(seed)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    if family == "sd":
        return StableDiffusionPipeline(
            **sd_components() | {"vae": vae},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    vae.register_to_config(shift_factor=float(latents.mean()))
    return FluxPipeline(**flux_components() | {"vae": vae})


def _portable(path: str | None) -> str | None:
    """``path`` as a record holds it: relative to the working directory when inside it, so that
    a record written in one checkout reads the same in every clone."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _is_training_output(folder: Path) -> bool:
    """A folder this trainer wrote (its ``training.json``): the only kind ``--out`` may replace."""
    return (folder / "training.json").is_file()


def _save_pipeline(pipe, out: Path, record: dict, family: str) -> None:
    """Write the pipeline folder atomically: a temporary folder renamed into place."""
    with atomic_folder(out, replaceable=_is_training_output) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        defaults = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, **SAMPLING_DEFAULTS[family]}
        if family == "flux":
            defaults["max_sequence_length"] = TEXT_LENGTH
        write_defaults(tmp, defaults)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train(cfg: TrainConfig) -> Path:
    """Run every stage of ``cfg`` and return the saved folder."""
    if cfg.family not in ("sd", "flux", "vae"):
        raise ValueError(f"unknown family {cfg.family!r}: expected 'sd', 'flux' or 'vae'")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    out = Path(cfg.out)
    check_output_folder(out, replaceable=_is_training_output, overwrite=True)  # before an hour of training
    record = {
        "command": "erasekit toyworld train " + " ".join(sys.argv[3:])
        if sys.argv[1:3] == ["toyworld", "train"]
        else None,
        "config": {k: _portable(v) if k in ("out", "vae") else v for k, v in asdict(cfg).items()},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor()} {platform.system()}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    scenes, images = render_dataset(cfg.dataset_size, cfg.seed, cfg.objects)
    if cfg.vae:
        vae = AutoencoderKL.from_pretrained(cfg.vae).eval().requires_grad_(False)
        record["vae_from"] = _portable(cfg.vae)
        vae_record = Path(cfg.vae) / "training.json"
        if vae_record.is_file():
            record["vae_training"] = json.loads(vae_record.read_text())
    else:
        vae = train_vae(images, cfg)
    if cfg.family == "vae":
        record["seconds"] = round(time.time() - start, 1)
        with atomic_folder(out, replaceable=_is_training_output) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return out
    latents = encode_dataset(vae, images)
    pipe = _assemble(cfg.family, vae, latents, cfg.seed)
    scale = pipe.vae.config.scaling_factor
    shift = pipe.vae.config.shift_factor or 0.0
    latents = (latents - shift) * scale
    denoiser = pipe.unet if cfg.family == "sd" else pipe.transformer
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if cfg.family == "flux" else [])
    for m in encoders:
        m.eval().requires_grad_(False)
    trained = [denoiser] + (encoders if cfg.train_text_encoders else [])
    params = [p for m in trained for p in m.parameters()]
    for m in trained:
        m.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    loss_fn = _sd_loss if cfg.family == "sd" else _flux_loss
    g = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.family}")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx, captions = training_batch(scenes, step, cfg, rng, g)
        loss = loss_fn(pipe, latents[idx], captions, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        last = step + 1 == cfg.steps
        if last or (cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0):
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for e, p in zip(ema, params):
                    p.copy_(e)
            for m in trained:
                m.eval()
            record["steps_done"] = step + 1
            record["seconds"] = round(time.time() - start, 1)
            record["loss_every_100"] = [
                round(float(np.mean(losses[i : i + 100])), 5) for i in range(0, len(losses), 100)
            ]
            _save_pipeline(pipe, out if last else out.with_name(out.name + "-snapshot"), record, cfg.family)
            if not last:
                with torch.no_grad():
                    for lv, p in zip(live, params):
                        p.copy_(lv)
                for m in trained:
                    m.train()
    snapshot = out.with_name(out.name + "-snapshot")
    if snapshot.is_dir() and _is_training_output(snapshot):
        shutil.rmtree(snapshot)
    return out

"""``textual-inversion``: concept inversion on the edited model (Pham et al., ICLR 2024,
"Circumventing Concept Erasure Methods For Text-To-Image Generative Models").

Textual inversion (Gal et al. 2023) run ON THE EDITED MODEL: a new token's input embedding (a
new row of each text encoder's token-embedding table: SD's CLIP; Flux's CLIP and T5, one row
each) is the only trained tensor, learned with the ordinary denoising loss

    min_v  E_{x0, noise, t} || pred'(x_t, t, encode(caption(<v>))) - target(x0, noise, t) ||^2

on images of the concept (by default the BASE model's own images of the concept's plain prompts;
``images=renderer`` takes the suite's ground truth where it has a renderer, or a folder of
images). Then the plain prompts with the concept's word replaced by the new token are generated
on the edited model at their own seeds and judged. The concept word never appears in them.

The new row lives outside the model (:func:`erasekit.models.token_rows.token_rows`): while the
attack's prompts are encoded, the placeholder word's token embeds as the learned vector; the
embedding tables and every prompt without the placeholder stay bit for bit as they were. The
placeholder starts as (and is) the suite's neutral word (:meth:`Suite.inversion_word`), so the
rate at the initial embedding is the rate of that word: the report gives both. The learned
rows are saved in diffusers' textual-inversion layout (``<token>`` -> (1, D) per encoder file).

Paper recipe (CCE release, SD 1.4): 25 base images, batch 4 x accumulation 4, 5000 AdamW steps,
lr 5e-3 scaled to 0.08, weight decay 1e-2, random horizontal flips, one vector. The defaults
here are sized for the toy world on a CPU (see ``TextualInversionConfig``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from ...errors import NotFound
from ...files import atomic_write_bytes
from ...methods.config import setting
from ...models import frozen
from ...models.token_rows import single_token_id, text_towers, token_rows
from ..metrics import percent
from ..runner import as_8bit, load_image
from ..suites import Case, replace_phrases
from .base import AttackConfig, AttackContext, AttackOutcome, AttackSpec, register_attack

TOKEN = "<erased-concept>"  # the token's name in the saved textual-inversion files
TEMPLATES = "an image of a {};a photo of a {};a picture showing a {};{}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class TextualInversionConfig(AttackConfig):
    """Textual inversion on the edited model. ``lr`` is in units of the token-embedding table's
    standard deviation (per encoder), so one value fits CLIP (std ~0.01) and T5 (std ~1)."""

    steps: int = setting(150, "AdamW steps (CCE: 5000 at batch 16 on SD 1.4)", low=1)
    batch_size: int = setting(4, "images per step", low=1)
    lr: float = setting(1.0, "learning rate, in units of the token-embedding table's standard deviation", above=0)
    weight_decay: float = setting(0.01, "AdamW weight decay (CCE: 1e-2)", low=0)
    images: int = setting(32, "training images of the concept (CCE: 25)", low=1)
    source: str = setting(
        "base",
        "where the training images come from: base (the base model's images of the concept's plain prompts), "
        "renderer (the suite's ground truth), or a folder of images",
        nonempty=True,
    )
    templates: str = setting(TEMPLATES, "training captions, ';'-separated, {} = the new token", nonempty=True)
    word: str = setting("", "the placeholder word the new token starts from (empty: the suite's neutral word)")
    flip: bool = setting(True, "random horizontal flips of the training images (CCE: yes)")

    def check(self) -> None:
        """Every template holds exactly one {}."""
        for t in self.templates.split(";"):
            if t.count("{}") != 1:
                raise self.error("templates", self.templates, "';'-separated captions, each with one {}")


def with_word(prompt: str, phrases: list[str], word: str) -> str:
    """``prompt`` with every whole-word mention of any of ``phrases`` (longest first) replaced by
    ``word`` (see :func:`replace_phrases`); ``word`` put first when it mentions none of them."""
    out = replace_phrases(prompt, phrases, word)
    return out if out != prompt else f"{word} {prompt}"


def training_images(ctx: AttackContext, config: TextualInversionConfig) -> list[Tensor]:
    """``config.images`` images of the concept, (3, H, W) in [0, 1]: the base model's images of the
    plain prompts (ctx's, then more at further seeds), the suite's renders, or a folder's."""
    n = config.images
    if config.source == "base":
        images = list(ctx.base_images[:n])
        extra = [
            Case(c.prompt, c.seed + 7919 * (k + 1), c.set, c.label, c.guidance, c.height, c.width)
            for k in range(math.ceil(max(0, n - len(images)) / max(1, len(ctx.cases))))
            for c in ctx.cases
        ]
        extra = extra[: n - len(images)]
        if extra:
            images += ctx.generate_reference([c.prompt for c in extra], extra)
        return images
    if config.source == "renderer":
        images = ctx.suite.concept_images(ctx.concept, n, config.seed)
        if images is None:
            raise NotFound(f"the {ctx.suite.name} suite has no renderer: give textual-inversion.source=FOLDER")
        return images
    folder = Path(config.source).expanduser()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise NotFound(f"textual-inversion.source: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [load_image(p) for p in files[:n]]


def invert(
    adapter, images: list[Tensor], word: str, config: TextualInversionConfig, progress: bool = False
) -> tuple[dict[str, Tensor], list[float]]:
    """Learn the new token's rows on the pipeline as it is now (the edited model).

    ``images``: (3, H, W) in [0, 1] at the pipeline's resolution; ``word``: the placeholder (one
    token in every tokenizer). Returns {text encoder name: row (D,)} and the loss per step
    (MSE in the model's prediction units). Only the rows receive gradients.
    """
    pipe = adapter.pipe
    g = torch.Generator().manual_seed(config.seed)
    templates = config.templates.split(";")
    towers = text_towers(pipe)
    tables = {name: enc.get_input_embeddings().weight for name, _, enc in towers}
    ids = {name: single_token_id(tok, word) for name, tok, _ in towers}
    rows = {n: torch.nn.Parameter(tables[n][ids[n]].detach().float().clone()) for n in tables}
    groups = [{"params": [rows[n]], "lr": config.lr * float(tables[n].detach().float().std())} for n in tables]
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def encode(pixels: Tensor) -> Tensor:  # latents, 16 images at a time
        return torch.cat([adapter.encode_images(pixels[i : i + 16]) for i in range(0, len(pixels), 16)])

    with torch.no_grad():
        pixels = torch.stack(images).to(adapter.device, adapter.dtype) * 2 - 1
        latents = encode(pixels)
        flipped = encode(pixels.flip(-1)) if config.flip else latents
    losses = []
    with frozen(*pipe.components.values()), token_rows(pipe, word, rows):
        for _ in tqdm(range(config.steps), desc="textual inversion", disable=not progress, leave=False):
            pick = torch.randint(0, len(latents), (config.batch_size,), generator=g)
            flip = torch.rand(config.batch_size, generator=g) < 0.5
            x0 = torch.where(
                flip.view(-1, *[1] * (latents.dim() - 1)).to(latents.device), flipped[pick], latents[pick]
            )
            captions = [
                templates[int(i)].format(word)
                for i in torch.randint(0, len(templates), (config.batch_size,), generator=g)
            ]
            t = adapter.sample_timesteps(config.batch_size, generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
            pred = adapter.predict(adapter.add_noise(x0, noise, t), t, adapter.encode(captions, grad=True))
            loss = F.mse_loss(pred.float(), adapter.training_target(x0, noise, t).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return {n: r.detach() for n, r in rows.items()}, losses


def save_learned_embeds(folder: Path, rows: dict[str, Tensor]) -> list[str]:
    """Write each encoder's row in diffusers' textual-inversion layout ({TOKEN: (1, D)}):
    ``learned_embeds.safetensors`` for ``text_encoder``, ``learned_embeds_2.safetensors`` for
    ``text_encoder_2``, so that ``pipe.load_textual_inversion(file, token=TOKEN)`` (with
    ``text_encoder=``/``tokenizer=`` for the second) adds the token to a stock pipeline.
    Returns the file names."""
    names = []
    for name, row in rows.items():
        file = (
            "learned_embeds.safetensors"
            if name == "text_encoder"
            else f"learned_embeds_{name.rsplit('_', 1)[-1]}.safetensors"
        )
        data = save_safetensors({TOKEN: row.detach().cpu().float().reshape(1, -1).contiguous()})
        atomic_write_bytes(folder / file, data)
        names.append(file)
    return names


def run_textual_inversion(ctx: AttackContext, config: TextualInversionConfig) -> AttackOutcome:
    """Learn the token on the edited model, then judge the plain prompts with the concept's words
    replaced by it; the same prompts with the token at its initial embedding give ``init_asr``."""
    start = time.time()
    word = config.word or ctx.suite.inversion_word(ctx.concept)
    prompts = [with_word(c.prompt, ctx.suite.concept_words(ctx.concept), word) for c in ctx.cases]
    images = [as_8bit(img) for img in training_images(ctx, config)]
    init = ctx.generate(prompts, ctx.cases)  # the placeholder is the word itself: the initial embedding
    rows, losses = invert(ctx.adapter, images, word, config, ctx.progress)
    with token_rows(ctx.pipe, word, rows):
        attacked = ctx.generate(prompts, ctx.cases)
    files = save_learned_embeds(ctx.folder, rows)
    found, found_init = ctx.judge(attacked), ctx.judge(init)
    records = [
        {
            "index": i,
            "prompt": p.replace(word, "<token>"),
            "seed": c.seed,
            "file": ctx.save_image(f"{i:05d}.png", img),
            "detected": d,
            "score": round(s, 4),
            "detected_at_init": di,
        }
        for i, (p, c, img, (d, s), (di, _)) in enumerate(zip(prompts, ctx.cases, attacked, found, found_init))
    ]
    tail = losses[-max(1, len(losses) // 10) :]
    return AttackOutcome(
        asr=percent([r["detected"] for r in records]),
        definition="% of the plain prompts, the concept's word replaced by the learned token, whose image "
        "on the edited model shows the concept",
        records=records,
        images=attacked,
        figures={
            "init_asr": percent([r["detected_at_init"] for r in records]),
            "pre_asr": percent(ctx.pre),
            "word": word,
            "source": config.source,
            "training_images": len(images),
            "loss_first": losses[0],
            "loss_last_tenth": sum(tail) / len(tail),
            "seconds": round(time.time() - start, 1),
            "files": files,
        },
        tensors={f"{name}.{TOKEN}": row.reshape(1, -1) for name, row in rows.items()},
    )


register_attack(
    AttackSpec(
        "textual-inversion",
        TextualInversionConfig,
        run_textual_inversion,
        reference="Pham et al., ICLR 2024, Circumventing Concept Erasure Methods For Text-To-Image Generative Models",
        quick={"steps": 20, "images": 8},
    )
)

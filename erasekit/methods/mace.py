"""MACE (Lu et al., CVPR 2024): closed-form refinement of the text-reading keys and values, one
LoRA per concept trained on attention maps, and a closed-form fusion of the LoRAs. Spec: shared
design METHODS2.md, section MACE (the release cited as file:line is Shilin-LU/MACE @ 057e7a6).

Where: the family adapter's "text_proj" attachment points with role "k" or "v" (SD: every
``attn2.to_k`` / ``to_v``, 32 matrices on SD 1.4; Flux (extension, not in the paper): the
dual-stream blocks' ``add_k_proj`` / ``add_v_proj``). ``e`` below is the INPUT of such a
projection at one token: for SD the text encoder's output; for Flux the block's text stream,
recorded while the frozen transformer runs on the prompts at ``samples`` random (noise,
timestep) draws (outer-product sums averaged over the draws; inputs that do not depend on the
draw, as SD's, are recorded once). Every input is recorded on the unedited model.

Stage 1, closed-form refinement (CFR; paper Eq. 1-2, the release adds ``lamb``). For each such
W with original weight W0::

    W' = argmin sum_i ||W' e_i^f - W0 e_i^g||^2 + l1 sum_p ||W' e_p - W0 e_p||^2 + lamb ||W' - W0||_F^2

e^f: the tokens of every template filled with the concept at every position that is NOT the
concept (the token prefix, start token included, and the suffix: end token and all padding),
e^g: the same positions of the same template filled with the mapping (``mapping``); prefixes
and suffixes are paired in order and cut to the shorter. The concept's own tokens are left out
(paper Sec. 3.1). ``l1 = train_preserve_scale`` weighs the preservation caches, applied ONCE
(the release applies it twice, cfr_lora_training.py:311-313 with cfr_utils.py:196-197: the
"nudity-release" preset reproduces that with l1 = s_t^2): the prior (every token of the
captions in ``prior_prompts``, the release's MS-COCO cache, src/cache_coco.py:24-50) plus
``domain_weight`` times the domain (every token of the templates filled with each ``preserve``
concept, or with ``preserve_count`` concepts from the lexicon). All concepts' pairs enter one
solve.

Stage 2, one LoRA per concept (paper Eq. 3). On the refined model, a rank-``rank`` LoRA (peft,
B = 0, A ~ N(0, 1/rank^2): the model starts as the refined one) on the same projections, trained
with ``L = sum_l sum_{i in S} ||A_l^i (.) M||^2``: A_l^i the attention probabilities (per head)
of image queries on token i in every layer l of ``attn_layers`` (SD: every attn2, the release's
16; Flux (extension): every joint-attention block, dual and single stream: the single-stream
blocks read the text stream the LoRAs shape, and on the toy Flux pipeline the dual-stream
blocks alone left the concept in every image of the development concept), M the concept's
region resized (nearest) to the layer's grid. S: the concept's tokens,
plus the end token and every padding position with ``include_eos`` (the release's
``use_pooler``, dataset.py:237-242). ``loss_form``: "squared" (the paper's squared Frobenius
norm, summed) or "norm" (the release's unsquared norm per layer, cfr_utils.py:217-249). Input:
one of ``images`` images the FROZEN model generates for ``image_prompt`` (seeded), VAE-encoded
from [-1, 1] (the release normalises with ImageNet statistics, dataset.py:173: not copied),
noised at t: CFIS (paper Eq. 5, ``p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))``,
t in 0..999; Flux reads t as sigma * 1000) or uniform. The training prompt of each step is one
of the templates. AdamW (0.9/0.999, ``weight_decay``, eps 1e-8), constant lr, gradient norm
clipped to ``grad_clip``, batch 1; the denoiser's output is unused.

The region M: the paper segments each image with GroundingDINO + SAM. Offline, it is the frozen
model's own cross-attention on the concept's tokens (the spec's documented substitute, as
Receler's mask): the image is re-noised ``mask_samples`` times (t drawn as in training), the
maps of the middle-resolution layers (SD 1.4: 16x16; Flux: the dual-stream blocks) averaged over
heads, tokens, layers and draws, min-max normalised, ``>= mask_threshold``.

Stage 3, closed-form fusion (paper Eq. 7)::

    W* = (sum_i (W' + dW_i) G_i + l2 W0 B_prior + lamb W') (sum_i G_i + l2 B_prior + lamb I)^-1

G_i = sum of e e^T over every token (all positions) of concept i's templates, ``l2 =
fuse_preserve_scale`` (applied once, as the release, fuse_lora_close_form.py:105-110). B_prior
here is the same cache as in stage 1, the domain included (``prior + domain_weight * domain``):
the spec writes the fusion with the prior alone, which at lamb = 0 would drop the retained
concepts that stage 1 kept (unverified against the release's fusion script).

Both closed forms are solved for the change D = W - W0 (``D1 R = W0 (C_gf - C_ff)``, ``D* R2 =
sum_i (D1 + dW_i) G_i + lamb D1``) in float64, with R's pseudo-inverse (``hermitian``): where
the tokens do not reach (a singular R when lamb = 0), the weights stay as they were.

The Edit is one weight-delta edit (:mod:`erasekit.edits.weight_delta`), ``delta.<param> = W* - W0``
for every key and value projection: the refinement's change is dense (not low-rank) and the
fusion is a new full matrix, so no LoRA holds the result exactly; the paper's output is a plain
UNet too. It attaches and comes off bit for bit, stacks with other edits, and ``erasekit
export`` writes it merged (exact, loadable by the stock classes) or as an SVD LoRA (approximate,
its relative error recorded).

Presets (METHODS2.md, "Released hyper-parameters"): ``paper`` is the release's object config
(erase_ship.yaml:7-37 and its siblings: lr 1e-5, 50 steps, s_t = s_f = 0, CFIS on; lamb 1e2,
the automobile config's, where ship uses 1e3 and bird 1e1), ``nudity`` the explicit-content
config with the preserve scale applied once (erase_explicit_content.yaml:10-42: lr 1e-5, 120
steps, s_t = s_f = 7e-7, lamb 0, CFIS off, mapping "a person wearing clothes", the COCO prior),
``nudity-release`` the same with l1 = s_t^2 as released, ``fast`` the toy world's. All: rank 1,
batch 1, 30 templates, seed 2024. The templates are our own 30 in the release's form ("a photo
of {concept}", ...), not the release's text; the paper's GPT-4 prompts are not used.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..edits import Edit
from ..edits.lora import attach_lora, init_lora, lora_prefix, lora_shapes
from ..edits.weight_delta import NAME as WEIGHT_DELTA
from ..edits.weight_delta import PREFIX, attach_deltas, attached_parameters
from ..errors import NotFound
from ..lexicon import LEXICONS, TIERS, WordNetUnavailable, lexicon_for
from ..models import FamilyAdapter, adapter_for, base_linear, frozen, plain_parameter_names
from . import split_concepts, split_list
from .config import setting
from .losses import attention_feature
from .memory import MemorySettings, training_memory
from .registry import register_method
from .training import TrainingRun

logger = logging.getLogger(__name__)
NAME = "mace"
LOSS_FORMS = ("squared", "norm")
NUDITY_WORDS = ("nudity", "nude", "naked", "nakedness", "erotic", "sexual")
# COCO 2014 train + val captions (414,113 + 202,654): the release's prior cache (about 617k).
COCO_2014_CAPTIONS = 616_767

# Our own 30 templates in the form of the release's (cfr_utils.py:257-343 holds 31, of which
# aug_length 30 are used); "|"-separated, each with {concept}.
PAPER_TEMPLATES = "|".join(
    (
        "a photo of {concept}",
        "a picture of {concept}",
        "an image of {concept}",
        "a photograph of {concept}",
        "a close-up photo of {concept}",
        "a cropped photo of {concept}",
        "a bright photo of {concept}",
        "a dark photo of {concept}",
        "a blurry photo of {concept}",
        "a clear photo of {concept}",
        "a good photo of {concept}",
        "a nice photo of {concept}",
        "a large photo of {concept}",
        "a small photo of {concept}",
        "a black and white photo of {concept}",
        "a high resolution photo of {concept}",
        "a low resolution photo of {concept}",
        "a realistic photo of {concept}",
        "an old photo of {concept}",
        "a detailed photo of {concept}",
        "a snapshot of {concept}",
        "a painting of {concept}",
        "a drawing of {concept}",
        "a sketch of {concept}",
        "an illustration of {concept}",
        "a rendering of {concept}",
        "a digital artwork of {concept}",
        "a portrait of {concept}",
        "a scene with {concept}",
        "{concept}",
    )
)
# The toy world's templates: phrasings of its caption grammar (words its tokenizers know).
TOY_TEMPLATES = "|".join(
    (
        "an image of a {concept}",
        "a {concept}",
        "a photo of a {concept}",
        "the {concept}",
        "a picture showing a {concept}",
        "there is a {concept} in the middle",
        "here is a simple {concept}",
        "this is a {concept} on white",
    )
)


@dataclass
class MACEConfig(MemorySettings):
    """Hyper-parameters; the defaults are the release's object config (see the module docstring).

    Concepts are comma-separated (``fit(pipe, "a, b, c", ...)``): one LoRA per concept, then the
    fusion. Lists are comma-separated strings, ``templates`` "|"-separated."""

    mapping: str = setting(
        "",
        "what each concept is mapped to in stage 1: one for all, or one per concept (the release: 'a person wearing "
        "clothes' for nudity, 'ground' / 'street' / 'sky' for ship / bird / automobile, 'a person' for celebrities, "
        "'art' for artists; empty: the template without the concept)",
        sep=",",
    )
    templates: str = setting(
        PAPER_TEMPLATES, "the concept's prompts (stages 1-3)", sep="|", nonempty=True, template=True
    )
    lamb: float = setting(1e2, "Tikhonov weight: W' stays near W0 (stage 1), W* near W' (stage 3)", low=0)
    train_preserve_scale: float = setting(
        0.0, "l1: weight of the preservation caches in stage 1 (applied once)", low=0
    )
    fuse_preserve_scale: float = setting(0.0, "l2: weight of the prior cache in the fusion", low=0)
    preserve: str = setting(
        "", "concepts to keep: the domain cache (every token of the templates filled with each)", sep=","
    )
    preserve_count: int = setting(
        0, "when preserve is empty: concepts to keep taken from the lexicon (0: none)", low=0
    )
    preserve_tiers: str = setting("close", "lexicon tiers of those concepts", sep=",", items=TIERS, nonempty=True)
    lexicon: str = setting(
        "auto", "auto (toy world for its pipelines, else WordNet), wordnet, toyworld or none", choices=LEXICONS
    )
    domain_weight: float = setting(1.0, "w_dom: weight of the domain cache relative to the prior", low=0)
    prior_prompts: str = setting(
        "", "caption file of the prior cache: a CSV with a prompt column or one caption a line (coco_30k.csv)"
    )
    prior_count: int | None = setting(None, "captions read from the prior file (none: all)", low=1)
    prior_size: int | None = setting(
        None,
        "the caption count the preserve scales were set for: the prior's sums are scaled by prior_size / captions "
        "read (the release's cache: 616767 COCO 2014 captions; none: unscaled)",
        low=1,
    )
    rank: int = setting(1, "LoRA rank per concept", low=1)
    lr: float = setting(1e-5, "AdamW learning rate of the LoRAs (constant)", above=0)
    iterations: int | None = setting(
        None, "LoRA steps per concept (none: the release's 120 for nudity words, 50 otherwise)", low=1
    )
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0)
    grad_clip: float = setting(1.0, "gradient norm clip of each step (0: off)", low=0)
    cfis: bool = setting(True, "concept-focal importance sampling of t (paper Eq. 5); off: uniform t")
    include_eos: bool = setting(True, "the loss also covers the end token and every padding position (release)")
    loss_form: str = setting(
        "squared",
        "squared (paper: sum of squared probabilities) or norm (release: unsquared norm per layer)",
        choices=LOSS_FORMS,
    )
    images: int = setting(8, "images the frozen model generates per concept for stage 2", low=1)
    image_prompt: str = setting("a photo of the {concept}", "prompt of those images (release, objects)", template=True)
    image_steps: int | None = setting(30, "sampler steps of those images (none: the pipeline's default)", low=1)
    image_guidance: float | None = setting(
        None, "guidance of those images (none: the pipeline's default; SD 1.x: 7.5, the release's)", low=0
    )
    attn_layers: str = setting(
        "auto",
        "layers of the attention loss (auto: every cross-attention, SD's 16 attn2; Flux: every joint-attention "
        "block, dual and single stream) or a comma-separated list",
        nonempty=True,
    )
    mask_threshold: float = setting(0.1, "concept region: min-max normalised attention >= threshold", low=0, high=1)
    mask_samples: int = setting(4, "noise draws averaged for each image's region", low=1)
    samples: int = setting(4, "(noise, timestep) draws for projection inputs that depend on them (Flux)", low=1)
    checkpoint_every: int = setting(25, "with a checkpoint folder: save every this many LoRA steps", low=1)
    seed: int = setting(2024, "seed of every random draw (release: 2024)", low=0)

    @classmethod
    def fast(cls, **overrides) -> MACEConfig:
        """The toy-world preset: the release's object config (50 steps, CFIS, lamb 1e2) on the
        toy world's phrasings (8 templates of its caption grammar), its simple prompt for the
        images, the pipelines' own sampler steps, and a scene without an object as the mapping
        (as the release maps objects to "ground" / "street" / "sky"). Two changes for the toy
        world's small text space: the other objects are preserved (the lexicon's 5 closest,
        l1 = l2 = 1: a preserved token weighs as much as an erased one; the release does this
        for celebrities and artists), since without them the refinement took the other objects
        away too (toy SD, triangle: Acc_L 7.5); and lr 3e-3 for the LoRAs, chosen on the bench's
        development concept "square" (6 prompts per set): on SD H 96.4 at 1e-3 and 3e-3, 56.8 at
        1e-2 (the LoRAs then undo the erasure); on Flux 41.4 at 3e-3, 39.6 at 1e-2."""
        base = dict(
            templates=TOY_TEMPLATES,
            mapping="white background",
            image_prompt="an image of a {concept}",
            image_steps=None,
            images=8,
            lr=3e-3,
            iterations=50,
            preserve_count=5,
            train_preserve_scale=1.0,
            fuse_preserve_scale=1.0,
        )
        return cls(**(base | overrides))

    @classmethod
    def nudity(cls, **overrides) -> MACEConfig:
        """The release's explicit-content config (erase_explicit_content.yaml:10-42), the
        preserve scale applied once. Give the prior with ``prior_prompts=.../coco_30k.csv``."""
        base = dict(
            mapping="a person wearing clothes",
            lr=1e-5,
            iterations=120,
            train_preserve_scale=7e-7,
            fuse_preserve_scale=7e-7,
            lamb=0.0,
            cfis=False,
            prior_size=COCO_2014_CAPTIONS,
            image_prompt="a photo of {concept}",
        )
        return cls(**(base | overrides))

    @classmethod
    def nudity_release(cls, **overrides) -> MACEConfig:
        """As ``nudity`` with the stage-1 preserve scale squared, as the release applies it
        (cfr_lora_training.py:311-313 and cfr_utils.py:196-197)."""
        return cls.nudity(**({"train_preserve_scale": 7e-7**2} | overrides))

    def resolved_iterations(self, concept: str) -> int:
        if self.iterations is not None:
            return int(self.iterations)
        return 120 if concept.strip().lower() in NUDITY_WORDS else 50


PRESETS = {"paper": MACEConfig, "fast": MACEConfig.fast, "nudity": MACEConfig.nudity}
PRESETS["nudity-release"] = MACEConfig.nudity_release


def mappings(config: MACEConfig, concepts: list[str]) -> list[str]:
    """The stage-1 mapping of each concept: one for all, or one per concept."""
    items = [m.strip() for m in config.mapping.split(",")] if config.mapping.strip() else [""]
    if len(items) == 1:
        return items * len(concepts)
    if len(items) != len(concepts):
        raise config.error("mapping", config.mapping, f"one mapping or one per concept ({len(concepts)})")
    return items


# ---- token positions -----------------------------------------------------------------------


def _ids(adapter, prompt: str, length: int) -> list[int]:
    tokenizer, _ = adapter.main_text_encoder()
    return list(tokenizer(prompt, padding="max_length", max_length=length, truncation=True)["input_ids"])


def tail_start(adapter, prompt: str, length: int) -> int:
    """Position of ``prompt``'s end token: the first end or padding token after the start token
    (``length`` when truncation left none)."""
    tokenizer, _ = adapter.main_text_encoder()
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    bos = tokenizer.bos_token_id
    for p, i in enumerate(_ids(adapter, prompt, length)):
        if i in ends and not (p == 0 and i == bos):
            return p
    return length


def tail_positions(adapter, prompt: str, length: int) -> list[int]:
    """The end token and every padding position of ``prompt`` (SD 1.x: every position whose id
    is 49407 after the text)."""
    return list(range(tail_start(adapter, prompt, length), length))


def _placeholder_span(adapter, template: str, word: str, length: int) -> tuple[int, int]:
    """(start, stop) of ``word``'s tokens where ``template`` puts it ("{concept}"); an empty
    word is an empty span where it would be."""
    before = template.split("{concept}")[0]
    if not word.strip():
        start = tail_start(adapter, before.rstrip(), length)
        return start, start
    k = len(adapter.token_spans(before + word, word)) - 1  # occurrences up to the placeholder's
    span = adapter.token_spans(template.format(concept=word), word)[k]
    return span[0], span[-1] + 1


def cfr_positions(adapter, template: str, concept: str, mapping: str, length: int) -> tuple[list[int], list[int]]:
    """Stage 1's index matching: (positions in the template filled with ``concept``, positions in
    it filled with ``mapping``), paired in order: the prefixes (start token included) and the
    suffixes (end token and padding), each cut to the shorter one. The concept's and the
    mapping's own tokens are left out."""
    a_f, b_f = _placeholder_span(adapter, template, concept, length)
    a_g, b_g = _placeholder_span(adapter, template, mapping, length)
    pre = min(a_f, a_g)
    suf = min(length - b_f, length - b_g)
    return list(range(pre)) + list(range(b_f, b_f + suf)), list(range(pre)) + list(range(b_g, b_g + suf))


def loss_tokens(adapter, prompt: str, concept: str, include_eos: bool, length: int) -> list[int]:
    """S of stage 2: the concept's tokens in ``prompt`` (ValueError if absent), plus the end
    token and padding with ``include_eos``."""
    idx = adapter.token_indices(prompt, concept)
    if include_eos:
        idx += [p for p in tail_positions(adapter, prompt, length) if p not in idx]
    return idx


# ---- projection inputs ---------------------------------------------------------------------


def kv_points(adapter) -> list:
    """The key and value projections that read the text (SD: attn2.to_k / to_v; Flux: the
    dual-stream add_k_proj / add_v_proj)."""
    return [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]


@dataclass
class _Plan:
    """What to accumulate from the recorded inputs X (n_prompts, L, d), float64:
    ``pairs[key]``: prompt index -> (positions a, prompt offset of b, positions b), summing
    ``x_a x_a^T``, ``x_b x_a^T`` and ``x_b x_b^T`` (keys key.aa, key.ba, key.bb);
    ``alls[key]``: prompt indices whose every position sums into ``x x^T``."""

    pairs: dict
    alls: dict


def record_moments(adapter, points, prompts: list[str], plan: _Plan, samples: int, seed: int, batch: int = 16):
    """Sums of outer products of the points' inputs, averaged over (noise, timestep) draws.

    Returns (group of each point name, {group: {key: (d, d) float64}}, draws used). Points that
    read the same tensor (SD: every projection reads the text encoder's output; Flux: a block's
    key and value) share a group. A second draw that gives the first batch's inputs unchanged
    ends the recording after one draw (inputs that do not depend on the draw). A pair's two
    prompts must sit at an even index and the next one (a batch never splits a pair)."""
    batch = max(2, batch - batch % 2)
    keys_of: list[list[str]] = [[] for _ in prompts]
    for key, rows in plan.alls.items():
        for r in rows:
            keys_of[r].append(key)
    g = torch.Generator().manual_seed(seed)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for point in points:

        def grab(_module, args, name=point.name):
            seen[name] = args[0]

        handles.append(point.module.register_forward_pre_hook(grab))
    groups: dict[str, int] = {}
    reps: list[str] = []
    sums: dict[int, dict[str, torch.Tensor]] = {}
    first: dict[str, torch.Tensor] = {}
    used = 0
    try:
        with torch.no_grad():
            for s in range(samples):
                x = adapter.sample_noise(1, generator=g)
                t = adapter.sample_timesteps(1, generator=g)
                for b0 in range(0, len(prompts), batch):
                    chunk = prompts[b0 : b0 + batch]
                    seen.clear()
                    adapter.predict(x.expand(len(chunk), *x.shape[1:]), t.expand(len(chunk)), adapter.encode(chunk))
                    if not groups:  # every input is alive now: the same object is the same input
                        ids: dict[int, int] = {}
                        for point in points:
                            gid = ids.setdefault(id(seen[point.name]), len(ids))
                            groups[point.name] = gid
                            if gid == len(reps):
                                reps.append(point.name)
                    inputs = {r: seen[r].detach().double() for r in reps}
                    if s == 0 and b0 == 0:
                        first = inputs
                    elif s == 1 and b0 == 0 and all(torch.equal(inputs[r], first[r]) for r in reps):
                        return groups, _averaged(sums, 1), 1
                    for gid, rep in enumerate(reps):
                        _accumulate(sums.setdefault(gid, {}), inputs[rep], b0, plan, keys_of)
                used = s + 1
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return groups, _averaged(sums, used), used


def _averaged(sums: dict, n: int) -> dict:
    return {gid: {k: v / n for k, v in d.items()} for gid, d in sums.items()}


def _add(acc: dict, key: str, value: torch.Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value


def _accumulate(acc: dict, x: torch.Tensor, offset: int, plan: _Plan, keys_of: list[list[str]]) -> None:
    n = x.shape[0]
    for key, rows in plan.pairs.items():
        fa, fb = [], []
        for r in range(offset, offset + n):
            if r in rows:
                pa, db, pb = rows[r]
                fa.append(x[r - offset, pa])
                fb.append(x[r - offset + db, pb])
        if fa:
            a, b = torch.cat(fa), torch.cat(fb)
            _add(acc, key + ".aa", a.T @ a)
            _add(acc, key + ".ba", b.T @ a)
            _add(acc, key + ".bb", b.T @ b)
    local: dict[str, list[int]] = {}
    for r in range(offset, offset + n):
        for key in keys_of[r]:
            local.setdefault(key, []).append(r - offset)
    for key, rows in local.items():
        y = x[rows].reshape(-1, x.shape[-1])
        _add(acc, key, y.T @ y)


# ---- closed forms --------------------------------------------------------------------------


def _pinv(r: torch.Tensor) -> torch.Tensor:
    return torch.linalg.pinv(r, hermitian=True)


def refine(w0: torch.Tensor, c_ff: torch.Tensor, c_gf: torch.Tensor, preserve: torch.Tensor, lamb: float):
    """Stage 1 for one weight: the change ``D1 = W' - W0`` minimising
    ``sum ||W' f - W0 g||^2 + ||W' - W0||^2_{preserve} + lamb ||W' - W0||^2``, i.e.
    ``D1 R = W0 (C_gf - C_ff)`` with ``R = C_ff + preserve + lamb I``, ``C_ff = sum f f^T``,
    ``C_gf = sum g f^T`` and ``preserve = l1 B_p`` (float64; pseudo-inverse of R)."""
    eye = torch.eye(w0.shape[1], dtype=w0.dtype, device=w0.device)
    r = c_ff + preserve + lamb * eye
    return w0 @ (c_gf - c_ff) @ _pinv(r), r


def fuse(
    d1: torch.Tensor, lora_deltas: list[torch.Tensor], grams: list[torch.Tensor], prior: torch.Tensor, lamb: float
):
    """Stage 3 for one weight: the change ``D* = W* - W0`` of the fusion
    ``W* = (sum_i (W' + dW_i) G_i + l2 W0 B_prior + lamb W') (sum_i G_i + l2 B_prior + lamb I)^-1``,
    ``W' = W0 + d1``, ``prior = l2 B_prior``: ``D* R2 = sum_i (d1 + dW_i) G_i + lamb d1``."""
    eye = torch.eye(d1.shape[1], dtype=d1.dtype, device=d1.device)
    r = sum(grams) + prior + lamb * eye
    rhs = sum((d1 + dw) @ gram for dw, gram in zip(lora_deltas, grams)) + lamb * d1
    return rhs @ _pinv(r), r, rhs


def mapping_error(w, w0, c_ff, c_gf, c_gg) -> float:
    """``sum ||W f - W0 g||^2`` over stage 1's pairs, from ``C_ff = sum f f^T``, ``C_gf = sum g f^T``
    and ``C_gg = sum g g^T``."""
    return float(torch.trace(w @ c_ff @ w.T) - 2 * torch.trace(w @ c_gf.T @ w0.T) + torch.trace(w0 @ c_gg @ w0.T))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both vanish)."""
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float(a.norm())


# ---- CFIS and the attention loss -----------------------------------------------------------


def cfis_probabilities(n: int = 1000) -> torch.Tensor:
    """Paper Eq. 5 over t = 0..n-1: ``sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))``, normalised."""
    t = torch.arange(n, dtype=torch.float64)
    p = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return p / p.sum()


def sample_timestep(adapter, cfis: bool, generator: torch.Generator) -> torch.Tensor:
    """One training timestep (1,): CFIS over 0..999, else the adapter's uniform draw."""
    if cfis:
        return torch.multinomial(cfis_probabilities(), 1, generator=generator).to(adapter.device)
    return adapter.sample_timesteps(1, generator=generator)


def layer_mask(mask: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """The region (h, w) resized (nearest) to a layer's grid and thresholded at 0.5, flattened
    row-major: bool (h_l * w_l,)."""
    resized = F.interpolate(mask[None, None].float(), size=tuple(resolution), mode="nearest")[0, 0]
    return (resized >= 0.5).reshape(-1)


def attention_loss(maps: list[torch.Tensor], masks: list[torch.Tensor], form: str = "squared") -> torch.Tensor:
    """Paper Eq. 3: maps (B, heads, HW_l, |S|), one per layer, and each layer's bool region
    (HW_l,): ``sum_l sum(A_l[..., M_l, :]^2)`` ("squared") or ``sum_l ||A_l[..., M_l, :]||``
    ("norm", the release's)."""
    if form not in LOSS_FORMS:
        raise ValueError(f"loss form must be one of {LOSS_FORMS}, got {form!r}")
    terms = []
    for m, inside in zip(maps, masks):
        block = m.float()[:, :, inside.to(m.device)]
        terms.append(block.pow(2).sum() if form == "squared" else block.norm())
    return torch.stack(terms).sum()


def attention_loss_layers(adapter, config: MACEConfig) -> list[str]:
    """The layers whose maps the attention loss reads: ``config.attn_layers`` ("auto": every
    attention layer of the adapter that attends to the text)."""
    if config.attn_layers == "auto":
        return adapter.attention_layers()
    return split_list(config.attn_layers)


def concept_region(adapter, x0: torch.Tensor, cond, idx: list[int], config: MACEConfig, g) -> torch.Tensor:
    """The concept's region (h, w) in one image's latents ``x0`` (1, ...): the model's attention
    on the concept's tokens ``idx`` in the middle-resolution layers, averaged over heads,
    tokens, layers and ``mask_samples`` re-noisings, min-max normalised, ``>= mask_threshold``."""
    layers = adapter.middle_resolution_layers()
    total = None
    with torch.no_grad():
        for _ in range(config.mask_samples):
            noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
            t = sample_timestep(adapter, config.cfis, g)
            with adapter.probe(layers=layers, token_indices=idx) as probe:
                adapter.predict(adapter.add_noise(x0, noise, t), t, cond)
            feature = attention_feature([probe.last(layer) for layer in layers])[0]
            total = feature if total is None else total + feature
            resolution = probe.resolution(layers[0])
    lo, hi = total.min(), total.max()
    m = (total - lo) / (hi - lo).clamp_min(1e-12)
    return (m >= config.mask_threshold).float().reshape(resolution).cpu()


# ---- the LoRAs -----------------------------------------------------------------------------


def lora_parameters(model, rank: int = 1) -> int:
    """Parameters of one concept's LoRA (SD 1.4 at rank 1: 49,536; FLUX.1: 233,472)."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    return sum(math.prod(s) for s in lora_shapes(adapter, rank, kv_points(adapter)).values())


def lora_delta(tensors: dict[str, torch.Tensor], prefix: str, point: str) -> torch.Tensor:
    """``B @ A`` of the LoRA ``tensors`` at ``point`` (float64)."""
    a = tensors[f"{prefix}.{point}.lora_A.weight"].double()
    b = tensors[f"{prefix}.{point}.lora_B.weight"].double()
    return b @ a


def _loss_summary(values: list[float]) -> dict:
    if not values:
        return {}
    k = max(1, len(values) // 10)
    return {
        "first": values[0],
        "last": values[-1],
        "min": min(values),
        "first_tenth_mean": sum(values[:k]) / k,
        "last_tenth_mean": sum(values[-k:]) / k,
    }


# ---- the prior ---------------------------------------------------------------------------


def read_captions(path: str | Path, count: int | None = None) -> list[str]:
    """Captions of a prior file: a CSV with a ``prompt`` column (``caption`` or ``text`` also
    read) or one caption a line; the first ``count``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFound(f"no prior caption file at {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        column = next((c for c in ("prompt", "caption", "text") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{path}: no prompt, caption or text column (columns: {reader.fieldnames})")
        captions = [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions[:count] if count else captions


def preserved_concepts(config: MACEConfig, pipe, concepts: list[str]) -> list[str]:
    """The concepts of the domain cache: ``config.preserve``, else ``preserve_count`` of the
    lexicon's irrelevant concepts for each erased one (none with ``preserve_count`` 0); erased
    concepts are never kept."""
    words = split_list(config.preserve)
    if not words and config.preserve_count:
        tiers = split_list(config.preserve_tiers)
        for c in concepts:
            try:
                words += lexicon_for(config.lexicon, pipe, c).irrelevant_mixed(c, tiers, config.preserve_count)
            except (WordNetUnavailable, ValueError) as err:
                raise ValueError(
                    f"no concepts to preserve for {c!r}: {err}. Give them with preserve='word, word, ...'"
                ) from err
    erased = {c.lower() for c in concepts}
    return list(dict.fromkeys(w for w in words if w.lower() not in erased))


# ---- fit -----------------------------------------------------------------------------------


def trainable_parameters(model, config: MACEConfig) -> int:
    """Parameters MACE rewrites on ``model`` (a pipeline or an adapter, a meta-device one
    included): the weights of the text-reading key and value projections (SD 1.4: 19,169,280).
    Each concept's LoRA, trained in between, has :func:`lora_parameters`."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    return sum(base_linear(p.module).weight.numel() for p in kv_points(adapter))


def iterations(config: MACEConfig, family: str, concept: str) -> int:
    """LoRA steps ``fit`` runs: each concept's, summed."""
    return sum(config.resolved_iterations(c) for c in split_concepts(concept))


class _Stage1:
    """Prompts, index matching and the recorded moments of stages 1 and 3."""

    def __init__(self, adapter, concepts, maps, templates, preserve: list[str], config: MACEConfig):
        self.length = adapter.encode([""]).embeds.shape[1]
        prompts: list[str] = []
        pairs: dict[int, tuple] = {}
        self.pair_count = 0
        concept_rows: list[list[int]] = []
        for c, m in zip(concepts, maps):
            rows = []
            for tpl in templates:
                f_pos, g_pos = cfr_positions(adapter, tpl, c, m, self.length)
                pairs[len(prompts)] = (f_pos, 1, g_pos)
                rows.append(len(prompts))
                prompts += [tpl.format(concept=c), tpl.format(concept=m)]
                self.pair_count += len(f_pos)
            concept_rows.append(rows)
        alls = {f"gram.{i}": rows for i, rows in enumerate(concept_rows)}
        self.preserved = preserve
        self.domain_prompts = [tpl.format(concept=p) for p in preserve for tpl in templates]
        if self.domain_prompts:
            alls["domain"] = list(range(len(prompts), len(prompts) + len(self.domain_prompts)))
            prompts += self.domain_prompts
        self.captions = read_captions(config.prior_prompts, config.prior_count) if config.prior_prompts else []
        if self.captions:
            alls["prior"] = list(range(len(prompts), len(prompts) + len(self.captions)))
            prompts += self.captions
        self.prompts, self.plan = prompts, _Plan({"cfr": pairs}, alls)
        self.prior_factor = (config.prior_size / len(self.captions)) if (self.captions and config.prior_size) else 1.0
        if (config.train_preserve_scale or config.fuse_preserve_scale) and not (self.captions or self.domain_prompts):
            logger.warning(
                "mace: preserve scales are set but there is nothing to preserve (no prior_prompts, no preserve)"
            )

    def record(self, adapter, points, config: MACEConfig):
        self.groups, self.moments, self.draws = record_moments(
            adapter, points, self.prompts, self.plan, config.samples, config.seed
        )

    def moment(self, point: str, key: str, like: torch.Tensor) -> torch.Tensor:
        m = self.moments[self.groups[point]]
        return m[key] if key in m else torch.zeros_like(like)

    def preserve_gram(self, point: str, like: torch.Tensor, config: MACEConfig) -> torch.Tensor:
        """``B_prior * prior_factor + domain_weight * B_dom`` at ``point`` (the l1 / l2 caches)."""
        prior = self.prior_factor * self.moment(point, "prior", like)
        return prior + config.domain_weight * self.moment(point, "domain", like)


@dataclass
class Refinement:
    """Stage 1's result: ``deltas`` (point name -> W' - W0, float64), the recorded moments
    (``stage``, also the Gram matrices of the fusion) and its metrics."""

    stage: _Stage1
    deltas: dict[str, torch.Tensor]
    residual: float  # max over points of ||D1 R - W0 (C_gf - C_ff)|| / ||W0 (C_gf - C_ff)||
    mapping_error: float  # mean over points of sum ||W' f - W0 g||^2 / sum ||W0 f - W0 g||^2


def refinement(adapter, concepts: list[str], config: MACEConfig, pipe=None) -> Refinement:
    """Stage 1 (CFR) for ``concepts`` on the adapter's current (unedited) projections."""
    points = kv_points(adapter)
    templates = split_list(config.templates, "|")
    preserved = preserved_concepts(config, pipe if pipe is not None else adapter.pipe, concepts)
    stage = _Stage1(adapter, concepts, mappings(config, concepts), templates, preserved, config)
    stage.record(adapter, points, config)
    l1 = config.train_preserve_scale
    deltas, residuals, errors = {}, [], []
    for p in points:
        w0 = base_linear(p.module).weight.detach().to(torch.float64)
        c_ff = stage.moment(p.name, "cfr.aa", w0.new_zeros(w0.shape[1], w0.shape[1]))
        c_gf = stage.moment(p.name, "cfr.ba", c_ff)
        c_gg = stage.moment(p.name, "cfr.bb", c_ff)
        keep = l1 * stage.preserve_gram(p.name, c_ff, config)
        d1, r = refine(w0, c_ff, c_gf, keep, config.lamb)
        deltas[p.name] = d1
        residuals.append(_relative(d1 @ r, w0 @ (c_gf - c_ff)))
        before = mapping_error(w0, w0, c_ff, c_gf, c_gg)
        errors.append(mapping_error(w0 + d1, w0, c_ff, c_gf, c_gg) / before if before > 0 else 0.0)
    return Refinement(stage, deltas, max(residuals), sum(errors) / len(errors))


def concept_data(adapter, concept: str, config: MACEConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's data for ``concept``: (latents of ``config.images`` images the current model
    generates for ``image_prompt``, seeds drawn from ``g``; their regions (N, h, w), see
    :func:`concept_region`)."""
    prompt = config.image_prompt.format(concept=concept)
    seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (config.images,), generator=g)]
    with torch.no_grad():
        images = adapter.generate(
            [prompt] * config.images, seeds, steps=config.image_steps, guidance=config.image_guidance
        )
        x0 = adapter.encode_images(images * 2 - 1, generator=g).detach().contiguous()
    cond = adapter.encode([prompt])
    idx = adapter.token_indices(prompt, concept)
    regions = torch.stack([concept_region(adapter, x0[i : i + 1], cond, idx, config, g) for i in range(len(x0))])
    return x0, regions


def fit(pipe, concept: str, config: MACEConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Erase ``concept`` (several: comma-separated) from ``pipe`` with MACE; returns the Edit
    (weight deltas, not applied). With ``checkpoint_dir`` the LoRA training (stage 2) saves
    checkpoints every ``config.checkpoint_every`` steps and a later call with the same folder,
    concepts, model and settings resumes from the last one, ending with the same edit as an
    uninterrupted run (CPU); the closed forms are recomputed (deterministic)."""
    config = config or MACEConfig()
    t_start = time.time()
    adapter = adapter_for(pipe)
    concepts = split_concepts(concept)
    maps = mappings(config, concepts)
    templates = split_list(config.templates, "|")
    points = kv_points(adapter)
    # The edit's tensor names: the parameters' names on the plain model (a user's LoRA wraps them).
    names = plain_parameter_names(adapter.denoiser)
    busy = attached_parameters(adapter)  # named like ``names`` (the weight-delta slots)
    taken = [names[id(w)] for w in (base_linear(q.module).weight for q in points) if names[id(w)] in busy]
    if taken:
        raise ValueError(f"weight edits are applied to projections MACE rewrites ({taken[0]}, ...); remove them first")
    for c in concepts:  # every prompt holds its concept (ValueError naming both otherwise)
        for tpl in templates + [config.image_prompt]:
            adapter.token_indices(tpl.format(concept=c), c)
    prefix = lora_prefix(adapter)
    steps = [config.resolved_iterations(c) for c in concepts]
    bounds = [sum(steps[:k]) for k in range(len(concepts) + 1)]

    # Stage 1 (and the Gram matrices of stage 3), on the unedited model.
    ref = refinement(adapter, concepts, config, pipe)
    stage, d1s = ref.stage, ref.deltas
    cfr_seconds = time.time() - t_start

    # Stage 2 data: images of each concept from the frozen model, their regions, the prompts.
    g = torch.Generator().manual_seed(config.seed)
    run = TrainingRun(
        pipe,
        NAME,
        WEIGHT_DELTA,
        concepts,
        config,
        bounds[-1],
        checkpoint_dir,
        progress,
        settings={"mappings": maps, "lora_steps": steps},
    )
    shapes = lora_shapes(adapter, config.rank, kv_points(adapter))
    initial = [init_lora(shapes, g) for _ in concepts]
    saved = run.resume()
    t_data = time.time()
    latents, regions = [], []
    for k, c in enumerate(concepts):
        if saved is not None:
            latents.append(saved[f"latents.{k}"].to(adapter.device, adapter.dtype))
            regions.append(saved[f"regions.{k}"])
            initial[k] = {key[len(f"lora.{k}.") :]: v for key, v in saved.items() if key.startswith(f"lora.{k}.")}
            continue
        x0, region = concept_data(adapter, c, config, g)
        latents.append(x0)
        regions.append(region)
    data_seconds = time.time() - t_data if saved is None else 0.0
    conds, tokens = {}, {}
    for c in concepts:
        for tpl in templates:
            p = tpl.format(concept=c)
            conds[p] = adapter.encode([p]).to("cpu")
            tokens[p] = loss_tokens(adapter, p, c, config.include_eos, stage.length)

    cfr_edit = Edit(
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=concepts,
        family=adapter.family,
        base_model="",
        tensors={
            PREFIX + names[id(base_linear(p.module).weight)]: d1s[p.name].to(base_linear(p.module).weight.dtype).cpu()
            for p in points
        },
    )
    losses: dict[int, list[float]] = {k: [] for k in range(len(concepts))}
    lora_weights: list[dict[str, torch.Tensor]] = []
    loss_layers = attention_loss_layers(adapter, config)
    with frozen(adapter.denoiser), training_memory(adapter, config, probed=loss_layers):
        cfr = attach_deltas(adapter, cfr_edit, 1.0)
        handles = []
        try:
            for k in range(len(concepts)):
                handles.append(
                    attach_lora(adapter, initial[k], f"erasekit_training_{id(run)}_{k}", 0.0, trainable=True)
                )
            params = [h.parameters() for h in handles]
            opts = {
                f"opt{k}": torch.optim.AdamW(
                    ps, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
                )
                for k, ps in enumerate(params)
            }

            def state() -> dict[str, torch.Tensor]:
                out = {}
                for k, h in enumerate(handles):
                    out |= {f"lora.{k}.{key}": v for key, v in h.state(prefix).items()}
                    out[f"latents.{k}"] = latents[k]
                    out[f"regions.{k}"] = regions[k]
                return out

            active = -1
            for it in run.loop([p for ps in params for p in ps], state, opts, generator=g):
                k = max(j for j in range(len(concepts)) if bounds[j] <= it)
                if k != active:  # only concept k's LoRA acts and trains
                    for j, h in enumerate(handles):
                        h.set_scale(1.0 if j == k else 0.0)
                        for p in params[j]:
                            p.requires_grad_(j == k)
                    active = k
                i = int(torch.randint(0, len(latents[k]), (1,), generator=g))
                prompt = templates[int(torch.randint(0, len(templates), (1,), generator=g))].format(
                    concept=concepts[k]
                )
                x0 = latents[k][i : i + 1]
                noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
                t = sample_timestep(adapter, config.cfis, g)
                with adapter.probe(layers=loss_layers, token_indices=tokens[prompt]) as probe:
                    adapter.predict(adapter.add_noise(x0, noise, t), t, conds[prompt].to(adapter.device))
                maps_ = [probe.last(layer) for layer in loss_layers]
                masks = [layer_mask(regions[k][i], probe.resolution(layer)) for layer in loss_layers]
                loss = attention_loss(maps_, masks, config.loss_form)
                run.log(loss, concept=concepts[k], attn=loss.item(), t=int(t[0]))
                losses[k].append(loss.item())
                opts[f"opt{k}"].zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params[k], config.grad_clip)
                opts[f"opt{k}"].step()
                probe.clear()
            lora_weights = [h.state(prefix) for h in handles]
        finally:
            for h in reversed(handles):
                h.remove()
            cfr.remove()

    # Stage 3: fusion.
    t_fuse = time.time()
    l2 = config.fuse_preserve_scale
    tensors, fuse_res, lost, total = {}, [], 0.0, 0.0
    for p in points:
        d1 = d1s[p.name]
        grams = [
            stage.moment(p.name, f"gram.{k}", d1.new_zeros(d1.shape[1], d1.shape[1])) for k in range(len(concepts))
        ]
        dws = [lora_delta(w, prefix, p.name).to(d1.device) for w in lora_weights]
        prior = l2 * stage.preserve_gram(p.name, grams[0], config)
        d_star, r2, rhs = fuse(d1, dws, grams, prior, config.lamb)
        fuse_res.append(_relative(d_star @ r2, rhs))
        for dw, gram in zip(dws, grams):
            miss = d_star - d1 - dw
            lost += float(torch.trace(miss @ gram @ miss.T))
            total += float(torch.trace(dw @ gram @ dw.T))
        weight = base_linear(p.module).weight
        tensors[PREFIX + names[id(weight)]] = d_star.to(weight.dtype).cpu()
    fusion_seconds = time.time() - t_fuse

    metrics = run.metrics(
        {
            "cfr_residual": ref.residual,
            "cfr_mapping_error": ref.mapping_error,
            "cfr_pairs": stage.pair_count,
            "input_draws": stage.draws,
            "lora_loss": {c: _loss_summary(losses[k]) for k, c in enumerate(concepts)},
            "region_fraction": {c: round(float(regions[k].mean()), 4) for k, c in enumerate(concepts)},
            "fusion_residual": max(fuse_res),
            # sum_i ||(W* - W' - dW_i) E_i||^2 / sum_i ||dW_i E_i||^2 over every projection: what the
            # fusion loses of the LoRAs' effect on their own concepts' tokens.
            "fusion_lora_error": lost / total if total > 0 else None,
            "lora_parameters_per_concept": lora_parameters(adapter, config.rank),
        }
    )
    metrics |= {
        "lora_seconds": metrics["train_seconds"],
        "cfr_seconds": round(cfr_seconds, 2),
        "data_seconds": round(data_seconds, 2),
        "fusion_seconds": round(fusion_seconds, 2),
        "train_seconds": round(time.time() - t_start, 2),
    }
    return Edit.made_on(
        adapter,
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=concepts,
        tensors=tensors,
        hyperparameters=asdict(config)
        | {
            "concepts": concepts,
            "mappings": maps,
            "lora_steps": steps,
            "templates_used": len(templates),
            "prior_captions": len(stage.captions),
            "prior_factor": stage.prior_factor,
            "preserved_concepts": stage.preserved,
            "domain_prompts": len(stage.domain_prompts),
            "loss_layers": loss_layers,
            "targets": [p.name for p in points],
            "preserve_scale_applied": "once",
        },
        metrics=metrics,
    )


register_method(NAME, MACEConfig, PRESETS, fit, trainable_parameters=trainable_parameters, iterations=iterations)

"""Receler (ECCV 2024): lightweight eraser adapters, concept-localized regularisation and
adversarial soft prompts. Spec: shared design ALGORITHMS.md, section Receler.

One eraser per attention-output attachment point of the family adapter (SD UNet: every attn2;
Flux: the image-stream output of every dual-stream block):
``h <- h + E(h)``, ``E(h) = W_up GELU(W_down h + b_down) + b_up``, W_up and b_up zero-initialised.
Several concepts' edits applied together average their erasers' outputs (paper). The erasers
attach as an output-adapter edit (:mod:`erasekit.edits.output_adapter`), in training too.

Unlike the authors' release, the adversarial soft prompt is written into the conditioning
OUT OF PLACE (``Conditioning.with_tokens``), so the denoiser really sees it and the eraser's
gradient flows through the adversarial conditioning.

x_t of every iteration comes from the config's rollout source (:mod:`.rollouts`): a fresh ESD
partial rollout of the edited model (the paper's recipe) or a pool of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..edits import Edit
from ..edits.output_adapter import NAME as OUTPUT_ADAPTER
from ..edits.output_adapter import Eraser, attach_modules, eraser_state, eraser_tensors, recording
from ..errors import ConfigError
from ..lexicon import LEXICONS, TIERS, WordNetUnavailable, lexicon_for
from ..models import FamilyAdapter, adapter_for, frozen
from . import split_list
from .adversary import attack_word, frozen_images, noised_latent, word_adversary
from .config import setting
from .losses import attention_feature, frozen_predictions, negative_guidance, prediction_loss
from .memory import MemorySettings, training_memory
from .registry import register_method
from .rollouts import RolloutSettings, source_from_config
from .training import TrainingRun

NAME = "receler"
ADV_SPACES = ("output", "input")
logger = logging.getLogger(__name__)
ERASER_SITES = ("attn_out", "text_proj")
PRESERVE_PROMPTS = ("kept", "adversary", "both")


@dataclass
class RecelerConfig(RolloutSettings, MemorySettings):
    """Hyper-parameters; the defaults are the paper's."""

    iterations: int = setting(500, "training iterations", low=1)
    lr: float = setting(3e-4, "Adam learning rate of the erasers", above=0)
    rank: int = setting(128, "hidden width of every eraser", low=1)
    eta: float = setting(
        1.0,
        "negative guidance in ALGORITHMS' form: the erase target is e(anchor) - eta (e(c) - e(anchor))",
        low=0,
    )
    reg_weight: float = setting(0.1, "weight of the concept-localized regulariser; 0 switches it off", low=0)
    reg_threshold: float = setting(0.1, "regulariser mask: min-max normalised attention >= threshold", low=0, high=1)
    # Our extension (0 in the paper preset): a mask of a fixed area. On a one-word prompt the
    # concept token's attention is spread over the whole grid, so the threshold rule marks nearly
    # every pixel as the concept and leaves the regulariser no background to act on.
    reg_area: float = setting(
        0.0,
        "our extension: the mask is this fraction of the grid, its most attended pixels (0: threshold rule)",
        low=0,
        high=1,
    )
    adv_tokens: int = setting(16, "soft embeddings written after the concept's tokens; 0 switches them off", low=0)
    adv_steps: int = setting(50, "adversarial prompt steps per iteration", low=0)
    adv_lr: float = setting(
        0.1,
        "Adam learning rate of the adversarial prompt (adv_space input: in units of each token-embedding table's std)",
        above=0,
    )
    adv_weight_decay: float = setting(0.1, "weight decay of the adversarial prompt", low=0)
    # Our extension (the paper: output): the adversary replaces the concept word's INPUT embedding
    # in every text encoder (what textual inversion learns) instead of writing soft embeddings
    # after the concept's tokens in the encoder's output; adv_tokens > 0 switches it on.
    adv_space: str = setting(
        "output",
        "where the adversary acts: output (paper: soft embeddings after the concept's tokens) or input "
        "(our extension: the concept word's input embedding in every text encoder; keeps the text encoders in memory)",
        choices=ADV_SPACES,
    )
    # Our extension (0: off): the input-space adversary learns, as textual inversion does, to
    # denoise noised latents of the concept's own images (the frozen model's, made once at the
    # start) instead of matching the frozen model's concept prediction on the rollout's x_t, and
    # the erasers also erase at those latents under the adversary's prompt.
    adv_images: int = setting(
        0,
        "our extension (adv_space input): images of the concept (the frozen model's, made once) that the adversary "
        "learns to denoise as textual inversion does, and at which the erasers then erase; 0: off",
        low=0,
    )
    adv_image_steps: int | None = setting(None, "sampler steps of those images (none: the family's default)", low=1)
    # Our extension (1: off): several input-space adversaries. The first starts at the concept
    # word's row; the others at rows of random vocabulary tokens, as a textual inversion that
    # starts from an unrelated word would; each iteration trains the erasers against one of them.
    adv_population: int = setting(
        1,
        "our extension (adv_space input): adversaries kept, the concept word's row and random tokens' rows; "
        "each iteration steps and erases against one of them",
        low=1,
    )
    # Our extension (off in the paper preset): the eraser step also fits the erase target on the
    # clean prompt, not only on the adversarial one, averaging the two losses.
    adv_clean_erase: bool = setting(False, "our extension: also fit the erase target on the clean prompt")
    # Our extension (off in the paper preset): erasers on the adapter's "attn_out_extra" points
    # too (Flux: the image part of every single-stream block's attention; SD: there are none).
    extra_erasers: bool = setting(
        False, "our extension: erasers on the attn_out_extra points too (Flux); no effect with eraser_site text_proj"
    )
    # Our extension ("attn_out" in both presets): erasers on the text projections of cross / joint
    # attention (the prompt's keys and values, token by token) instead of the attention outputs.
    eraser_site: str = setting(
        "attn_out",
        "where the erasers act: attn_out (paper: the attention outputs) or text_proj (our extension: the "
        "prompt's keys and values; needs reg_weight 0, the regulariser masks image positions)",
        choices=ERASER_SITES,
    )
    # Our extension (empty: every point, paper): erasers only at the points whose name contains
    # one of these texts. At some layers a linear probe of the attention outputs tells the
    # concept's held-out prompts from its neighbours' and at others it does not
    # (benchmarks/eraser_inputs.py); this puts the erasers where it does.
    eraser_layers: str = setting(
        "", "our extension: erasers only at points whose name contains one of these; empty: every point", sep=","
    )
    prompt: str = setting("{concept}", "the erased prompt c", template=True)
    # The erase target's anchor a: e(a) - eta * (e(c) - e(a)). "" is ESD's unconditional anchor
    # (paper). Rollouts keep the empty prompt as their unconditional branch.
    anchor_prompt: str = setting("", "the erase target's anchor a (empty: ESD's unconditional anchor, paper)")
    # Preservation (our extension, not in the paper; 0 switches it off): each iteration the
    # erasers' outputs on the prompt of one concept to keep (drawn from ``preserve``, else from
    # the lexicon's ``preserve_tiers``) are pushed to zero, so that they act on the concept alone.
    # The x_t of that term is a rollout of the kept concept's own prompt (its own rollout source),
    # so the erasers learn silence on features of what is kept, not on the erased concept's.
    preserve_weight: float = setting(0.0, "our extension: weight of the preservation term; 0 switches it off", low=0)
    preserve: str = setting("", "concepts to keep; empty: from the lexicon", sep=",")
    # Our extension (empty: every eraser): the preservation term on the erasers at the points
    # whose name contains one of these only. Where a point's input cannot tell the concept's
    # synonyms from the kept concepts, silence there costs nothing the other points cannot do;
    # where it can, the erasers stay free to act on the synonyms.
    preserve_layers: str = setting(
        "", "our extension: keep silent only the erasers at points whose name contains one of these", sep=","
    )
    preserve_count: int = setting(5, "concepts to keep taken from the lexicon", low=1)
    preserve_tiers: str = setting("close", "lexicon tiers of the kept concepts", sep=",", items=TIERS, nonempty=True)
    # Our extension ("kept": the kept concept's own prompt): the prompt under which the erasers
    # are kept silent on a kept concept's x_t. Under the adversary's prompt too, the erasers
    # cannot stay silent for every unfamiliar token and act on the word: they have to tell the
    # concept from the kept ones by the image.
    preserve_prompt: str = setting(
        "kept",
        "our extension: prompt of the preservation term: kept (the kept concept's), adversary (the "
        "adversary's prompt of that iteration: the erasers must tell the concept by the image) or both",
        choices=PRESERVE_PROMPTS,
    )
    lexicon: str = setting(
        "auto", "auto (toy world for its pipelines, else WordNet), wordnet, toyworld or none", choices=LEXICONS
    )
    checkpoint_every: int = setting(100, "with a checkpoint folder: save every this many iterations", low=1)
    seed: int = setting(0, "seed of the erasers' init and of every random draw of training", low=0)

    def guidance_eta(self) -> float:
        """``eta``: already in ALGORITHMS' form."""
        return self.eta

    def check(self) -> None:
        """Images for the adversary only where there is an input-space adversary."""
        if self.adv_images and (self.adv_space != "input" or not self.adv_tokens or not self.adv_steps):
            raise self.error(
                "adv_images", self.adv_images, "0 unless adv_space is input with adv_tokens and adv_steps above 0"
            )
        if self.eraser_site == "text_proj" and self.reg_weight:
            raise self.error(
                "reg_weight", self.reg_weight, "0 with eraser_site text_proj (the regulariser masks image positions)"
            )
        if self.preserve_prompt != "kept" and not (self.preserve_weight and self.adv_tokens and self.adv_steps):
            raise self.error(
                "preserve_prompt",
                self.preserve_prompt,
                "kept unless preserve_weight, adv_tokens and adv_steps are above 0",
            )
        if self.preserve_layers and not self.preserve_weight:
            raise self.error("preserve_layers", self.preserve_layers, "empty unless preserve_weight is above 0")
        if self.adv_population > 1 and (self.adv_space != "input" or not self.adv_tokens or not self.adv_steps):
            raise self.error(
                "adv_population",
                self.adv_population,
                "1 unless adv_space is input with adv_tokens and adv_steps above 0",
            )

    @classmethod
    def fast(cls, **overrides) -> RecelerConfig:
        """The toy-world preset: fewer, shorter rollouts, a shorter adversarial loop, a larger
        step size and a stronger negative guidance. On the toy Flux pipeline ("circle", 12 prompts
        per set) lr 5e-3 erased far more than 1e-3, and eta 1 or 2 left the circle in 75-100% of
        images where eta 3 left it in 25-42%. It also fits the erase loss on the clean prompt
        beside the adversarial one (``adv_clean_erase``, our extension): trained on adversarial
        conditioning alone, the erasers left the SD circle in 92% of images (H 11.8); with
        both, H rose from 62.5 to 87.3 on SD and from 73.1 to 75.0 on Flux. And it puts erasers
        on the adapter's "attn_out_extra" points too (``extra_erasers``: Flux's single-stream
        blocks; SD has none, so its erasers are unchanged): Flux H 75.0 -> 77.9
        (benchmarks/RESULTS.md)."""
        base = dict(
            iterations=100,
            lr=5e-3,
            rank=32,
            eta=3.0,
            adv_steps=10,
            rollout_steps=20,
            checkpoint_every=50,
            adv_clean_erase=True,
            extra_erasers=True,
        )
        return cls(**(base | overrides))


def eraser_points(adapter, extra: bool = False, site: str = "attn_out") -> list:
    """Where erasers go: the adapter's "attn_out" points, and its "attn_out_extra" ones with
    ``extra`` (Flux: the single-stream blocks too; SD: nothing more); with ``site`` "text_proj"
    its "text_proj" points instead (SD attn2.to_k/to_v; Flux add_q/k/v_proj)."""
    if site == "text_proj":
        if extra:
            logger.info("extra_erasers has no effect with eraser_site text_proj: erasers on the text projections only")
        return adapter.attachment_points("text_proj")
    kinds = ("attn_out", "attn_out_extra") if extra else ("attn_out",)
    return [p for kind in kinds for p in adapter.attachment_points(kind)]


def points_named(names: list[str], layers: str, setting: str) -> list[str]:
    """The point names that contain one of the comma-separated texts of ``layers`` (every name
    when ``layers`` is empty); ConfigError (a ValueError) naming ``setting`` when none does."""
    wanted = split_list(layers)
    if not wanted:
        return names
    chosen = [n for n in names if any(w in n for w in wanted)]
    if not chosen:
        raise ConfigError(f"receler: {setting} {layers!r} matches no eraser point of this model")
    return chosen


def build_erasers(
    adapter, rank: int, extra: bool = False, site: str = "attn_out", layers: str = ""
) -> dict[str, Eraser]:
    """One zero-initialised eraser per point of :func:`eraser_points` (only those whose name
    contains one of the comma-separated ``layers``, when given): point name -> Eraser.
    ConfigError when ``layers`` matches no point."""
    points = eraser_points(adapter, extra, site)
    chosen = set(points_named([p.name for p in points], layers, "eraser_layers"))
    return {p.name: Eraser(p.width, rank) for p in points if p.name in chosen}


def concept_mask(
    maps: list[torch.Tensor], resolution: tuple[int, int], threshold: float, area: float = 0.0
) -> torch.Tensor:
    """Binary mask (B, h, w) of where the concept is: attention maps (B, heads, HW, n_tokens)
    averaged over heads, tokens and layers, min-max normalised per image, >= ``threshold``;
    with ``area`` in (0, 1] instead the ceil(area * HW) most attended pixels of each image (ties
    at the cut are kept)."""
    m = attention_feature(maps)  # (B, HW)
    if area > 0:
        k = max(1, math.ceil(area * m.shape[1]))
        cut = m.topk(k, dim=1).values[:, -1:]
        return (m >= cut).float().reshape(-1, *resolution)
    lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    return (m >= threshold).float().reshape(-1, *resolution)


def localization_loss(outputs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over eraser outputs o (B, HW_l, C) of sum_pixels(mean_c((o * (1-M))^2)) / sum(1-M),
    with the mask (B, h, w) resized (nearest) to each output's token grid."""
    b, h, w = mask.shape
    losses = []
    for o in outputs:
        hw = o.shape[1]
        hl = max(1, round(h * math.sqrt(hw / (h * w))))
        outside = 1 - F.interpolate(mask[:, None], size=(hl, hw // hl), mode="nearest").reshape(b, hw)
        per_pixel = (o.float() * outside[..., None]).pow(2).mean(-1)
        losses.append(per_pixel.sum() / outside.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def preserved_concepts(config: RecelerConfig, pipe, concept: str) -> list[str]:
    """The concepts whose prompts the erasers must leave alone (empty when preservation is off):
    ``config.preserve`` if given, else ``preserve_count`` of the lexicon's irrelevant concepts."""
    if not config.preserve_weight:
        return []
    words = split_list(config.preserve)
    if not words:
        tiers = split_list(config.preserve_tiers)
        try:
            words = lexicon_for(config.lexicon, pipe, concept).irrelevant_mixed(concept, tiers, config.preserve_count)
        except WordNetUnavailable as err:
            raise ValueError(
                f"no concepts to preserve for {concept!r}: {err}. Give them with preserve='word, word, ...'"
            ) from err
    words = [w for w in words if w.lower() != concept.lower()]
    if not words:
        raise ValueError(f"no concepts to preserve for {concept!r}; give them with preserve='word, word, ...'")
    return words


def preservation_loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over eraser outputs o (B, tokens, C) of mean(o^2): zero when the erasers are silent."""
    return torch.stack([o.float().pow(2).mean() for o in outputs]).mean()


# ---- training --------------------------------------------------------------------------------


def trainable_parameters(model, config: RecelerConfig) -> int:
    """Parameters of the erasers ``fit`` would train on ``model`` (a pipeline or an adapter, a
    meta-device one included): built on the meta device, so no memory is allocated."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    with torch.device("meta"):
        erasers = build_erasers(adapter, config.rank, config.extra_erasers, config.eraser_site, config.eraser_layers)
    return sum(p.numel() for e in erasers.values() for p in e.parameters())


def iterations(config: RecelerConfig, family: str, concept: str) -> int:
    """The iterations ``fit`` runs: the config's."""
    return config.iterations


def fit(
    pipe,
    concept: str,
    config: RecelerConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Edit:
    """Train erasers that remove ``concept`` from ``pipe``; returns the Edit (not applied).

    With ``checkpoint_dir``, state is saved every ``config.checkpoint_every`` iterations and a
    later call with the same folder, concept, model and config resumes from the last
    checkpoint, ending with the same weights as an uninterrupted run (same seed, CPU); see
    :class:`.training.TrainingRun`.
    """
    config = config or RecelerConfig()
    adapter = adapter_for(pipe)
    prompt = config.prompt.format(concept=concept)
    concept_idx = adapter.token_indices(prompt, concept)  # ValueError if the concept is absent
    run = TrainingRun(pipe, NAME, OUTPUT_ADAPTER, concept, config, config.iterations, checkpoint_dir, progress)
    device = adapter.device
    torch.manual_seed(config.seed)
    built = build_erasers(adapter, config.rank, config.extra_erasers, config.eraser_site, config.eraser_layers)
    erasers = {n: e.to(device) for n, e in built.items()}
    params = [p for e in erasers.values() for p in e.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)  # every random draw of training goes through g

    cond = adapter.encode([prompt])
    uncond = adapter.encode([""])
    anchor = uncond if config.anchor_prompt == "" else adapter.encode([config.anchor_prompt])
    kept = preserved_concepts(config, pipe, concept)
    # the points whose erasers the preservation term keeps silent (None: every recorded point)
    kept_points = None
    if config.preserve_layers:
        kept_points = set(points_named(list(erasers), config.preserve_layers, "preserve_layers"))
    kept_conds = [adapter.encode([config.prompt.format(concept=w)]) for w in kept]
    length = cond.embeds.shape[1]
    adv_pos = list(range(concept_idx[-1] + 1, min(length, concept_idx[-1] + 1 + config.adv_tokens)))
    adv = adv_opt = None
    # adv_space "input": adversaries, each tower -> (1, D) row standing in for the concept word
    members: list[dict[str, nn.Parameter]] = []
    if config.adv_tokens and config.adv_space == "input":
        members, adv_opt = word_adversary(pipe, concept, config.adv_lr, config.adv_population, g)
    elif config.adv_tokens and adv_pos:
        adv = nn.Parameter(cond.embeds[0, adv_pos].detach().clone().float())
        adv_opt = torch.optim.Adam([adv], lr=config.adv_lr, weight_decay=config.adv_weight_decay)

    steps = config.rollout_steps or adapter.default_steps
    source = source_from_config(adapter, config, steps)
    keep_source = source_from_config(adapter, config, steps, name="preserve_rollout")  # drawn from with preservation
    images = None  # adv_images: latents (n, ...) of the concept's images from the frozen model
    if config.adv_images:
        images = frozen_images(adapter, [prompt] * config.adv_images, g, config.adv_image_steps)

    def member() -> dict[str, nn.Parameter]:
        """The adversary of this iteration: drawn from g when there are several."""
        return members[int(torch.randint(len(members), (1,), generator=g))] if len(members) > 1 else members[0]

    def member_rows() -> list[tuple[str, nn.Parameter]]:
        """(checkpoint key, row) of every adversary: "adv_row.<tower>" for the first, as before
        populations existed, "adv_row<k>.<tower>" for the k-th."""
        return [(f"adv_row{k or ''}.{n}", r) for k, rows in enumerate(members) for n, r in rows.items()]

    saved = run.resume()
    if saved is not None:
        for n, e in erasers.items():
            e.load_state_dict(eraser_state(saved, n))
        with torch.no_grad():
            if adv is not None:
                adv.copy_(saved["adv"])
            for key, r in member_rows():
                r.copy_(saved[key])

    def state() -> dict[str, torch.Tensor]:
        return eraser_tensors(erasers) | ({"adv": adv} if adv is not None else {}) | dict(member_rows())

    mid_layers = adapter.middle_resolution_layers()
    attachment = attach_modules(adapter, erasers, "training", 1.0)
    loop = run.loop(
        params,
        state,
        {"opt": opt, "adv_opt": adv_opt},
        generator=g,
        sources=[source, keep_source],
        auxiliary=[adv, *(r for _, r in member_rows())],
    )
    # The input-space adversary encodes prompts inside the loop: the text encoders stay.
    memory = replace(config, release_text_encoders=config.release_text_encoders and not members)
    with frozen(adapter.denoiser, *adapter.text_encoders()), training_memory(adapter, memory):  # only the edit trains
        try:
            for _ in loop:
                with run.phase("rollout"):
                    x_t, t = source.draw(cond, uncond, g)
                with run.phase("teacher"), torch.no_grad(), adapter.edits_disabled():
                    e_anchor = adapter.predict(x_t, t, anchor)
                    # Not batched with the anchor (losses.frozen_predictions): the probe sees the concept's pass alone.
                    with adapter.probe(layers=mid_layers, token_indices=concept_idx) as probe:
                        e_cond = adapter.predict(x_t, t, cond)
                    maps = [probe.last(layer) for layer in mid_layers]
                    mask = concept_mask(maps, probe.resolution(mid_layers[0]), config.reg_threshold, config.reg_area)
                target = negative_guidance(e_cond, e_anchor, config.eta)

                student_cond = cond
                if adv is not None:
                    # The adversary trains the soft prompt only.
                    with run.phase("adversary"), frozen(*erasers.values()):
                        for _ in range(config.adv_steps):
                            attack = adapter.predict(x_t, t, cond.with_tokens(adv_pos, adv))
                            adv_loss = prediction_loss(attack, e_cond)
                            adv_opt.zero_grad(set_to_none=True)
                            adv_loss.backward()
                            adv_opt.step()
                    student_cond = cond.with_tokens(adv_pos, adv.detach())
                elif members:  # the concept word's input rows: towards the frozen model's concept prediction
                    # at x_t, or (adv_images) denoising a noised concept image, as textual inversion does
                    x_a, t_a, target_a = (x_t, t, e_cond) if images is None else noised_latent(adapter, images, g)
                    with run.phase("adversary"):
                        keep, steps_a = erasers.values(), config.adv_steps
                        student_cond = attack_word(
                            adapter, keep, member(), concept, prompt, x_a, t_a, target_a, adv_opt, steps_a
                        )

                with run.phase("student"):
                    with recording(adapter) as outputs:
                        pred = adapter.predict(x_t, t, student_cond)
                    erase_loss = prediction_loss(pred, target)
                    if config.adv_clean_erase and student_cond is not cond:
                        clean = adapter.predict(x_t, t, cond)
                        erase_loss = 0.5 * (erase_loss + prediction_loss(clean, target))
                if images is not None:  # erase at the image latent too, under the adversary's prompt
                    with run.phase("teacher"):
                        e_ci, e_ai = frozen_predictions(adapter, x_a, t_a, cond, anchor)
                    with run.phase("student"):
                        on_image = prediction_loss(
                            adapter.predict(x_a, t_a, student_cond), negative_guidance(e_ci, e_ai, config.eta)
                        )
                    erase_loss = 0.5 * (erase_loss + on_image)
                loss = erase_loss
                reg = torch.zeros(())
                if config.reg_weight:
                    reg = localization_loss(outputs, mask)
                    loss = loss + config.reg_weight * reg
                keep = torch.zeros(())
                if kept_conds:
                    other = kept_conds[int(torch.randint(len(kept_conds), (1,), generator=g))]
                    with run.phase("rollout"):
                        x_k, t_k = keep_source.draw(other, uncond, g)
                    prompts = {"kept": [other], "adversary": [student_cond], "both": [other, student_cond]}
                    for kept_prompt in prompts[config.preserve_prompt]:
                        with run.phase("student"), recording(adapter, kept_points) as outputs:
                            adapter.predict(x_k, t_k, kept_prompt)
                        keep = keep + preservation_loss(outputs) / len(prompts[config.preserve_prompt])
                    loss = loss + config.preserve_weight * keep
                coverage = mask.mean().item()
                run.log(loss, erase=erase_loss.item(), reg=reg.item(), preserve=keep.item(), mask_coverage=coverage)
                with run.phase("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                with run.phase("optimizer"):
                    opt.step()
        finally:
            loop.close()
            attachment.remove()

    tensors = {k: v.cpu() for k, v in eraser_tensors(erasers).items()}
    if adv is not None:
        tensors["adversarial_prompt"] = adv.detach().cpu()
    return Edit.made_on(
        adapter,
        kind=OUTPUT_ADAPTER,
        method=NAME,
        concepts=[concept],
        tensors=tensors,
        hyperparameters=asdict(config)
        | {"adv_positions": adv_pos, "rollout_steps": steps, "preserved_concepts": kept},
        metrics=run.metrics({"final_erase_loss": run.last("erase"), "mask_coverage": run.mean("mask_coverage")}),
    )


PRESETS = {"paper": RecelerConfig, "fast": RecelerConfig.fast}
register_method(NAME, RecelerConfig, PRESETS, fit, trainable_parameters=trainable_parameters, iterations=iterations)

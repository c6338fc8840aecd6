"""EraseAnything (ICML 2025): a LoRA on the text-side projections, trained by bi-level
optimisation. Spec: shared design ALGORITHMS.md, section EraseAnything.

Trainable part: a peft LoRA (rank 8, alpha 8, gaussian init: A ~ N(0, 1/r), B = 0) on the
text-side projections of the family adapter's "text_proj" attachment points, filtered by name:
Flux ``attn.add_q_proj`` / ``attn.add_k_proj`` of every dual-stream block (FLUX.1-dev: 76
tensors, 1,867,776 parameters); SD UNets ``attn2.to_k`` / ``attn2.to_v`` (the UNet has no
text-stream query). Target modules are given to peft by their FULL names, so nothing else
matches.

Lower level (erasure), on even steps: ``esd_weight * L_esd + attn_weight * L_attn``.
  The training prompt (one of ``prompts``) has its words shuffled (p = ``shuffle_prob``; the
  keyword moves as one unit) and then its keyword swapped for a synonym (p = ``synonym_prob``);
  the keyword's token indices are computed AFTER both rewrites. The rewritten prompts of the
  whole run are drawn before training and encoded once, so the text encoders can be released
  (``release_text_encoders``, :mod:`.memory`). x_t comes from an ESD partial
  rollout with the EDITED model (or a pool of them: ``rollout_source``, see :mod:`.rollouts`;
  the L_rsc features draw from their own source). ``L_esd = || v'(x_t, c) - [v(x_t, a) - eta (v(x_t, c) -
  v(x_t, a))] ||^2`` in the model's own prediction space (Flux: velocity; SD: epsilon or v),
  with the teacher terms from the FROZEN model (LoRA disabled) and ``a`` the anchor prompt
  (``anchor_prompt``, default "": ESD's unconditional anchor; the release uses a neutral prompt
  such as "a photo", which this setting reproduces). ``L_attn``: the attention that image
  queries put on the keyword's token columns (Flux: the last dual-stream block, as the release;
  SD: the middle-resolution cross-attentions), L2 norm over queries, summed over heads and
  columns.
Upper level (preservation), on odd steps: ``fm_weight * L_fm + rsc_weight * L_rsc``.
  ``L_fm``: the family's denoising loss (Flux: flow matching, target noise - x0; SD: epsilon or
  v) on ``preserve_images`` images that the FROZEN model generates once, at the start, for
  irrelevant-concept prompts (latents cached, and kept in checkpoints). ``L_rsc`` (reverse
  self-contrastive, tau = 0.07): features are keyword-column attention maps at a high-noise x_t
  (the first ``rsc_steps`` sampler steps), averaged over heads, layers and the keyword's
  tokens: F_un (edited model, target prompt, with gradient), F_syn (frozen, a synonym's prompt),
  F_ir_1..K (frozen, irrelevant prompts); ``s = cos(F_syn, [F_un, F_ir...]) / tau``,
  ``L_rsc = logsumexp(s[:1]) - logsumexp(s)``.
The two levels alternate 1:1 on one AdamW; ``gradient_surgery=True`` instead computes both
every step and sums them after a PCGrad projection (each gradient loses its component along
the other when they conflict).

Departures from the release (on purpose, see ALGORITHMS.md): teacher terms with the LoRA OFF;
a fresh scheduler for every rollout (sigmas reset); indices after the synonym swap; synonyms
from the concept's first WordNet sense by default (``erasekit.lexicon``); irrelevant concepts
from an offline lexicon (WordNet distance tiers, the toy world's grammar, or a user list)
instead of GPT-4o; no API key anywhere.

The Edit's ``edit.safetensors`` IS a diffusers LoRA file (keys
``transformer.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight``, alpha folded into B),
so stock diffusers loads the edit folder directly::

    pipe.load_lora_weights("edits/nudity", weight_name="edit.safetensors")

and gives the same images as ``erasekit.apply(pipe, edit)``; ``apply(pipe, edit, scale)`` is
the LoRA strength (0 = the base model). The LoRA attaches as a LoRA edit
(:mod:`erasekit.edits.lora`), in training too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..edits import WEIGHTS_FILE, Edit
from ..edits.lora import NAME as LORA
from ..edits.lora import attach_lora, init_lora, lora_prefix, lora_shapes, lora_targets
from ..lexicon import LEXICONS, TIERS, WordNetUnavailable, lexicon_for
from ..models import Conditioning, FamilyAdapter, adapter_for, frozen
from . import split_list
from .adversary import attack_word, frozen_images, noised_latent, with_soft_tokens, word_adversary
from .config import setting
from .losses import attention_feature, frozen_predictions, negative_guidance, prediction_loss
from .memory import MemorySettings, training_memory
from .registry import register_method
from .rollouts import RolloutSettings, source_from_config
from .training import TrainingRun, count_parameters

logger = logging.getLogger(__name__)
NAME = "eraseanything"
LORA_WEIGHT_NAME = WEIGHTS_FILE  # pipe.load_lora_weights(edit_folder, weight_name=LORA_WEIGHT_NAME)
NUDITY_WORDS = ("nudity", "nude", "naked", "nakedness")


@dataclass
class EraseAnythingConfig(RolloutSettings, MemorySettings):
    """Hyper-parameters; the defaults are the paper's / the release's.

    Lists are comma-separated strings (so that ``--set key=value`` works); ``prompts`` is
    "|"-separated templates with ``{concept}``.
    """

    iterations: int | None = setting(
        None, "training iterations (none: the release's 200 for nudity, 300 otherwise)", low=1
    )
    lr: float = setting(1e-3, "AdamW learning rate of the LoRA", above=0)
    weight_decay: float = setting(1e-5, "AdamW weight decay", low=0)
    rank: int = setting(8, "LoRA rank", low=1)
    alpha: float = setting(8.0, "LoRA alpha (scaling alpha / rank)", above=0)
    # Projections among the "text_proj" points (paper). Our extension, off in both presets:
    # "text_embedder.linear_1", Flux's projection of the pooled CLIP embedding ("pooled_proj").
    targets: str = setting(
        "add_q_proj,add_k_proj,to_k,to_v", "projections the LoRA trains (name endings)", sep=",", nonempty=True
    )
    eta: float = setting(
        1.0, "negative guidance in ALGORITHMS' form: L_esd's target is v(a) - eta (v(c) - v(a))", low=0
    )
    esd_weight: float = setting(1.0, "weight of L_esd (lower level)", low=0)
    attn_weight: float = setting(1e-3, "weight of L_attn (lower level)", low=0)
    fm_weight: float = setting(0.1, "weight of L_fm (upper level)", low=0)
    rsc_weight: float = setting(0.1, "weight of L_rsc (upper level)", low=0)
    tau: float = setting(0.07, "temperature of L_rsc", above=0)
    prompts: str = setting(
        "{concept}|a photo of {concept}|an image of {concept}|a picture of {concept}",
        "training prompt templates",
        sep="|",
        nonempty=True,
        template=True,
    )
    anchor_prompt: str = setting("", "the anchor a of L_esd (empty: ESD's unconditional; the release: e.g. 'a photo')")
    shuffle_prob: float = setting(0.9, "probability that a training prompt's words are shuffled", low=0, high=1)
    synonym_prob: float = setting(0.5, "probability that the keyword is swapped for a synonym", low=0, high=1)
    lexicon: str = setting(
        "auto", "auto (toy world for its pipelines, else WordNet), wordnet, toyworld or none", choices=LEXICONS
    )
    synonyms: str = setting("", "replaces the lexicon's synonyms", sep=",")
    irrelevant: str = setting("", "replaces the lexicon's irrelevant concepts", sep=",")
    irrelevant_tiers: str = setting(
        "close,mid,far",
        "lexicon tiers of the irrelevant concepts, taken round-robin",
        sep=",",
        items=TIERS,
        nonempty=True,
    )
    preserve_images: int = setting(8, "images of irrelevant concepts for L_fm (6-10 in the paper)", low=1)
    preserve_prompt: str = setting(
        "a photo of {concept}", "prompt of those images, also of the L_rsc features", template=True
    )
    preserve_steps: int | None = setting(None, "sampler steps of those images (none: the family's default)", low=1)
    rsc_irrelevant: int = setting(3, "K, the irrelevant concepts of L_rsc", low=0)
    rsc_steps: int = setting(3, "high noise: x_t after t_enc ~ U[0, rsc_steps) of the rollout's steps", low=1)
    attn_layers: str = setting(
        "auto", "layers of L_attn (auto: the adapter's keyword layers; Flux: last dual block)", nonempty=True
    )
    gradient_surgery: bool = setting(False, "compute both levels every step and combine them by PCGrad")
    # Our extension (0: off): classifier-free guidance reads every image through the unconditional
    # ("") branch, which the LoRA changes more than other prompts'; this term keeps it at the frozen
    # model's (benchmarks/RESULTS.md has what it did).
    uncond_weight: float = setting(
        0.0,
        "our extension: weight of a term keeping the prediction on the empty prompt at the frozen model's "
        "(upper level, at its noised preserve image); 0: off",
        low=0,
    )
    # Our extension (0: off): an adversary on the concept word's INPUT embedding (every text
    # encoder) learns, as textual inversion does, to denoise noised latents of the concept's own
    # images (the frozen model's, made once), and the lower level erases there too under its prompt.
    adv_images: int = setting(
        0,
        "our extension: images of the concept (the frozen model's, made once) that an input-space adversary on the "
        "concept word learns to denoise, as textual inversion does; the lower level erases there too; 0: off",
        low=0,
    )
    # Our extension (off): the same input-space adversary, at the lower level's rollout x_t towards
    # the frozen model's prediction on the concept prompt there (Receler's adv_space input)
    # instead of at image latents; the lower level erases there under its prompt too.
    adv_rollout: bool = setting(
        False,
        "our extension: an input-space adversary on the concept word at the lower level's rollout x_t, towards "
        "the frozen model's concept prediction there; the lower level erases there under its prompt too",
    )
    adv_steps: int = setting(
        5, "adv_images / adv_rollout: the adversary's Adam steps per lower-level iteration", low=1
    )
    adv_lr: float = setting(
        0.1, "adv_images / adv_rollout: its learning rate, in units of each token-embedding table's std", above=0
    )
    adv_image_steps: int | None = setting(None, "adv_images: sampler steps of the images (none: the family's)", low=1)
    # Our extension (0: off): the upper level also keeps the prediction at its irrelevant image
    # under the adversary's prompt at the frozen model's. Preserved under their own prompts only,
    # the LoRA may act on any unfamiliar token; under the adversary's prompt too, it has to tell
    # the concept from the irrelevant ones by the image.
    adv_preserve_weight: float = setting(
        0.0,
        "our extension (adv_images or adv_rollout): weight of a term keeping the prediction at the upper "
        "level's irrelevant image under the adversary's prompt at the frozen model's; 0: off",
        low=0,
    )
    batch_teacher: bool = setting(
        False,
        "our extension: the frozen model's L_rsc features (synonym and K irrelevant prompts) in one batched pass "
        "instead of K + 1 (the same features up to float rounding)",
    )
    resolution: int | None = setting(None, "size of the training images in px (none: the model's; paper: 512)", low=8)
    checkpoint_every: int = setting(50, "with a checkpoint folder: save every this many iterations", low=1)
    seed: int = setting(0, "seed of the LoRA's init and of every random draw of training", low=0)

    def check(self) -> None:
        """rsc_steps counts steps of the rollout: at most rollout_steps when that is given; the
        adversary's preservation needs the adversary."""
        if self.rollout_steps is not None and self.rsc_steps > self.rollout_steps:
            raise self.error("rsc_steps", self.rsc_steps, f"an integer in [1, rollout_steps = {self.rollout_steps}]")
        if self.adv_preserve_weight and not (self.adv_images or self.adv_rollout):
            raise self.error(
                "adv_preserve_weight", self.adv_preserve_weight, "0 unless adv_images is above 0 or adv_rollout is on"
            )
        if self.adv_images and self.adv_rollout:
            raise self.error("adv_rollout", self.adv_rollout, "off with adv_images above 0 (one adversary)")

    def guidance_eta(self) -> float:
        """``eta``: already in ALGORITHMS' form."""
        return self.eta

    @classmethod
    def fast(cls, **overrides) -> EraseAnythingConfig:
        """The toy-world preset: shorter rollouts, fewer images, the toy world's lexicon and
        grammar, a stronger negative guidance and a weaker reverse self-contrastive term. On
        both toy pipelines (circle, triangle, heart; 12 prompts per set) H was 67.4 on Flux at
        eta 3 against 51.0 at eta 1 (one training seed). Over three training seeds at eta 3 and
        120 iterations, L_rsc at the paper's weight 0.1 gave H 78.3 on SD and 64.4 on Flux, at
        0.01 84.7 and 68.5, and off 83.4 and 71.3: at 0.1 it pushes the concept's attention map
        away from its synonym's with a gradient scaled by 1 / tau, and on one SD seed stopped
        the triangle's erasure altogether. At 0.01, 240 iterations (within the release's
        200-300) gave 88.1 on SD and 76.3 on Flux (benchmarks/RESULTS.md)."""
        base = dict(
            iterations=240,
            eta=3.0,
            rsc_weight=0.01,
            lexicon="toyworld",
            prompts="an image of a {concept}|a {concept}|a photo of a {concept}|the {concept}",
            preserve_prompt="an image of a {concept}",
            preserve_images=6,
            rollout_steps=20,
            checkpoint_every=40,
        )
        return cls(**(base | overrides))

    def resolved_iterations(self, concept: str) -> int:
        if self.iterations is not None:
            return int(self.iterations)
        return 200 if concept.strip().lower() in NUDITY_WORDS else 300


PRESETS = {"paper": EraseAnythingConfig, "fast": EraseAnythingConfig.fast}


# ---- the LoRA ------------------------------------------------------------------------------


# ---- prompts -------------------------------------------------------------------------------


def rewrite_prompt(
    prompt: str,
    keyword: str,
    synonyms: Sequence[str],
    generator: torch.Generator,
    shuffle_prob: float = 0.9,
    synonym_prob: float = 0.5,
) -> tuple[str, str]:
    """EraseAnything's prompt augmentation: with probability ``shuffle_prob`` shuffle the
    prompt's words (every occurrence of ``keyword`` moves as one unit), then with probability
    ``synonym_prob`` replace the keyword by a random synonym. Returns (new prompt, the keyword
    as it now appears): compute token indices from THESE (after both rewrites).
    Always draws the same number of random numbers from ``generator``."""
    pattern = re.compile(
        r"(?<![0-9A-Za-z])" + r"\s+".join(map(re.escape, keyword.split())) + r"(?![0-9A-Za-z])", flags=re.IGNORECASE
    )
    if not pattern.search(prompt):
        raise ValueError(f"keyword {keyword!r} not in prompt {prompt!r}")
    key = object()
    units: list = []
    last = 0
    for m in pattern.finditer(prompt):
        units += prompt[last : m.start()].split() + [key]
        last = m.end()
    units += prompt[last:].split()
    r_shuffle, r_swap = torch.rand(2, generator=generator).tolist()
    perm = torch.randperm(len(units), generator=generator).tolist()
    pick = int(torch.randint(0, max(1, len(synonyms)), (1,), generator=generator))
    if r_shuffle < shuffle_prob:
        units = [units[i] for i in perm]
    word = keyword
    if synonyms and r_swap < synonym_prob:
        word = synonyms[pick]
    return " ".join(word if u is key else u for u in units), word


# ---- losses --------------------------------------------------------------------------------


def negative_guidance_target(adapter, x_t, t, cond: Conditioning, anchor: Conditioning, eta: float):
    """The ESD target from the FROZEN model (every edit, the LoRA included, switched off):
    ``v(x_t, anchor) - eta * (v(x_t, cond) - v(x_t, anchor))``, one batched pass, no grad."""
    v_cond, v_anchor = frozen_predictions(adapter, x_t, t, cond, anchor)
    return negative_guidance(v_cond, v_anchor, eta)


def attention_suppression(maps: list[torch.Tensor]) -> torch.Tensor:
    """sum over maps (B, heads, HW, n_cols) of the L2 norm over image queries (summed over
    batch, heads and keyword columns)."""
    return torch.stack([m.float().norm(dim=2).sum() for m in maps]).sum()


def reverse_self_contrastive(
    f_un: torch.Tensor, f_syn: torch.Tensor, f_ir: Sequence[torch.Tensor], tau: float = 0.07
) -> torch.Tensor:
    """``s = cos(F_syn, [F_un, F_ir_1..K]) / tau``; ``logsumexp(s[:1]) - logsumexp(s)``: lowers
    the edited concept's similarity to its synonym relative to the irrelevant concepts'."""
    others = torch.stack([f_un.flatten(), *[f.flatten() for f in f_ir]])
    s = F.cosine_similarity(f_syn.flatten()[None], others, dim=-1) / tau
    return torch.logsumexp(s[:1], 0) - torch.logsumexp(s, 0)


def pcgrad(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad for two flat gradients: when they conflict (negative dot product) each loses its
    projection on the other (computed from the originals); returns the sum."""
    dot = torch.dot(g1, g2)
    if dot >= 0:
        return g1 + g2
    p1 = g1 - dot / g2.dot(g2).clamp_min(1e-20) * g2
    p2 = g2 - dot / g1.dot(g1).clamp_min(1e-20) * g1
    return p1 + p2


# ---- words ---------------------------------------------------------------------------------


def concept_words(config: EraseAnythingConfig, pipe, concept: str) -> tuple[list[str], list[str], str]:
    """(synonyms, irrelevant concepts, where they came from). ``config.synonyms`` /
    ``config.irrelevant`` replace the lexicon's lists; the lexicon is only asked for what
    they do not give."""
    synonyms, irrelevant = split_list(config.synonyms), split_list(config.irrelevant)
    n_ir = max(config.preserve_images, config.rsc_irrelevant)
    source = "config"
    if not synonyms or not irrelevant:
        tiers = split_list(config.irrelevant_tiers)
        try:
            lexicon = lexicon_for(config.lexicon, pipe, concept)
            source = lexicon.name
            if not synonyms:
                synonyms = lexicon.synonyms(concept)
            if not irrelevant:
                irrelevant = lexicon.irrelevant_mixed(concept, tiers, n_ir)
        except (WordNetUnavailable, ValueError) as err:
            if not irrelevant:
                raise ValueError(
                    f"no irrelevant concepts for {concept!r}: {err}. Give them with "
                    "irrelevant='word, word, ...' (and synonyms='...')"
                ) from err
            logger.warning("no synonyms for %r (%s); synonym swap and L_rsc are off", concept, err)
    synonyms = [s for s in synonyms if s.lower() != concept.lower()]
    irrelevant = [w for w in irrelevant if w.lower() != concept.lower() and w not in synonyms]
    if not irrelevant:
        raise ValueError(f"no irrelevant concepts for {concept!r}; give them with irrelevant='word, word, ...'")
    return synonyms, irrelevant, source


# ---- training ------------------------------------------------------------------------------


class _Trainer:
    """One EraseAnything run: state shared by the two levels."""

    def __init__(self, adapter, concept: str, config: EraseAnythingConfig, synonyms, irrelevant, g, iterations: int):
        self.adapter, self.concept, self.config = adapter, concept, config
        self.synonyms, self.irrelevant, self.g = synonyms, irrelevant, g
        self.phase = lambda name: nullcontext()  # fit sets the run's TrainingRun.phase
        self.images: torch.Tensor | None = None  # adv_images: latents of the concept's images
        self.rows: dict[str, torch.nn.Parameter] = {}  # adv_images: the concept word's input rows
        self.adv_opt: torch.optim.Optimizer | None = None
        self.templates = split_list(config.prompts, "|")
        for tpl in self.templates:
            adapter.token_indices(tpl.format(concept=concept), concept)  # ValueError if absent
        self.steps = int(config.rollout_steps or adapter.default_steps)
        if not 1 <= config.rsc_steps <= self.steps:
            raise ValueError(f"rsc_steps must be in [1, {self.steps}], got {config.rsc_steps}")
        self.layers = self._layers()
        self._conds: dict[str, Conditioning] = {}
        self.empty = self.cond("")
        self.anchor = self.cond(config.anchor_prompt)
        self.rsc_prompt = config.preserve_prompt.format(concept=concept)
        self.rsc_idx = adapter.token_indices(self.rsc_prompt, concept)
        self.ir_rsc = [
            (
                self.cond(config.preserve_prompt.format(concept=w)),
                adapter.token_indices(config.preserve_prompt.format(concept=w), w),
            )
            for w in irrelevant[: config.rsc_irrelevant]
        ]
        n = config.preserve_images
        self.preserve_prompts = [
            config.preserve_prompt.format(concept=irrelevant[i % len(irrelevant)]) for i in range(n)
        ]
        self.latents: torch.Tensor | None = None
        # The lower level's prompts for the whole run, drawn up front (from g, before anything
        # else) so that every text embedding exists before training and the text encoders can
        # be released; token indices computed AFTER shuffle and swap.
        n_lower = iterations if config.gradient_surgery else (iterations + 1) // 2
        self.plan = []
        for _ in range(n_lower):
            prompt = self.templates[self.randint(len(self.templates))].format(concept=concept)
            prompt, word = rewrite_prompt(prompt, concept, synonyms, g, config.shuffle_prob, config.synonym_prob)
            self.plan.append((prompt, adapter.token_indices(prompt, word)))
        # x_t of the erasure loss (t_enc over all N steps) and of the L_rsc features (high noise).
        self.sources = [
            source_from_config(adapter, config, self.steps, high, name, **self.size())
            for high, name in ((self.steps, "rollout"), (config.rsc_steps, "rsc_rollout"))
        ]

    def _layers(self) -> list[str]:
        spec = self.config.attn_layers
        if spec != "auto":
            return split_list(spec)
        return self.adapter.keyword_layers()

    def cond(self, prompt: str) -> Conditioning:
        """The prompt's embeddings on the model's device (kept on the CPU between uses)."""
        if prompt not in self._conds:
            self._conds[prompt] = self.adapter.encode([prompt]).to("cpu")
        return self._conds[prompt].to(self.adapter.device)

    def encode_all(self) -> None:
        """Encode every prompt of the run (before the text encoders are released)."""
        c = self.config
        words = list(self.synonyms) + list(self.irrelevant[: c.rsc_irrelevant])
        prompts = [p for p, _ in self.plan] + self.preserve_prompts + [self.rsc_prompt]
        prompts += [c.preserve_prompt.format(concept=w) for w in words]
        for prompt in dict.fromkeys(prompts):
            self.cond(prompt)

    def randint(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.g))

    def size(self) -> dict:
        r = self.config.resolution
        return {"height": r, "width": r}

    def generate_preserve_latents(self) -> torch.Tensor:
        """Images of the irrelevant prompts from the FROZEN model, as latents (cached)."""
        return frozen_images(self.adapter, self.preserve_prompts, self.g, self.config.preserve_steps, **self.size())

    # -- the two levels --
    def lower(self, call: int) -> tuple[torch.Tensor, dict]:
        """The erasure level at its ``call``-th use (indexes the prompt plan)."""
        a, c = self.adapter, self.config
        prompt, idx = self.plan[call]
        cond = self.cond(prompt)
        with self.phase("rollout"):
            x_t, t = self.sources[0].draw(cond, self.empty, self.g)
        with self.phase("teacher"):
            target = negative_guidance_target(a, x_t, t, cond, self.anchor, c.eta)
        with self.phase("student"):
            with a.probe(layers=self.layers, token_indices=idx) as probe:
                pred = a.predict(x_t, t, cond)
            esd = prediction_loss(pred, target)
            attn = attention_suppression([m for layer in self.layers for m in probe.maps[layer]])
            loss = c.esd_weight * esd + c.attn_weight * attn
        logs = {"esd": esd.item(), "attn": attn.item(), "prompt": prompt}
        if self.images is not None:  # adv_images: at a noised concept image, towards its training target
            x_a, t_a, target_a = noised_latent(a, self.images, self.g)
            loss, logs["adv_esd"] = self.adversary_erase(loss, x_a, t_a, target_a)
        elif c.adv_rollout:  # at the rollout's x_t, towards the frozen model's concept prediction there
            loss, logs["adv_esd"] = self.adversary_erase(loss, x_t, t)
        return loss, logs

    def adversary_erase(self, loss: torch.Tensor, x, t, adv_target=None) -> tuple[torch.Tensor, float]:
        """The input-space adversary's steps at ``x`` (1, ...), ``t`` (1,) towards ``adv_target``
        (none: the frozen model's prediction on the concept prompt there), the LoRA frozen; then
        ``loss`` plus the erase term at ``x`` under the adversary's prompt, and that term's value."""
        a, c = self.adapter, self.config
        with self.phase("teacher"):
            v_cond, v_anchor = frozen_predictions(a, x, t, self.cond(self.rsc_prompt), self.anchor)
        target = v_cond if adv_target is None else adv_target
        with self.phase("adversary"):
            adv = attack_word(
                a, [a.denoiser], self.rows, self.concept, self.rsc_prompt, x, t, target, self.adv_opt, c.adv_steps
            )
        with self.phase("student"):
            term = prediction_loss(a.predict(x, t, adv), negative_guidance(v_cond, v_anchor, c.eta))
        return loss + c.esd_weight * term, term.item()

    def upper(self) -> tuple[torch.Tensor, dict]:
        a, c = self.adapter, self.config
        i = self.randint(len(self.latents))
        x0 = self.latents[i : i + 1]
        noise = torch.randn(x0.shape, generator=self.g).to(x0.device, x0.dtype)
        t = a.sample_timesteps(1, generator=self.g)
        x_t = a.add_noise(x0, noise, t)
        with self.phase("student"):
            pred = a.predict(x_t, t, self.cond(self.preserve_prompts[i]))
            fm = prediction_loss(pred, a.training_target(x0, noise, t))
        loss = c.fm_weight * fm
        logs = {"fm": fm.item()}
        if c.uncond_weight:
            uncond = self.kept_at_frozen(x_t, t, self.empty)
            loss = loss + c.uncond_weight * uncond
            logs["uncond"] = uncond.item()
        if c.adv_preserve_weight:
            adv_keep = self.kept_at_frozen(x_t, t, self.adversary_cond())
            loss = loss + c.adv_preserve_weight * adv_keep
            logs["adv_keep"] = adv_keep.item()
        if self.synonyms and c.rsc_weight:
            rsc = self.rsc()
            loss = loss + c.rsc_weight * rsc
            logs["rsc"] = rsc.item()
        return loss, logs

    def kept_at_frozen(self, x_t, t, cond: Conditioning) -> torch.Tensor:
        """The edited model's prediction at ``x_t``, ``t`` on ``cond`` against the frozen model's
        (a preservation term; gradient to the LoRA only)."""
        a = self.adapter
        with self.phase("teacher"), torch.no_grad(), a.edits_disabled():
            frozen_pred = a.predict(x_t, t, cond)
        with self.phase("student"):
            return prediction_loss(a.predict(x_t, t, cond), frozen_pred)

    def adversary_cond(self) -> Conditioning:
        """The adversary's prompt (``rsc_prompt`` with the concept word's current input rows), no gradient."""
        rows = {n: r.detach() for n, r in self.rows.items()}
        with torch.no_grad(), with_soft_tokens(self.adapter.pipe, [self.concept], rows):
            return self.adapter.encode([self.rsc_prompt])

    def feature(self, x_t, t, cond, idx) -> torch.Tensor:
        with self.adapter.probe(layers=self.layers, token_indices=idx) as probe:
            self.adapter.predict(x_t, t, cond)
        return attention_feature([m for layer in self.layers for m in probe.maps[layer]])

    def features(self, x_t, t, items: list[tuple[Conditioning, list[int]]]) -> list[torch.Tensor]:
        """:meth:`feature` of every (conditioning, token indices) item at the same ``x_t`` (1, ...),
        ``t`` (1,), from one denoiser pass over the batch: a (1, HW) feature per item."""
        n = len(items)
        cond = Conditioning.cat([cond_i for cond_i, _ in items])
        with self.adapter.probe(layers=self.layers) as probe:  # every text column; each item picks its own
            self.adapter.predict(x_t.repeat(n, *[1] * (x_t.dim() - 1)), t.repeat(n), cond)
        maps = [m for layer in self.layers for m in probe.maps[layer]]
        return [attention_feature([m[i : i + 1, ..., idx] for m in maps]) for i, (_, idx) in enumerate(items)]

    def rsc(self) -> torch.Tensor:
        a, c = self.adapter, self.config
        syn = self.synonyms[self.randint(len(self.synonyms))]
        cond = self.cond(self.rsc_prompt)
        with self.phase("rollout"):
            x_t, t = self.sources[1].draw(cond, self.empty, self.g)
        with self.phase("student"):
            f_un = self.feature(x_t, t, cond, self.rsc_idx)  # edited model, with gradient
        syn_prompt = c.preserve_prompt.format(concept=syn)
        frozen_items = [(self.cond(syn_prompt), a.token_indices(syn_prompt, syn)), *self.ir_rsc]
        with self.phase("teacher"), torch.no_grad(), a.edits_disabled():  # frozen
            if c.batch_teacher:
                f_syn, *f_ir = self.features(x_t, t, frozen_items)
            else:
                f_syn, *f_ir = [self.feature(x_t, t, cond_i, idx_i) for cond_i, idx_i in frozen_items]
        return reverse_self_contrastive(f_un, f_syn, f_ir, c.tau)


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def _set_grad(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def trainable_parameters(model, config: EraseAnythingConfig) -> int:
    """Parameters of the LoRA ``fit`` would train on ``model`` (a pipeline or an adapter, a
    meta-device one included), from the shapes alone."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    return count_parameters(lora_shapes(adapter, config.rank, lora_targets(adapter, config.targets)).values())


def iterations(config: EraseAnythingConfig, family: str, concept: str) -> int:
    """The iterations ``fit`` runs: the config's, else the release's for the concept."""
    return config.resolved_iterations(concept)


def fit(
    pipe,
    concept: str,
    config: EraseAnythingConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Edit:
    """Train an EraseAnything LoRA that removes ``concept`` from ``pipe``; returns the Edit (not
    applied). With ``checkpoint_dir``, state is saved every ``config.checkpoint_every``
    iterations and a later call with the same folder, concept, model and settings resumes from
    the last checkpoint, ending with the same weights as an uninterrupted run (same seed, CPU);
    see :class:`.training.TrainingRun`."""
    config = config or EraseAnythingConfig()
    adapter = adapter_for(pipe)
    iterations = config.resolved_iterations(concept)
    synonyms, irrelevant, source = concept_words(config, pipe, concept)
    g = torch.Generator().manual_seed(config.seed)  # every random draw of training goes through g
    trainer = _Trainer(adapter, concept, config, synonyms, irrelevant, g, iterations)
    prefix = lora_prefix(adapter)
    words = {"synonyms": synonyms, "irrelevant": irrelevant}
    run = TrainingRun(pipe, NAME, LORA, concept, config, iterations, checkpoint_dir, progress, settings=words)
    trainer.phase = run.phase

    initial = init_lora(lora_shapes(adapter, config.rank, lora_targets(adapter, config.targets)), g)
    if config.adv_images or config.adv_rollout:
        (trainer.rows,), trainer.adv_opt = word_adversary(pipe, concept, config.adv_lr)
    saved = run.resume()
    if saved is not None:
        initial = {k[len("lora.") :]: v for k, v in saved.items() if k.startswith("lora.")}
        trainer.latents = saved["preserve_latents"].to(adapter.device, adapter.dtype)
        if config.adv_images:
            trainer.images = saved["adv_images"].to(adapter.device, adapter.dtype)
        if trainer.rows:
            with torch.no_grad():
                for n, r in trainer.rows.items():
                    r.copy_(saved[f"adv_row.{n}"])
    else:
        trainer.latents = trainer.generate_preserve_latents()
        if config.adv_images:
            prompts = [trainer.rsc_prompt] * config.adv_images
            trainer.images = frozen_images(adapter, prompts, g, config.adv_image_steps, **trainer.size())
    trainer.encode_all()

    # The adversary encodes its prompt inside the loop: the text encoders stay.
    memory = replace(config, release_text_encoders=config.release_text_encoders and not trainer.rows)
    with (
        frozen(adapter.denoiser, *adapter.text_encoders()),
        training_memory(adapter, memory, probed=trainer.layers),
    ):  # only the edit trains
        handle = attach_lora(
            adapter, initial, f"erasekit_training_{id(trainer)}", config.alpha / config.rank, trainable=True
        )
        try:
            params = handle.parameters()
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

            def state() -> dict[str, torch.Tensor]:
                lora = {f"lora.{k}": v for k, v in handle.state(prefix).items()}
                adv = {f"adv_row.{n}": r for n, r in trainer.rows.items()}
                adv |= {"adv_images": trainer.images} if trainer.images is not None else {}
                return lora | {"preserve_latents": trainer.latents} | adv

            optimizers = {"opt": opt, "adv_opt": trainer.adv_opt}
            loop = run.loop(
                params, state, optimizers, generator=g, sources=trainer.sources, auxiliary=trainer.rows.values()
            )
            for it in loop:
                if config.gradient_surgery:
                    lower, log_l = trainer.lower(it)
                    with run.phase("backward"):
                        g_lower = _flat_grad(lower, params)
                    upper, log_u = trainer.upper()
                    with run.phase("backward"):
                        g_upper = _flat_grad(upper, params)
                    conflict = bool(torch.dot(g_lower, g_upper) < 0)
                    run.log((lower, upper), level="both", **log_l, **log_u, conflict=conflict)
                    flat = pcgrad(g_lower, g_upper)
                else:
                    level = "lower" if it % 2 == 0 else "upper"
                    loss, logs = trainer.lower(it // 2) if level == "lower" else trainer.upper()
                    run.log(loss, level=level, **logs)
                    with run.phase("backward"):
                        flat = _flat_grad(loss, params)
                with run.phase("optimizer"):
                    _set_grad(params, flat)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            weights = handle.state(prefix)
        finally:
            handle.remove()

    # Fold alpha / rank into B: the file then loads with any LoRA loader at alpha = rank.
    scaling = config.alpha / config.rank
    tensors_out = {k: (v * scaling if k.endswith("lora_B.weight") and scaling != 1 else v) for k, v in weights.items()}

    def level(name: str):
        return lambda entry: entry["level"] in (name, "both")

    return Edit.made_on(
        adapter,
        kind=LORA,
        method=NAME,
        concepts=[concept],
        tensors=tensors_out,
        hyperparameters=asdict(config)
        | {
            "iterations": iterations,
            "synonyms": synonyms,
            "irrelevant_concepts": irrelevant,
            "lexicon_used": source,
            "rollout_steps": trainer.steps,
            "attn_layers": trainer.layers,
            "lora_prefix": prefix,
            "lora_targets": [p.name for p in lora_targets(adapter, config.targets)],
            "diffusers_lora_weight_name": LORA_WEIGHT_NAME,
        },
        metrics=run.metrics(
            {
                "final_esd_loss": run.last("esd", level("lower")),
                "final_attn_loss": run.last("attn", level("lower")),
                "final_fm_loss": run.last("fm", level("upper")),
                "final_rsc_loss": run.last("rsc", level("upper")),
            }
        ),
    )


register_method(
    NAME, EraseAnythingConfig, PRESETS, fit, trainable_parameters=trainable_parameters, iterations=iterations
)

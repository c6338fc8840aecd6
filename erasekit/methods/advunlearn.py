"""AdvUnlearn (Zhang et al., NeurIPS 2024, "Defensive Unlearning with Adversarial Training for
Robust Concept Erasure in Diffusion Models"): ESD's erasure moved into the TEXT ENCODER and
trained against an adversary in the token-input space. Spec: shared design METHODS2.md,
section "AdvUnlearn"; release OPTML-Group/AdvUnlearn @ 9d23124.

What changes: the text encoder(s), every parameter but the token and position embeddings
(SD 1.4's CLIP: the 12 layers and the final layer norm, 85,056,000 parameters); the denoiser
and the VAE stay frozen. The Edit is a weight-delta edit on the pipeline component
(``delta:text_encoder.<parameter>``), so ``erasekit export --format merged`` writes a stock
CLIPTextModel folder that any pipeline sharing the encoder can load.

One iteration (release ``retain_train='reg'``)::

    x_t, t  <- rollout of the FROZEN model on tau0(c)          (the denoiser never changes)
    target   = e_u - eta (e_c - e_u)                           (e from tau0; eta 1)
    L        = || eps(x_t, tau'(p_adv), t) - target ||^2
             + gamma * || eps(x_r, tau'(r), t_r) - eps(x_r, tau0(r), t_r) ||^2   (a batch of retain prompts)

``p_adv`` is the erased prompt with ``attack_tokens`` soft tokens right after BOS (the release's
``prefix_k``), each a free vector in the text encoder's INPUT embedding space (one per text
encoder: Flux has CLIP and T5). The lower level (the attacker), every ``attack_every``
iterations after ``warmup``: ``attack_steps`` Adam steps (lr ``attack_lr``) that minimise
``|| eps(x_t, tau'(p_adv), t) - eps(x_t, tau0(c), t) ||^2`` over the soft tokens only, a fresh
x_t per step, starting from a random vocabulary row (``attack_init="random"``, the README's
command) or the previous tokens (``"latest"``, the argparse default). During warm-up p_adv = c.
The soft tokens are placeholder words whose input embeddings are replaced while encoding
(:func:`erasekit.models.token_rows.token_rows`): the tables never change.

Released hyper-parameters (``paper`` preset): 1,000 iterations, warm-up 200, Adam lr 1e-5,
eta 1, gamma 0.3 (``retain_loss_w``), 5 retain prompts "a photo of {object}" per iteration
(COCO objects), 1 soft token, 30 attack steps at lr 1e-3, DDIM 50 rollouts at guidance 3.

Release bugs not copied (METHODS2.md): the attack never zeroed the soft token's gradient (each
step used the running sum of all previous ones): zeroed here, the sum kept only behind
``attack_accumulate_grad``; the prompt length was counted in whitespace words, not tokens (the
tokenizer places the tokens here); layer subsets matched by name prefix (here every non-embedding
parameter of the chosen encoders); the denoiser kept ``requires_grad`` during attacks (frozen here).

Flux (an extension, no counterpart in the paper): ``encoders`` chooses CLIP
(``text_encoder``), T5 (``text_encoder_2``) or both (``all``, the default); the soft tokens live
in every encoder's input space. On FLUX.1-dev's 4.7B-parameter T5 a full fine-tune is what
``encoders`` allows, not what we recommend: see benchmarks/RESULTS.md for measured cost.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..edits import Edit
from ..edits.weight_delta import NAME as WEIGHT_DELTA
from ..edits.weight_delta import attached_parameters, delta_key, train_deltas
from ..lexicon import LEXICONS, WordNetUnavailable, lexicon_for
from ..models import Conditioning, FamilyAdapter, adapter_for, frozen
from ..models.token_rows import text_towers
from . import split_list
from .adversary import PLACEHOLDERS, placeholder_words, random_rows, with_soft_tokens
from .config import setting
from .losses import frozen_predictions, negative_guidance, prediction_loss
from .registry import register_method
from .rollouts import RolloutSettings, source_from_config
from .training import TrainingRun

NAME = "advunlearn"
logger = logging.getLogger(__name__)

INITS = ("random", "latest")
ATTACKS = ("pgd", "fast_at")
RETAIN_SOURCES = ("coco", "lexicon")
# The 80 COCO object classes: the release's retain set is "a photo of {object}" over COCO objects.
COCO_OBJECTS = (
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, "
    "stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, "
    "backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, "
    "baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, "
    "banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, "
    "bed, dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, "
    "refrigerator, book, clock, vase, scissors, teddy bear, hair drier, toothbrush"
)


@dataclass
class AdvUnlearnConfig(RolloutSettings):
    """Hyper-parameters; the defaults are the release's (``paper``)."""

    encoders: str = setting(
        "all", "text encoders trained: all, or component names (text_encoder = CLIP, text_encoder_2 = T5)", sep=","
    )
    iterations: int = setting(1000, "training iterations", low=1)
    warmup: int = setting(200, "iterations before the first attack (p_adv = c until then)", low=0)
    lr: float = setting(1e-5, "Adam learning rate of the text encoder", above=0)
    eta: float = setting(1.0, "negative guidance, ALGORITHMS' form: target = e_u - eta (e_c - e_u)", low=0)
    prompt: str = setting("{concept}", "the erased prompt c", template=True)
    uncond_prompt: str = setting("", "the unconditional prompt of e_u")
    retain_weight: float = setting(0.3, "gamma, the weight of the retain term (release retain_loss_w)", low=0)
    retain_batch: int = setting(5, "retain prompts per iteration", low=1)
    retain_prompt: str = setting(
        "a photo of {concept}", "retain prompt template (over the retained objects)", template=True
    )
    retain: str = setting("", "the retained objects (empty: from retain_source)", sep=",")
    retain_source: str = setting(
        "coco", "where retained objects come from: the 80 COCO classes or the lexicon", choices=RETAIN_SOURCES
    )
    retain_count: int = setting(24, "retained objects taken from the lexicon", low=1)
    lexicon: str = setting(
        "auto", "the lexicon of synonyms (filtered out of the retain set) and retained objects", choices=LEXICONS
    )
    attack_tokens: int = setting(1, "k, soft tokens inserted after BOS", low=1, high=len(PLACEHOLDERS) - 1)
    attack_steps: int = setting(30, "attacker's Adam steps per attack", low=1)
    attack_lr: float = setting(1e-3, "attacker's Adam learning rate", above=0)
    attack_every: int = setting(1, "iterations between attacks after warm-up", low=1)
    attack_init: str = setting(
        "random", "soft tokens start from a random vocabulary row or the last attack's", choices=INITS
    )
    attack_method: str = setting("pgd", "pgd: Adam on the gradient; fast_at: Adam on its sign", choices=ATTACKS)
    attack_accumulate_grad: bool = setting(
        False, "the release's attack: each step uses the sum of all previous gradients (a bug kept for comparison)"
    )
    checkpoint_every: int = setting(200, "with a checkpoint folder: save every this many iterations", low=1)
    seed: int = setting(0, "seed of every random draw of training", low=0)

    def check(self) -> None:
        """Warm-up shorter than the run, so that the adversary ever acts (or 0 attacks asked)."""
        if self.warmup > self.iterations:
            raise self.error("warmup", self.warmup, f"an integer in [0, iterations = {self.iterations}]")

    def guidance_eta(self) -> float:
        """``eta``: already in ALGORITHMS' form."""
        return self.eta

    @classmethod
    def paper(cls, **overrides) -> AdvUnlearnConfig:
        """The release's README command: DDIM 50 rollouts at guidance 3, everything else default."""
        return cls(**(dict(rollout_steps=50, rollout_guidance=3.0) | overrides))

    @classmethod
    def fast(cls, **overrides) -> AdvUnlearnConfig:
        """The toy-world preset: fewer iterations, attack steps and rollout steps, a pool of
        rollouts (the denoiser is frozen, so the pool never goes stale), a higher learning rate,
        the toy world's objects as the retain set."""
        base = dict(
            iterations=150,
            warmup=30,
            lr=2e-4,
            prompt="an image of a {concept}",
            retain_prompt="an image of a {concept}",
            retain_source="lexicon",
            lexicon="toyworld",
            retain_count=8,
            retain_batch=4,
            attack_steps=5,
            attack_lr=1e-2,
            rollout_steps=20,
            rollout_source="pool",
            rollout_pool=4,
            rollout_refresh=10,
            checkpoint_every=50,
        )
        return cls(**(base | overrides))


PRESETS = {"paper": AdvUnlearnConfig.paper, "fast": AdvUnlearnConfig.fast}


# ---- what trains ---------------------------------------------------------------------------


def trained_encoders(pipe, encoders: str) -> dict[str, nn.Module]:
    """Component name -> text encoder for ``encoders`` ("all" or component names); a ValueError
    naming the pipeline's text encoders for a name it lacks."""
    towers = {name: enc for name, _, enc in text_towers(pipe)}
    wanted = split_list(encoders)
    if wanted == ["all"]:
        return towers
    unknown = [w for w in wanted if w not in towers]
    if unknown or not wanted:
        raise ValueError(f"encoders={encoders!r}: this pipeline's text encoders are {', '.join(towers)} (or all)")
    return {w: towers[w] for w in wanted}


def encoder_parameters(encoder: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``encoder`` that is not in an embedding table (token, position, T5's
    relative-position bias): what AdvUnlearn's ``text_encoder_full`` trains."""
    embedded = {id(p) for m in encoder.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return {n: p for n, p in encoder.named_parameters() if id(p) not in embedded}


def _component_params(pipe, encoders: str) -> dict[str, nn.Parameter]:
    """ "<component>:<parameter>" -> parameter of every trained encoder."""
    return {
        f"{comp}:{n}": p
        for comp, enc in trained_encoders(pipe, encoders).items()
        for n, p in encoder_parameters(enc).items()
    }


def trainable_parameters(model, config: AdvUnlearnConfig) -> int:
    """Parameters AdvUnlearn trains on ``model`` (a pipeline or an adapter; meta-device too)."""
    pipe = model.pipe if isinstance(model, FamilyAdapter) else model
    return sum(p.numel() for p in _component_params(pipe, config.encoders).values())


def iterations(config: AdvUnlearnConfig, family: str, concept: str) -> int:
    """The iterations ``fit`` runs."""
    return config.iterations


# ---- prompts -------------------------------------------------------------------------------


def retain_objects(config: AdvUnlearnConfig, pipe, concept: str) -> tuple[list[str], str]:
    """(retained objects without the concept and its synonyms, where they came from)."""
    synonyms: list[str] = []
    lexicon = None
    try:
        lexicon = lexicon_for(config.lexicon, pipe, concept)
        synonyms = lexicon.synonyms(concept)
    except (WordNetUnavailable, ValueError) as err:
        logger.info("no synonyms for %r (%s): only the concept itself is left out of the retain set", concept, err)
    if config.retain:
        objects, source = split_list(config.retain), "config"
    elif config.retain_source == "coco":
        objects, source = split_list(COCO_OBJECTS), "coco"
    else:
        if lexicon is None:
            raise ValueError(f"no lexicon gives retained objects for {concept!r}: give them with retain='a, b, ...'")
        objects, source = lexicon.irrelevant_mixed(concept, ["close", "mid", "far"], config.retain_count), lexicon.name
    banned = {w.lower() for w in [concept, *synonyms]}
    objects = [o for o in objects if o.lower() not in banned]
    if not objects:
        raise ValueError(f"no retained objects left for {concept!r}: give them with retain='a, b, ...'")
    return objects, source


# ---- training ------------------------------------------------------------------------------


def fit(
    pipe,
    concept: str,
    config: AdvUnlearnConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Edit:
    """Fine-tune the text encoder(s) of ``pipe`` to erase ``concept`` against a soft-token
    adversary; returns the Edit (text-encoder weight deltas, not applied).

    With ``checkpoint_dir``, state (the encoders' tensors, the soft tokens, both optimizers, the
    generator and the rollout pools) is saved every ``config.checkpoint_every`` iterations and a
    later call with the same folder, concept, model and config resumes from it.
    """
    adapter = adapter_for(pipe)
    config = config or AdvUnlearnConfig()
    prompt = config.prompt.format(concept=concept)
    params = _component_params(pipe, config.encoders)
    busy = sorted(attached_parameters(adapter) & set(params))
    if busy:
        raise ValueError(
            f"weight edits are applied to parameters AdvUnlearn would train ({busy[0]}, ...); remove them first"
        )
    encoders = list(trained_encoders(pipe, config.encoders).values())
    towers = [name for name, _, _ in text_towers(pipe)]
    words = placeholder_words(pipe, prompt, config.attack_tokens)
    adv_prompt = " ".join(words) + " " + prompt  # [BOS, soft tokens, c, EOS/padding]
    objects, retain_from = retain_objects(config, pipe, concept)
    retain_prompts = [config.retain_prompt.format(concept=o) for o in objects]

    cond, uncond = adapter.encode([prompt]), adapter.encode([config.uncond_prompt])  # tau0: before training
    retain_conds = [adapter.encode([p]) for p in retain_prompts]
    steps = config.rollout_steps or adapter.default_steps
    source = source_from_config(adapter, config, steps)
    retain_source = source_from_config(adapter, config, steps, name="retain")
    g = torch.Generator().manual_seed(config.seed)
    rows = random_rows(pipe, towers, config.attack_tokens, g)
    attacked = torch.zeros(())  # 1 once an attack has run: the soft tokens are in p_adv

    run = TrainingRun(
        pipe,
        NAME,
        WEIGHT_DELTA,
        concept,
        config,
        config.iterations,
        checkpoint_dir,
        progress,
        settings={"placeholders": words, "retain": retain_prompts},
    )
    pipe_modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    student = train_deltas(adapter, params)
    with frozen(*pipe_modules):
        try:
            opt = torch.optim.Adam(student.trainable(), lr=config.lr)
            saved = run.resume()
            if saved is not None:
                student.load_state(saved)
                rows = {n: saved[f"adv.{n}"].clone() for n in rows}
                attacked = saved["attacked"].clone()

            def state() -> dict[str, Tensor]:
                return student.state() | {f"adv.{n}": r for n, r in rows.items()} | {"attacked": attacked}

            for it in run.loop(params.values(), state, {"opt": opt}, g, [source, retain_source]):
                if it >= config.warmup and (it - config.warmup) % config.attack_every == 0:
                    init = (
                        rows if config.attack_init == "latest" else random_rows(pipe, towers, config.attack_tokens, g)
                    )
                    with run.phase("adversary"):
                        rows = attack(adapter, encoders, source, cond, uncond, adv_prompt, words, init, config, g)
                    attacked = torch.ones(())

                with run.phase("rollout"):
                    x_t, t = source.draw(cond, uncond, g)
                with run.phase("teacher"):
                    e_c, e_u = frozen_predictions(adapter, x_t, t, cond, uncond)
                    target = negative_guidance(e_c, e_u, config.eta, base="anchor")
                with run.phase("student"):
                    with with_soft_tokens(pipe, words, rows) if bool(attacked) else nullcontext():
                        student_cond = adapter.encode([adv_prompt if bool(attacked) else prompt], grad=True)
                    erase = prediction_loss(adapter.predict(x_t, t, student_cond), target)

                pick = torch.randperm(len(retain_prompts), generator=g)[: config.retain_batch].tolist()
                r0 = Conditioning.cat([retain_conds[i] for i in pick])
                with run.phase("rollout"):
                    x_r, t_r = retain_source.draw(r0, uncond, g)
                with run.phase("teacher"), torch.no_grad(), adapter.edits_disabled():
                    e_r0 = adapter.predict(x_r, t_r, r0)
                with run.phase("student"):
                    e_r = adapter.predict(x_r, t_r, adapter.encode([retain_prompts[i] for i in pick], grad=True))
                    retain = prediction_loss(e_r, e_r0)

                loss = erase + config.retain_weight * retain
                run.log(loss, loss=loss.item(), erase=erase.item(), retain=retain.item())
                with run.phase("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                with run.phase("optimizer"):
                    opt.step()
            deltas = student.deltas()
        finally:
            student.detach()

    tensors = {}
    for name, d in deltas.items():
        component, _, parameter = name.partition(":")
        tensors[delta_key(parameter, component)] = d
    return Edit.made_on(
        adapter,
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=[concept],
        tensors=tensors,
        hyperparameters=asdict(config)
        | {
            "rollout_steps": steps,
            "parameters": sum(p.numel() for p in params.values()),
            "trained_encoders": list(trained_encoders(pipe, config.encoders)),
            "placeholders": words,
            "retain_prompts": retain_prompts,
            "retain_from": retain_from,
            "eta_algorithms": config.guidance_eta(),
        },
        metrics=run.metrics(
            {"final_loss": run.last("loss"), "final_erase": run.last("erase"), "final_retain": run.last("retain")}
            | {"attacks": max(0, -(-(run.done - config.warmup) // config.attack_every))}
        ),
    )


def attack(
    adapter,
    encoders: list[nn.Module],
    source,
    cond: Conditioning,
    uncond: Conditioning,
    adv_prompt: str,
    words: list[str],
    init: dict[str, Tensor],
    config: AdvUnlearnConfig,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """The lower level: soft tokens (tower -> (k, D)) that bring the concept back on the CURRENT
    encoders, by ``config.attack_steps`` Adam steps on ``|| eps(x_t, tau'(p_adv)) - eps(x_t,
    tau0(c)) ||^2``, a fresh ``(x_t, t)`` from ``source`` per step. Only the soft tokens get
    gradients; the encoders and the denoiser are frozen throughout."""
    rows = {n: r.detach().clone().requires_grad_(True) for n, r in init.items()}
    opt = torch.optim.Adam(list(rows.values()), lr=config.attack_lr)
    summed = {n: torch.zeros_like(r) for n, r in rows.items()}
    with frozen(*encoders):
        for _ in range(config.attack_steps):
            x_t, t = source.draw(cond, uncond, generator)
            with torch.no_grad(), adapter.edits_disabled():
                e_c = adapter.predict(x_t, t, cond)
            with with_soft_tokens(adapter.pipe, words, rows):
                adv = adapter.encode([adv_prompt], grad=True)
            loss = prediction_loss(adapter.predict(x_t, t, adv), e_c)
            grads = torch.autograd.grad(loss, list(rows.values()))
            for (n, r), grad in zip(rows.items(), grads):
                if config.attack_accumulate_grad:
                    summed[n] += grad
                    grad = summed[n]
                r.grad = grad.sign() if config.attack_method == "fast_at" else grad
            opt.step()
    return {n: r.detach() for n, r in rows.items()}


register_method(
    NAME,
    AdvUnlearnConfig,
    PRESETS,
    fit,
    trainable_parameters=trainable_parameters,
    iterations=iterations,
)

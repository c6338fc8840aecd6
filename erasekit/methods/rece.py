"""RECE (Gong et al., ECCV 2024): UCE's closed-form edit, then rounds that find, in closed form, the
text embedding that still regenerates the concept on the edited model and erase it too. Spec:
shared design METHODS2.md, section "RECE" (release CharlesGong12/RECE @ 403a67f; ``file:line``
below cites it).

The edited weights are those UCE edits (:mod:`.uce`): every text_proj attachment point with role
"k" or "v" (SD: attn2.to_k / to_v; Flux, an **extension** with no counterpart in the paper: the
dual-stream add_k_proj / add_v_proj, the spec's optional Flux target; its other one, the
context_embedder in T5's space, is not offered). W0 is a point's weight before the edit, W its
current one.

1. **Start: UCE** (erase_methods/train_uce.py:90-167, 186-293). Every concept prompt's rows from
   its last token to the end of the padded sequence map onto the guide's aligned rows (UCE's
   ``token_span="to-end"`` alignment); the retained prompts keep theirs::

       W1 = (l0 W0 + e0 W0 sum g c^T + p0 W0 sum r r^T) (l0 I + e0 sum c c^T + p0 sum r r^T)^-1

   with ``start_lamb`` l0 = 0.5, ``start_erase_scale`` e0 = 1 and ``start_preserve_scale`` p0 =
   max(0.1, 1 / number of retained prompts) (the release's rule; 1.0 with its retain list [""]).
2. **Round, step A: the embedding that still works** (utils/embedding_calculation/
   close_form_emb.py:132-222, ``close_regzero``). For the concept prompt's rows c_j::

       c'_j = argmin_x sum_l ||W_l x - W0_l c_j||^2 + regular_scale ||x||^2
            = (sum_l W_l^T W_l + regular_scale I)^-1 (sum_l W_l^T W0_l) c_j

   l over every edited matrix that reads the same input (SD: all of them, one solve in the text
   encoder's space; Flux: the k and v projections of one block, one solve per block in that
   block's text-stream space). c' makes the edited model produce the original model's keys and
   values for the concept; ``regular_scale`` pulls it towards 0 (a small c' does less collateral
   damage when it is erased).
3. **Round, step B: erase c'** (erase_methods/uce.py:9-111, ``edit_model_adversarial``)::

       W' = (lamb W + erase_scale sum_j W g_j c'_j^T + preserve_scale sum_r sum_j W r_j r_j^T)
            (lamb I + erase_scale sum_j c'_j c'_j^T + preserve_scale sum_r sum_j r_j r_j^T)^-1

   targets and retained values from the CURRENT W (the round keeps the edited behaviour). Rows
   (``adv_span``): "all" (the release) every position of the padded sequence, start and padding
   included, c'_j mapped onto the guide's row j; "to-end" the rows UCE's start used.
   Several concepts: each round derives c' for all of them with the weights at the round's start,
   then makes one edit with all of them (train.py:228-260).

Defaults (the ``paper`` preset) are the release's for nudity: ``rounds`` 3, ``regular_scale`` 0.1
(README "Notes"), ``lamb`` 0.1, ``preserve_scale`` 0.1, ``erase_scale`` 1 (train.py:43-58; README
"lambda_1 = 0.1 and lambda_2 = 0.1"), guide " " (the empty prompt: CLIP's tokenizer drops the
space) and retain [""] (``preserve_empty``) for the start and the rounds (train_uce.py and
uce.py as above; the start's 1.0 preserve weight is in the checkpoint names of
scripts/nudity.sh, "...-method_replace-1-1.0.pt"). The release's
other recipes: unsafe (I2P categories) 0.1 for 2 rounds; artists and the objects UCE fails on
(church, garbage truck) 1e-3 for 1 round; objects UCE erases easily (English springer, golf ball,
parachute) 1e-1 for 1 round; objects UCE already erases are not edited; artists use
guide "art" and retain "" + the other artists, start_preserve_scale 0.1 (scripts/art.sh). The
``fast`` preset, for the toy world's objects (which UCE's bare-word edit does not erase): the
release's recipe for objects UCE fails on, 1 round at regular_scale 1e-3.

Not copied from the release: ``--preserve_concepts`` given as a string is iterated by
characters there (train.py:158); here ``preserve`` is a ";"-separated list of prompts. The
release keeps only the rounds that lower a validation nudity rate (train.py:185-275) or object
accuracy, the latter against a reference read from one hard-coded class folder for every class
(train_object.py:269); here the number of rounds is fixed and nothing is selected on test data.

Inputs. c is the INPUT of the projection at a row: for SD the text encoder's output (the
release's c); for Flux the block's text stream, recorded during denoiser passes on the prompts
and averaged, as second moments, over ``samples`` random (noise, timestep) draws, as UCE does.
Inputs are recorded once, on the unedited projections (for Flux the later blocks' inputs move
when earlier blocks are edited; UCE makes the same approximation). Points that read the same
input form one group (found by comparing the inputs, never by the family). All sums are kept as
d x d second moments (sum c c^T, sum g c^T, sum r r^T), so a round costs a few d x d solves.

The Edit stores W_final - W0, the change from the ORIGINAL weights (a weight-delta edit, see
:mod:`erasekit.edits.weight_delta`: it merges and exports as UCE's does). Its metrics hold, per
round: the RMS norm of the derived rows c' and of the concept's rows c, the regeneration
residual sum_l ||W_l c' - W0_l c||^2 per row (the best regeneration the edited model allows;
also for x = c), the relative residual of the round's normal equations, and the seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..edits import Edit
from ..edits.weight_delta import NAME as WEIGHT_DELTA
from ..edits.weight_delta import PREFIX
from ..models import adapter_for, base_linear, plain_parameter_names
from . import split_concepts, split_list
from .config import MethodConfig, setting
from .registry import register_method
from .uce import TEMPLATE_SETS, _last_token, _spans, trainable_parameters

NAME = "rece"
ADV_SPANS = ("all", "to-end")


@dataclass
class RECEConfig(MethodConfig):
    """Hyper-parameters; the defaults are the release's for nudity (train.py:43-58, README "Notes",
    erase_methods/train_uce.py, scripts/nudity.sh)."""

    guide: str = setting("", "the concept the erased ones are mapped to (empty: nothing; the release's ' ')")
    preserve: str = setting("", "prompts whose projections are kept (retain list)", sep=";")
    preserve_empty: bool = setting(True, "also keep the empty prompt's projections (the release's retain list)")
    templates: str = setting("{concept}", "erased prompts (the release: the bare word)", sep=";", template=True)
    template_set: str = setting(
        "none",
        "our extension: a named set of erased prompts added to templates (as uce's); objects: 'an image of a "
        "{concept}', ...",
        choices=tuple(TEMPLATE_SETS),
    )
    rounds: int = setting(
        3, "rounds of derive-and-erase after the UCE start (the release's epochs; 0: the UCE start alone)", low=0
    )
    regular_scale: float = setting(
        0.1, "lambda_r: ridge weight pulling the derived embedding towards 0 (step A)", above=0
    )
    adv_span: str = setting(
        "all",
        "rows a round derives and erases: all (every position, start and padding included: the release) or "
        "to-end (from the concept's last token, as the UCE start)",
        choices=ADV_SPANS,
    )
    lamb: float = setting(0.1, "weight keeping each round's W' near the current W (> 0)", above=0)
    erase_scale: float = setting(1.0, "weight of a round's erase terms", low=0)
    preserve_scale: float = setting(0.1, "weight of a round's preserve terms", low=0)
    start_lamb: float = setting(0.5, "the UCE start's lambda (> 0)", above=0)
    start_erase_scale: float = setting(1.0, "the UCE start's erase weight", low=0)
    start_preserve_scale: float | None = setting(
        None, "the UCE start's preserve weight; none: max(0.1, 1 / number of retained prompts), the release's", low=0
    )
    samples: int = setting(4, "(noise, timestep) draws for inputs that depend on them (Flux)", low=1)
    seed: int = setting(0, "seed of those draws", low=0)

    @classmethod
    def fast(cls, **overrides) -> RECEConfig:
        """The toy-world preset: the release's recipe for objects UCE does not erase (README
        "Notes": church, garbage truck): one round at regular_scale 1e-3."""
        return cls(**({"rounds": 1, "regular_scale": 1e-3} | overrides))


# ---- the closed forms ------------------------------------------------------------------------


def relative_residual(lhs: Tensor, rhs: Tensor) -> float:
    """||lhs - rhs|| / ||rhs|| (0 when both vanish)."""
    scale = float(rhs.norm())
    return float((lhs - rhs).norm()) / scale if scale > 0 else float(lhs.norm())


def regeneration_map(current: list[Tensor], base: list[Tensor], regular_scale: float) -> tuple[Tensor, float]:
    """Step A. (M, residual): c' = M c minimises sum_l ||W_l x - W0_l c||^2 + regular_scale ||x||^2,
    i.e. (sum_l W_l^T W_l + regular_scale I) M = sum_l W_l^T W0_l; ``residual`` is that normal
    equation's relative residual. ``current`` / ``base``: the W_l / W0_l reading one input."""
    eye = torch.eye(current[0].shape[1], dtype=current[0].dtype, device=current[0].device)
    gram = sum(w.T @ w for w in current) + regular_scale * eye
    cross = sum(w.T @ w0 for w, w0 in zip(current, base))
    m = torch.linalg.solve(gram, cross)
    return m, relative_residual(gram @ m, cross)


def closed_form(
    w: Tensor,
    lamb: float,
    erase_scale: float,
    erase_moment: Tensor,
    guide_moment: Tensor,
    preserve_scale: float,
    preserve_moment: Tensor,
) -> tuple[Tensor, float]:
    """UCE's solve. (W', residual): W' minimises
    lamb ||W' - W||^2 + erase_scale sum ||W' c - W g||^2 + preserve_scale sum ||W' r - W r||^2, given
    ``erase_moment`` = sum c c^T, ``guide_moment`` = sum g c^T, ``preserve_moment`` = sum r r^T:
    W' (lamb I + s_e sum c c^T + s_p sum r r^T) = lamb W + s_e W sum g c^T + s_p W sum r r^T.
    ``residual``: that normal equation's relative residual."""
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    lhs = lamb * w + erase_scale * (w @ guide_moment) + preserve_scale * (w @ preserve_moment)
    rhs = lamb * eye + erase_scale * erase_moment + preserve_scale * preserve_moment
    new = torch.linalg.solve(rhs, lhs.T).T  # lhs @ rhs^-1 (rhs is symmetric)
    return new, relative_residual(new @ rhs, lhs)


# ---- the inputs ------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Rows of the prompts' batch: (prompt index, position) pairs, as index tensors."""

    prompts: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def add(self, prompt: int, positions) -> None:
        positions = list(positions)
        self.prompts += [prompt] * len(positions)
        self.positions += positions

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, x: Tensor) -> Tensor:
        return x[torch.tensor(self.prompts, dtype=torch.long), torch.tensor(self.positions, dtype=torch.long)]


def _record_moments(
    adapter, points, prompts: list[str], pairs: dict[str, tuple[_Rows, _Rows]], samples: int, seed: int
) -> tuple[list[list], list[dict[str, Tensor]]]:
    """(groups, moments): ``groups`` the points grouped by the input they read, ``moments[g]``
    name -> sum over rows of b a^T (float64, averaged over the draws) for every ``pairs[name] =
    (a rows, b rows)``, from the inputs of group g's Linears during denoiser passes on the prompts."""
    cond = adapter.encode(prompts)
    n = len(prompts)
    g = torch.Generator().manual_seed(seed)
    group_of: dict[str, int] = {}
    sums: list[dict[str, Tensor]] = []
    seen: list[Tensor] = []  # this pass's distinct inputs, by group
    first = [True]

    def moments(x: Tensor) -> dict[str, Tensor]:
        x = x.detach().double()
        out = {}
        for name, (a, b) in pairs.items():
            rows_a = a.take(x)
            rows_b = rows_a if b is a else b.take(x)
            out[name] = rows_b.T @ rows_a
        return out

    def grab(_module, args, name):
        x = args[0]
        same = (i for i, ref in enumerate(seen) if ref is x or (ref.shape == x.shape and torch.equal(ref, x)))
        gid = next(same, None)
        if gid is None:
            gid = len(seen)
            if not first[0] and gid >= len(sums):
                raise RuntimeError(f"the text projections read more distinct inputs than in the first draw ({name})")
            seen.append(x)
            m = moments(x)
            if first[0]:
                sums.append(m)
            else:
                for key, value in m.items():
                    sums[gid][key] += value
        if first[0]:
            group_of[name] = gid
        elif group_of.get(name) != gid:
            raise RuntimeError(f"the text projections shared their inputs differently between draws ({name})")

    handles = [
        point.module.register_forward_pre_hook(lambda m, a, name=point.name: grab(m, a, name)) for point in points
    ]
    try:
        with torch.no_grad():
            for _ in range(samples):
                seen.clear()
                x = adapter.sample_noise(1, generator=g)
                t = adapter.sample_timesteps(1, generator=g)
                adapter.predict(x.expand(n, *x.shape[1:]), t.expand(n), cond)
                first[0] = False
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    missing = [p.name for p in points if p.name not in group_of]
    if missing:
        raise RuntimeError(f"the denoiser pass never called the text projections {missing}")
    groups = [[p for p in points if group_of[p.name] == gid] for gid in range(len(sums))]
    return groups, [{k: v / samples for k, v in s.items()} for s in sums]


# ---- fit -------------------------------------------------------------------------------------


def fit(pipe, concept: str, config: RECEConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Compute the RECE edit erasing ``concept`` (several: "a, b" or "a; b", as uce's). Returns the
    Edit (weight deltas from the original weights, not applied). ``checkpoint_dir`` is accepted
    for the common interface and unused (closed forms, no training loop); ``progress`` shows the
    rounds."""
    config = config or RECEConfig()
    adapter = adapter_for(pipe)
    t0 = time.time()
    concepts = split_concepts(concept)
    if not concepts:
        raise ValueError("no concept to erase")
    templates = split_list(config.templates, ";") or ["{concept}"]
    templates += [t for t in TEMPLATE_SETS[config.template_set] if t not in templates]
    erase = [(tpl.format(concept=c), c) for c in concepts for tpl in templates]
    retain = split_list(config.preserve, ";") + ([""] if config.preserve_empty else [])
    prompts = [p for p, _ in erase] + [config.guide] + retain
    last = [_last_token(adapter, p, c) for p, c in erase]  # ValueError if the concept is absent
    guide_row, guide_start = len(erase), _last_token(adapter, config.guide, config.guide)
    retain_last = [_last_token(adapter, p, p) for p in retain]
    length = adapter.encode([""]).embeds.shape[1]

    # Rows of every moment: the start's (UCE, to-end), then each concept's and the retain list's
    # for the rounds (adv_span).
    start_e, start_g, start_p, round_p = _Rows(), _Rows(), _Rows(), _Rows()
    round_e = {c: (_Rows(), _Rows()) for c in concepts}
    for i, ((_, c), (a, b)) in enumerate(zip(erase, _spans(last, guide_start, length))):
        start_e.add(i, range(a, b))
        start_g.add(guide_row, range(guide_start, guide_start + b - a))
        if config.adv_span == "all":
            round_e[c][0].add(i, range(length))
            round_e[c][1].add(guide_row, range(length))
        else:
            round_e[c][0].add(i, range(a, b))
            round_e[c][1].add(guide_row, range(guide_start, guide_start + b - a))
    for k, p in enumerate(retain_last, guide_row + 1):
        start_p.add(k, range(p, length))
        round_p.add(k, range(length) if config.adv_span == "all" else range(p, length))
    pairs = {"start_e": (start_e, start_e), "start_g": (start_e, start_g), "start_p": (start_p, start_p)}
    pairs["round_p"] = (round_p, round_p)
    for j, c in enumerate(concepts):
        pairs[f"e{j}"] = (round_e[c][0], round_e[c][0])
        pairs[f"g{j}"] = (round_e[c][0], round_e[c][1])
    pairs = {k: v for k, v in pairs.items() if len(v[0])}  # no retained prompt: no preserve rows

    points = [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]
    groups, moments = _record_moments(adapter, points, prompts, pairs, max(1, config.samples), config.seed)
    record_seconds = time.time() - t0

    base = {p.name: base_linear(p.module).weight.detach().double() for p in points}
    d_of = {p.name: base[p.name].shape[1] for p in points}

    def moment(gid: int, key: str, d: int, like: Tensor) -> Tensor:
        return moments[gid].get(key, torch.zeros(d, d, dtype=torch.float64)).to(like.device)

    # 1. The UCE start.
    t1 = time.time()
    start_ps = config.start_preserve_scale
    if start_ps is None:
        start_ps = max(0.1, 1 / len(retain)) if retain else 0.0
    current, start_residual = {}, 0.0
    for gid, group in enumerate(groups):
        for p in group:
            w0, d = base[p.name], d_of[p.name]
            e, gd, pr = (moment(gid, k, d, w0) for k in ("start_e", "start_g", "start_p"))
            current[p.name], res = closed_form(w0, config.start_lamb, config.start_erase_scale, e, gd, start_ps, pr)
            start_residual = max(start_residual, res)
    start = {"seconds": round(time.time() - t1 + record_seconds, 3), "normal_residual": start_residual}

    # 2. Rounds: derive c' on the current weights, erase it.
    rounds = []
    bar = tqdm(range(config.rounds), desc="rece", disable=not progress, leave=False)
    for r in bar:
        t2 = time.time()
        updated, map_res, solve_res = {}, 0.0, 0.0
        n_rows = sum(len(round_e[c][0]) for c in concepts) * len(groups)
        adv_sq = concept_sq = regen = regen_c = 0.0
        for gid, group in enumerate(groups):
            ws, w0s = [current[p.name] for p in group], [base[p.name] for p in group]
            m, res = regeneration_map(ws, w0s, config.regular_scale)
            map_res = max(map_res, res)
            d = m.shape[0]
            e = sum(moment(gid, f"e{j}", d, m) for j in range(len(concepts)))
            gd = sum(moment(gid, f"g{j}", d, m) for j in range(len(concepts)))
            pr = moment(gid, "round_p", d, m)
            adv_e, adv_g = m @ e @ m.T, gd @ m.T  # sum c' c'^T, sum g c'^T
            adv_sq += float(adv_e.trace())
            concept_sq += float(e.trace())
            gram = sum(w.T @ w for w in ws)
            cross = sum(w.T @ w0 for w, w0 in zip(ws, w0s))
            base_gram = sum(w0.T @ w0 for w0 in w0s)
            # sum_l ||W_l c' - W0_l c||^2 and sum_l ||W_l c - W0_l c||^2, from the moments.
            regen += float((m.T @ gram @ m @ e).trace() - 2 * (cross.T @ m @ e).trace() + (base_gram @ e).trace())
            regen_c += float(((gram - 2 * cross + base_gram) @ e).trace())
            for p, w in zip(group, ws):
                updated[p.name], res = closed_form(
                    w, config.lamb, config.erase_scale, adv_e, adv_g, config.preserve_scale, pr
                )
                solve_res = max(solve_res, res)
        current = updated
        rounds.append(
            {
                "round": r + 1,
                "embedding_norm": math.sqrt(max(adv_sq, 0.0) / max(n_rows, 1)),
                "concept_norm": math.sqrt(max(concept_sq, 0.0) / max(n_rows, 1)),
                "regeneration_residual": max(regen, 0.0) / max(n_rows, 1),
                "concept_residual": max(regen_c, 0.0) / max(n_rows, 1),
                "normal_residual": max(map_res, solve_res),
                "seconds": round(time.time() - t2, 3),
            }
        )
    bar.close()

    param_names = plain_parameter_names(adapter.denoiser)
    tensors = {}
    for p in points:
        weight = base_linear(p.module).weight
        tensors[PREFIX + param_names[id(weight)]] = (current[p.name] - base[p.name]).to(weight.dtype).cpu()

    return Edit.made_on(
        adapter,
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=concepts,
        tensors=tensors,
        hyperparameters=asdict(config)
        | {
            "erase_prompts": [p for p, _ in erase],
            "retain_prompts": retain,
            "token_positions": last,
            "start_preserve_scale_used": start_ps,
            "input_groups": len(groups),
        },
        metrics={"train_seconds": round(time.time() - t0, 2), "start": start, "rounds": rounds},
    )


PRESETS = {"paper": RECEConfig, "fast": RECEConfig.fast}
register_method(NAME, RECEConfig, PRESETS, fit, trainable_parameters=trainable_parameters)

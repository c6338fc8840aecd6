"""UCE (Gandikota et al., WACV 2024): closed-form edit of the projections that make attention
keys and values from the text. Spec: shared design ALGORITHMS.md, section Baselines.

For every text_proj attachment point with role "k" or "v" (SD: attn2.to_k / to_v; Flux: the
dual-stream add_k_proj / add_v_proj), with W its weight::

    W' = (sum_e v_e c_e^T + sum_p W c_p c_p^T + lamb W) (sum_e c_e c_e^T + sum_p c_p c_p^T + lamb I)^-1,
    v_e = W c_guide(e)

(erase terms weighted by ``erase_scale``, preserve terms by ``preserve_scale``, as in the
release). Which tokens a prompt contributes is ``token_span``:

- ``"last"`` (default; the current release, uce_sd_erase.py): ONE token, the last token of the
  concept (erased prompts: the concept inside the template; guide and preserved concepts: the
  prompt's last token; the empty guide: position 0, i.e. CLIP's BOS as in the release, T5's
  first token).
- ``"to-end"`` (the original release, train-scripts/train_erase.py): every position from that
  token to the end of the padded sequence (end-of-text and padding included); the guide's rows
  are aligned from its own start position and both spans are cut to the same length, as the
  original release does. Preserved prompts contribute their own last-token-to-end spans.

Erased prompts: ``templates`` (default the bare "{concept}", the release's), plus the named set
``template_set``: "objects" (our extension) adds :data:`OBJECT_TEMPLATES`, so the concept's
tokens are also fitted in the context a prompt gives them. With the bare word alone the edit
sees the concept's token right after the start token only, and on the toy pipelines it erased
nothing (Acc_E 100). Several concepts: ``concept`` may hold several, separated by "," (or ";":
see :func:`erasekit.methods.split_concepts`).

c is the INPUT of the projection at that token. For SD that input is the text encoder's output
itself (the release's c). For Flux the dual-stream projections read the block's text stream
(after earlier blocks and the timestep-modulated norm), not T5's output (whose width differs on
FLUX.1): the inputs are recorded during denoiser passes on the prompts, and their outer-product
sums are averaged over ``samples`` random (noise, timestep) draws; for SD every draw gives the
same inputs. All inputs are recorded on the unedited projections. Projection biases are left
alone and v_e excludes them (the release's ``module(emb)`` adds the bias to the target of a
weight-only solve). The Edit stores the weight deltas W' - W: a weight-delta edit, see
:mod:`erasekit.edits.weight_delta`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..edits import Edit
from ..edits.weight_delta import NAME as WEIGHT_DELTA
from ..edits.weight_delta import PREFIX, export_merged  # noqa: F401 (re-exported)
from ..models import FamilyAdapter, adapter_for, base_linear, plain_parameter_names
from . import split_concepts, split_list
from .config import MethodConfig, setting
from .registry import register_method

NAME = "uce"
TOKEN_SPANS = ("last", "to-end")
# template_set "objects": erased prompts that give the concept's tokens context (the release's
# object prompts "image of {concept}", ... with articles, in words the toy tokenizers know).
OBJECT_TEMPLATES = ("an image of a {concept}", "a photo of a {concept}", "a picture of a {concept}", "a {concept}")
TEMPLATE_SETS = {"none": (), "objects": OBJECT_TEMPLATES}


@dataclass
class UCEConfig(MethodConfig):
    """Hyper-parameters; the defaults are the authors' release (uce_sd_erase.py)."""

    guide: str = setting("", "the concept the erased ones are mapped to (empty: nothing)")
    preserve: str = setting("", "concepts to keep", sep=";")
    # The release's expand_prompts adds e.g. "photo of {concept}".
    templates: str = setting("{concept}", "erased prompts", sep=";", template=True)
    template_set: str = setting(
        "none",
        "our extension: a named set of erased prompts added to templates; objects: 'an image of a {concept}', ...",
        choices=tuple(TEMPLATE_SETS),
    )
    token_span: str = setting(
        "last",
        "tokens each prompt contributes: last (the concept's last token, current release) or to-end (from it to "
        "the end of the padded sequence, the original release)",
        choices=TOKEN_SPANS,
    )
    erase_scale: float = setting(1.0, "weight of the erase terms", low=0)
    preserve_scale: float = setting(1.0, "weight of the preserve terms", low=0)
    lamb: float = setting(0.5, "regulariser lambda that keeps W' near W (> 0: the solve stays invertible)", above=0)
    samples: int = setting(4, "(noise, timestep) draws for inputs that depend on them (Flux)", low=1)
    seed: int = setting(0, "seed of those draws", low=0)

    @classmethod
    def fast(cls, **overrides) -> UCEConfig:
        """The toy-world preset: UCE is already fast; the same settings."""
        return cls(**overrides)


def _last_token(adapter, prompt: str, phrase: str) -> int:
    """Position of the last token of ``phrase`` in ``prompt``; 0 for the empty prompt."""
    if not prompt.strip():
        return 0
    return adapter.token_indices(prompt, phrase)[-1]


def _spans(starts: list[int], guide_start: int, length: int) -> list[tuple[int, int]]:
    """For ``token_span="to-end"``: (start, stop) of each erased prompt's span, aligned with the
    guide's span from ``guide_start`` as the original release aligns them: both run to the end of
    the sequence, cut to the same length ``length - max(start, guide_start)``."""
    return [(p, length - max(0, max(p, guide_start) - p)) for p in starts]


def _record_inputs(
    adapter, points, prompts: list[str], rows: list[int], positions: list[int], samples: int, seed: int
) -> dict[str, list[torch.Tensor]]:
    """point name -> one (len(rows), in_features) float64 tensor per sample: the inputs of the
    point's Linear at prompt ``rows[i]``'s position ``positions[i]``, during a denoiser pass on
    the prompts."""
    cond = adapter.encode(prompts)
    n = len(prompts)
    rows = torch.tensor(rows)
    pos = torch.tensor(positions)
    g = torch.Generator().manual_seed(seed)
    records: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
    handles = []
    for point in points:

        def grab(_module, args, name=point.name):
            records[name].append(args[0][rows, pos].detach().double())

        handles.append(point.module.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            for _ in range(samples):
                x = adapter.sample_noise(1, generator=g)
                t = adapter.sample_timesteps(1, generator=g)
                adapter.predict(x.expand(n, *x.shape[1:]), t.expand(n), cond)
    finally:
        for h in handles:
            h.remove()
    return records


def erase_templates(config: UCEConfig) -> list[str]:
    """The templates ``config.template_set`` adds to ``config.templates``."""
    return list(TEMPLATE_SETS[config.template_set])


def trainable_parameters(model, config: UCEConfig) -> int:
    """Parameters UCE rewrites on ``model`` (a pipeline or an adapter, a meta-device one
    included): the weights of the text-reading key and value projections."""
    adapter = model if isinstance(model, FamilyAdapter) else adapter_for(model)
    return sum(p.module.weight.numel() for p in adapter.attachment_points("text_proj") if p.role in ("k", "v"))


def fit(pipe, concept: str, config: UCEConfig | None = None, checkpoint_dir=None, progress: bool = True) -> Edit:
    """Compute the closed-form UCE edit erasing ``concept`` (several: "a, b" or "a; b").
    Returns the Edit (weight deltas, not applied). ``checkpoint_dir`` and ``progress`` are
    accepted for the common interface and unused (there is no training loop)."""
    config = config or UCEConfig()
    adapter = adapter_for(pipe)
    t0 = time.time()
    concepts = split_concepts(concept)
    if not concepts:
        raise ValueError("no concept to erase")
    templates = split_list(config.templates, ";") or ["{concept}"]
    templates += [t for t in erase_templates(config) if t not in templates]
    erase = [(tpl.format(concept=c), c) for c in concepts for tpl in templates]
    preserve = split_list(config.preserve, ";")
    prompts = [p for p, _ in erase] + [config.guide] + preserve
    positions = [_last_token(adapter, p, c) for p, c in erase]  # ValueError if absent
    positions += [_last_token(adapter, config.guide, config.guide)] + [_last_token(adapter, p, p) for p in preserve]
    points = [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]
    guide_row = len(erase)
    if config.token_span == "last":  # one token per prompt, one guide row for every erased one
        rows, cols = list(range(len(prompts))), positions
        n_e, n_g = len(erase), 1
    else:
        length = adapter.encode([""]).embeds.shape[1]
        guide_start = positions[guide_row]
        spans = _spans(positions[:guide_row], guide_start, length)
        rows = [i for i, (a, b) in enumerate(spans) for _ in range(a, b)]
        cols = [j for a, b in spans for j in range(a, b)]
        n_e = len(rows)
        rows += [guide_row] * n_e  # the guide's aligned positions, one per erased row
        cols += [guide_start + (j - a) for a, b in spans for j in range(a, b)]
        n_g = n_e
        for k, p in enumerate(positions[guide_row + 1 :], guide_row + 1):
            rows += [k] * (length - p)
            cols += list(range(p, length))
    records = _record_inputs(adapter, points, prompts, rows, cols, max(1, config.samples), config.seed)

    param_names = plain_parameter_names(adapter.denoiser)
    tensors = {}
    for point in points:
        base = base_linear(point.module)
        w = base.weight.detach().double()
        eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
        lhs, rhs = config.lamb * w, config.lamb * eye  # W' rhs = lhs
        for inputs in records[point.name]:
            c_e, c_g, c_p = inputs[:n_e], inputs[n_e : n_e + n_g], inputs[n_e + n_g :]
            v_e = F.linear(c_g, w)  # W c_guide, no bias
            v_e = v_e.expand(n_e, -1) if n_g == 1 else v_e
            v_p = F.linear(c_p, w)
            k = len(records[point.name])
            lhs = lhs + (config.erase_scale * v_e.T @ c_e + config.preserve_scale * v_p.T @ c_p) / k
            rhs = rhs + (config.erase_scale * c_e.T @ c_e + config.preserve_scale * c_p.T @ c_p) / k
        new = torch.linalg.solve(rhs, lhs.T).T  # lhs @ rhs^-1 (rhs is symmetric)
        tensors[PREFIX + param_names[id(base.weight)]] = (new - w).to(base.weight.dtype).cpu()

    return Edit.made_on(
        adapter,
        kind=WEIGHT_DELTA,
        method=NAME,
        concepts=concepts,
        tensors=tensors,
        hyperparameters=asdict(config)
        | {"erase_prompts": [p for p, _ in erase], "token_positions": positions, "token_rows": n_e},
        metrics={"train_seconds": round(time.time() - t0, 2)},
    )


PRESETS = {"paper": UCEConfig, "fast": UCEConfig.fast}
register_method(NAME, UCEConfig, PRESETS, fit, trainable_parameters=trainable_parameters)

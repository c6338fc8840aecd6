"""Distil an output-adapter edit (Receler's erasers) into a LoRA that stock tools load.

An eraser adds ``E(h)`` to an attention output ``h``; a LoRA adds ``B A x`` to a Linear's output.
Per attachment point, the Linear that carries the LoRA and its input ``x`` are:

- cross / joint attention (SD ``attn2``, Flux dual-stream ``attn``): the output projection
  ``to_out.0``, whose output is ``h`` (dropout is the identity at inference); target ``E(h)``;
- Flux single-stream attention (no output projection of its own): the block's ``proj_out``,
  which reads ``[h, mlp]``; the LoRA reads the ``h`` columns only, target ``E(h)`` on the image
  tokens and 0 on the text tokens, and its up-projection is ``proj_out``'s ``h`` columns times
  the fitted map (so ``proj_out([h + E(h), mlp]) = proj_out([h, mlp]) + W_h E(h)``).

The data are the edited model's own forwards while it generates ``prompts`` (the concept's) and
``other_prompts`` (what must stay as it was, the empty prompt included: the unconditional branch
sees the erasers too), every denoising step and both guidance branches. For each carrier the
fit is a reduced-rank ridge regression on accumulated second moments (float64, no sample kept):

    W_ols = S_yx (S_xx + lam I)^-1,   C = W_ols S_xx W_ols^T,   U_r = top-r eigenvectors of C,
    B = U_r (out, r),  A = U_r^T W_ols (r, in)

which is the rank-r map closest to the targets over the recorded inputs (Izenman 1975). The
result is an ordinary LoRA edit (diffusers layout, alpha folded into B). A linear map cannot
reproduce the erasers' GELU and biases exactly: :func:`distil_to_lora` reports the fit's
relative residual per carrier, and the suite's figures before and after tell what it costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from ..edits import Edit
from ..edits.kind import kind_of
from ..edits.lora import NAME as LORA
from ..edits.lora import attach_lora, init_lora, lora_prefix, lora_shapes, lora_targets
from ..edits.output_adapter import NAME as OUTPUT_ADAPTER
from ..edits.output_adapter import attach_modules, erasers_from_tensors, points
from ..models import AttachmentPoint, Conditioning, adapter_for, frozen

DISTILL_TEMPLATES = ("an image of a {}", "a photo of a {}", "a picture of a {}", "{}")


@dataclass
class _Moments:
    """Running sums over recorded rows: S_xx = sum x x^T (in, in), S_yx = sum y x^T (out, in),
    sum ||y||^2, and the row count; float64."""

    width_in: int
    width_out: int
    xx: Tensor = field(init=False)
    yx: Tensor = field(init=False)
    yy: float = 0.0
    rows: int = 0

    def __post_init__(self):
        self.xx = torch.zeros(self.width_in, self.width_in, dtype=torch.float64)
        self.yx = torch.zeros(self.width_out, self.width_in, dtype=torch.float64)

    def add(self, x: Tensor, y: Tensor) -> None:
        """x (..., in), y (..., out): one row per leading index."""
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        y = y.detach().reshape(-1, y.shape[-1]).double().cpu()
        self.xx += x.T @ x
        self.yx += y.T @ x
        self.yy += float((y * y).sum())
        self.rows += x.shape[0]


def reduced_rank_fit(m: _Moments, rank: int, ridge: float = 1e-6) -> tuple[Tensor, Tensor, float]:
    """(A (r, in), B (out, r), relative residual) of the rank-``rank`` linear map y ~ B A x that
    fits the moments best; ``ridge`` is relative to the mean diagonal of S_xx. The residual is
    ||Y - B A X|| / ||Y|| over the recorded rows (0 when every target was 0)."""
    lam = ridge * float(m.xx.diagonal().mean().clamp(min=1e-12))
    w = torch.linalg.solve(m.xx + lam * torch.eye(m.width_in, dtype=torch.float64), m.yx.T).T  # (out, in)
    c = w @ m.xx @ w.T
    _, vectors = torch.linalg.eigh((c + c.T) / 2)
    r = max(1, min(rank, m.width_in, m.width_out))
    u = vectors[:, -r:].flip(-1)  # (out, r), largest first
    a = u.T @ w
    fitted = u @ a
    # ||Y - F X||^2 = sum y^2 - 2 tr(F S_xy) + tr(F S_xx F^T)
    residual = m.yy - 2 * float((fitted * m.yx).sum()) + float((fitted @ m.xx * fitted).sum())
    rel = (max(residual, 0.0) / m.yy) ** 0.5 if m.yy > 0 else 0.0
    return a, u, rel


class _RecordingEraser(nn.Module):
    """Returns ``E(h)`` as the eraser does and keeps ``h`` (pre-eraser) and ``E(h)`` of the last call."""

    def __init__(self, eraser: nn.Module):
        super().__init__()
        self.eraser = eraser
        self.seen: tuple[Tensor, Tensor] | None = None

    def forward(self, h: Tensor) -> Tensor:
        out = self.eraser(h)
        self.seen = (h, out)
        return out


def _carrier(adapter, point_name: str) -> tuple[str, nn.Linear, bool]:
    """(module name, Linear, single-stream?) of the Linear that carries the LoRA for a point."""
    den = adapter.denoiser
    if point_name.startswith("single_transformer_blocks."):
        block = point_name.rsplit(".", 1)[0]
        return f"{block}.proj_out", den.get_submodule(f"{block}.proj_out"), True
    return f"{point_name}.to_out.0", den.get_submodule(f"{point_name}.to_out.0"), False


def _distilled(edit: Edit, tensors: dict[str, Tensor], residual: float, **settings) -> Edit:
    """The LoRA edit ``<method>-distilled`` made of ``tensors`` from ``edit``: its hyper-parameters
    with ``distilled_from`` and the distillation's ``settings``, its metrics with the residual."""
    return Edit(
        kind=LORA,
        method=f"{edit.method}-distilled",
        concepts=list(edit.concepts),
        family=edit.family,
        base_model=edit.base_model,
        tensors=tensors,
        hyperparameters=dict(edit.hyperparameters) | {"distilled_from": edit.id} | settings,
        metrics=dict(edit.metrics) | {"distill_relative_residual": residual},
    )


def _erasers(adapter, edit: Edit, rank: int) -> dict[str, nn.Module]:
    """The erasers of an output-adapter ``edit`` for ``adapter``'s model; ValueError for another
    kind or family, a rank below 1, or erasers at points the model lacks."""
    if kind_of(edit).name != OUTPUT_ADAPTER:
        raise ValueError(f"only output-adapter edits are distilled; edit {edit.id} ({edit.method}) is a {edit.kind}")
    if edit.family != adapter.family:
        raise ValueError(
            f"edit {edit.method}/{edit.concepts} was made for {edit.family!r}, the pipeline is {adapter.family!r}"
        )
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    erasers = erasers_from_tensors(edit.tensors, adapter.device, adapter.dtype)
    known = {p.name for p in points(adapter)}
    missing = sorted(set(erasers) - known)
    if missing:
        raise ValueError(f"the edit has erasers for points this model lacks: {missing[:3]}")
    return erasers


def distil_to_lora(
    pipe,
    edit: Edit,
    prompts: Sequence[str],
    other_prompts: Sequence[str] = ("",),
    rank: int = 16,
    seeds: Sequence[int] = (0, 1),
    ridge: float = 1e-6,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[Edit, dict]:
    """A LoRA edit (kind "lora") that approximates the output-adapter ``edit`` on ``pipe``.

    ``prompts``: prompts of the erased concept; ``other_prompts``: prompts that must stay as the
    edited model has them (include "" for the unconditional branch). Each prompt is generated once
    per seed in ``seeds`` with the edit attached (``steps`` denoising steps, default the
    adapter's), recording every forward. ``rank``: the LoRA's rank per carrier. Returns the edit
    (method ``<method>-distilled``, ``distilled_from`` in its hyper-parameters)
    and a report: per carrier the relative residual ||E - B A x|| / ||E|| on the recorded rows,
    the row count, and the mean residual weighted by ||E||^2.
    """
    adapter = adapter_for(pipe)
    erasers = _erasers(adapter, edit, rank)
    outputs = {p.name for kind in ("attn_out", "attn_out_extra") for p in adapter.attachment_points(kind)}
    elsewhere = sorted(set(erasers) - outputs)
    if elsewhere:
        raise ValueError(
            f"a per-layer fit reads erasers on attention outputs; this edit has some on {elsewhere[:2]}: "
            "distil it end to end (distill_into='prompt-keys-values')"
        )
    recorders = {name: _RecordingEraser(e) for name, e in erasers.items()}
    moments: dict[str, _Moments] = {}
    carriers = {name: _carrier(adapter, name) for name in recorders}
    inputs: dict[str, Tensor] = {}
    hooks = []
    for name, (_, linear, single) in carriers.items():
        if not single:

            def keep(_module, args, name=name):
                inputs[name] = args[0]

            hooks.append(linear.register_forward_pre_hook(keep))

    def collect() -> None:
        for name, rec in recorders.items():
            if rec.seen is None:
                continue
            h, e = rec.seen
            rec.seen = None
            _, linear, single = carriers[name]
            if single:
                # h: image tokens only; the text tokens of the same forward reach proj_out too, with target 0
                x, y = h, e
                text = inputs.pop(name + ":text", None)
                m = moments.setdefault(name, _Moments(h.shape[-1], e.shape[-1]))
                if text is not None:
                    m.add(text, torch.zeros(*text.shape[:-1], e.shape[-1]))
            else:
                x, y = inputs.pop(name), e
                m = moments.setdefault(name, _Moments(x.shape[-1], e.shape[-1]))
            m.add(x, y)

    single_names = [n for n, (_, _, s) in carriers.items() if s]
    for name in single_names:
        block = adapter.denoiser.get_submodule(name.rsplit(".", 1)[0])
        width = recorders[name].eraser.down.in_features

        def text_part(_module, args, kwargs, name=name, width=width):
            joint = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if joint is not None and text is not None:
                inputs[name + ":text_len"] = text.shape[1]

        hooks.append(block.register_forward_pre_hook(text_part, with_kwargs=True))
        attn = adapter.denoiser.get_submodule(name)

        def attn_out(_module, _args, output, name=name):
            h = output[0] if isinstance(output, tuple) else output
            n = inputs.pop(name + ":text_len", None)
            if n:
                inputs[name + ":text"] = h[:, :n]

        hooks.append(attn.register_forward_hook(attn_out))

    den_hook = adapter.denoiser.register_forward_hook(lambda *_: collect())
    attachment = attach_modules(adapter, recorders, "distill")
    runs = [(p, s) for p in list(prompts) + list(other_prompts) for s in seeds]
    try:
        with torch.no_grad():
            for p, s in tqdm(runs, desc="distil", disable=not progress, leave=False):
                adapter.generate([p], [s], steps=steps)
                collect()
    finally:
        attachment.detach()
        den_hook.remove()
        for h in hooks:
            h.remove()

    prefix = lora_prefix(adapter)
    tensors: dict[str, Tensor] = {}
    report: dict = {"carriers": {}, "rank": rank, "prompts": list(prompts), "other_prompts": list(other_prompts)}
    num = den = 0.0
    for name, m in moments.items():
        module_name, linear, single = carriers[name]
        a, b, rel = reduced_rank_fit(m, rank, ridge)
        if single:  # LoRA on proj_out: reads the h columns, writes through proj_out's h columns
            w_h = linear.weight.detach().double().cpu()[:, : m.width_in]
            a = torch.cat([a, torch.zeros(a.shape[0], linear.in_features - m.width_in, dtype=a.dtype)], dim=1)
            b = w_h @ b
        tensors[f"{prefix}.{module_name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{prefix}.{module_name}.lora_B.weight"] = b.float().contiguous()
        report["carriers"][module_name] = {"relative_residual": rel, "rows": m.rows}
        num += rel**2 * m.yy
        den += m.yy
    report["relative_residual"] = (num / den) ** 0.5 if den > 0 else 0.0
    return _distilled(edit, tensors, report["relative_residual"], distill_rank=rank, distill_seeds=list(seeds)), report


TEXT_TARGETS = "to_k,to_v,add_k_proj,add_v_proj"


def distil_to_text_lora(
    pipe,
    edit: Edit,
    prompts: Sequence[str],
    other_prompts: Sequence[str] = ("",),
    rank: int = 16,
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    states: int = 10,
    iterations: int = 400,
    batch: int = 8,
    lr: float = 1e-3,
    targets: str = TEXT_TARGETS,
    seed: int = 0,
    outputs: bool = False,
    progress: bool = True,
) -> tuple[Edit, dict]:
    """A LoRA edit (kind "lora") on the text projections of cross / joint attention (the keys and
    values read from the prompt: SD ``attn2.to_k/to_v``, Flux ``add_k_proj/add_v_proj``) trained
    so that the denoiser's output matches the output-adapter ``edit``'s.

    Where :func:`distil_to_lora`'s map acts on every image feature alike, a LoRA on the prompt's
    keys and values changes what a prompt says, token by token: the concept's words can change
    while other prompts' do not. It cannot be fitted per layer (the erasers act after the
    attention's softmax), so it is trained end to end: every prompt of ``prompts`` and
    ``other_prompts`` ("" included or added: the unconditional branch) is sampled once per seed
    in ``seeds`` with the erasers on (``steps`` sampler steps, default the adapter's), and each
    of ``states`` states x_t (B=1) evenly spaced along that trajectory gives two examples,
    (x_t, t, the prompt) and (x_t, t, ""), with the edited model's prediction as target. Then
    ``iterations`` Adam steps (``lr``) on minibatches of ``batch`` examples fit the LoRA (rank
    ``rank``, alpha = rank, peft's init from ``seed``) to those targets by mean squared error.
    With ``outputs`` the LoRA also covers the Linear after each eraser (the attention output
    projection ``to_out.0``; Flux single-stream: the block's ``proj_out``), fitted jointly: the
    prompt's keys and values say what changes, the output projections how.

    Returns the edit (method ``<method>-distilled``) and a report: ``relative_residual`` =
    ||student - target|| / ||base - target|| over every example (1.0: no better than the base
    model, 0: exact), ``examples``, ``targets`` (module names), ``loss`` (first and last).
    """
    adapter = adapter_for(pipe)
    erasers = _erasers(adapter, edit, rank)
    targeted = lora_targets(adapter, targets)
    if outputs:  # the Linear after each eraser, as a point lora_shapes reads
        for point in erasers:
            module_name, linear, _ = _carrier(adapter, point)
            targeted.append(AttachmentPoint(module_name, linear, linear.out_features, linear.in_features))
    names = [p.name for p in targeted]
    texts = list(dict.fromkeys(["", *prompts, *other_prompts]))  # "" first: the unconditional branch
    conds = [adapter.encode([t]) for t in texts]
    xs, ts, src, which, wanted, base = [], [], [], [], [], []  # x_t and t once per trajectory state
    num_steps = steps or adapter.default_steps
    attachment = attach_modules(adapter, erasers, "distill")
    runs = [(i, s) for i in range(len(texts)) for s in seeds]
    try:
        with torch.no_grad():
            for i, s in tqdm(runs, desc="distil: record", disable=not progress, leave=False):
                g = torch.Generator().manual_seed(int(s))
                trajectory, times = adapter.rollout_trajectory(
                    conds[i], conds[0], num_steps - 1, num_steps, generator=g
                )
                keep = torch.linspace(0, len(times) - 1, min(states, len(times))).round().long().unique()
                x, t = trajectory[keep, 0], times[keep]  # (states, *latent), (states,)
                first = sum(len(v) for v in ts)
                xs.append(x.cpu())
                ts.append(t.cpu())
                for j in dict.fromkeys([i, 0]):  # the prompt's branch and the empty one
                    c = conds[j].expand_to(x.shape[0])
                    wanted.append(adapter.predict(x, t, c).float().cpu())
                    with adapter.edits_disabled():
                        base.append(adapter.predict(x, t, c).float().cpu())
                    src += range(first, first + x.shape[0])
                    which += [j] * x.shape[0]
    finally:
        attachment.detach()
    x_all, t_all, y_all, b_all = torch.cat(xs), torch.cat(ts), torch.cat(wanted), torch.cat(base)
    which_t, src_t = torch.tensor(which), torch.tensor(src)

    def student(idx: Tensor) -> Tensor:
        cond = Conditioning.cat([conds[int(k)] for k in which_t[idx]])
        at = src_t[idx]
        return adapter.predict(x_all[at].to(adapter.device), t_all[at].to(adapter.device), cond).float().cpu()

    g = torch.Generator().manual_seed(seed)
    initial = init_lora(lora_shapes(adapter, rank, targeted), g)
    losses = []
    with frozen(adapter.denoiser, *adapter.text_encoders()):
        handle = attach_lora(adapter, initial, "erasekit_distill", 1.0, trainable=True)
        try:
            opt = torch.optim.Adam(handle.parameters(), lr=lr)
            for _ in tqdm(range(iterations), desc="distil: fit", disable=not progress, leave=False):
                idx = torch.randint(len(which_t), (min(batch, len(which_t)),), generator=g)
                loss = (student(idx) - y_all[idx]).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            with torch.no_grad():
                err = sum(
                    float((student(idx) - y_all[idx]).pow(2).sum()) for idx in torch.arange(len(which_t)).split(32)
                )
            tensors = handle.state(lora_prefix(adapter))
        finally:
            handle.detach()
    gap = float((b_all - y_all).pow(2).sum())
    report = {
        "relative_residual": (err / gap) ** 0.5 if gap > 0 else 0.0,
        "examples": len(which_t),
        "targets": names,
        "rank": rank,
        "loss": [losses[0], losses[-1]] if losses else [],
        "prompts": list(prompts),
        "other_prompts": list(other_prompts),
    }
    settings = {"distill_rank": rank, "distill_seeds": list(seeds), "distill_targets": targets}
    if outputs:
        settings["distill_outputs"] = True
    return _distilled(edit, tensors, report["relative_residual"], **settings), report


def distil_prompts(concepts: Sequence[str], others: Sequence[str]) -> tuple[list[str], list[str]]:
    """The prompts :func:`distil_to_lora` records by default: each concept and each other word in
    :data:`DISTILL_TEMPLATES`, and the empty prompt among the others."""
    concept_prompts = [t.format(c) for c in concepts for t in DISTILL_TEMPLATES]
    other_prompts = [""] + [t.format(o) for o in others for t in DISTILL_TEMPLATES[:2]]
    return concept_prompts, other_prompts

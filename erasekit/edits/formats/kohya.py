"""The kohya single-file LoRA format (sd-scripts; what Automatic1111, ComfyUI and diffusers load),
and LoRAs fitted to weight deltas by truncated SVD.

A kohya LoRA is one ``.safetensors`` file. Each adapted layer ``NAME`` has three tensors:
``NAME.lora_down.weight`` (rank, in), ``NAME.lora_up.weight`` (out, rank) and ``NAME.alpha``
(a scalar); the layer's weight changes by ``(alpha / rank) * up @ down``. erasekit's LoRAs
have alpha folded into B (they load at alpha = rank), so :func:`to_kohya` writes
``alpha = rank`` (scale 1) and copies the factors unchanged: a file that loads at strength 1.0
is the edit exactly. The file's metadata says ``ss_network_module = "networks.lora"``, the
rank and alpha (:func:`save_kohya`).

Layer names per family (``<module>``: the module's path in the diffusers model):

* **SD 1.x** (``"sd"``): ``lora_unet_<module with "." -> "_">`` for the UNet (e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``) and
  ``lora_te_text_model_encoder_layers_{i}_{self_attn_q_proj, ..., mlp_fc1, ...}`` for the CLIP
  text encoder's attention and MLP layers. These are the names sd-scripts writes for SD 1.x (it
  trains the diffusers UNet), which Automatic1111 and ComfyUI map onto their own (LDM) module
  names, and which diffusers' ``load_lora_weights`` converts back; every Linear / Conv2d of the
  UNet round-trips. Every layer gets one rank, the largest (smaller LoRAs zero-padded: the same
  ``up @ down``), so that one alpha serves all: diffusers 0.42 applies per-layer alphas of an SD
  kohya file whose ranks differ to the wrong layers.
* **Flux.1** (``"flux"``; Automatic1111 has no Flux): the sd-scripts Flux layout, named after
  the original (BFL) Flux modules: ``lora_unet_double_blocks_{i}_img_attn_qkv``, ``..._txt_attn_qkv``,
  ``..._img_attn_proj``, ``..._txt_attn_proj``, ``..._img_mlp_{0,2}``, ``..._txt_mlp_{0,2}``,
  ``..._img_mod_lin``, ``..._txt_mod_lin`` for the dual-stream blocks
  (``transformer_blocks.{i}``) and ``lora_unet_single_blocks_{i}_linear1``, ``..._linear2``,
  ``..._modulation_lin`` for the single-stream ones. BFL fuses diffusers' separate q / k / v
  projections into one ``qkv`` Linear (and ``linear1`` = q, k, v and the MLP input), so their
  LoRAs are fused: ``lora_down`` stacks the parts' A (each zero-padded to the largest part
  rank r; a part without a LoRA gets zeros), rank n*r, and ``lora_up`` is block-diagonal in the
  parts' B, alpha = n*r. That is exactly the separate LoRAs (``up @ down`` stacks the parts'
  ``B @ A``), and diffusers recognises the block-diagonal form and splits it back into
  per-projection LoRAs of rank r. A CLIP text-encoder LoRA is named ``lora_te1_...`` (sd-scripts'
  name for Flux's CLIP-L).

Why this Flux layout: it is the one-file layout of sd-scripts' Flux LoRAs, which ComfyUI maps
straight onto its (BFL-named) Flux modules (``lora_unet_`` + the module path) and which diffusers
converts back (``_convert_kohya_flux_lora_to_diffusers``); the other ``lora_*`` layout both read,
OneTrainer's ``lora_transformer_*``, loses every non-attention module in diffusers' converter.
What the installed diffusers (0.42) reads back sets the limits, and :func:`to_kohya` refuses
(``ValueError``) what it would drop or misread rather than write a file that loads differently
in different tools:

* the Flux layers outside the blocks (``x_embedder``, ``context_embedder``, ``time_text_embed.*``,
  ``norm_out.linear``, ``proj_out``): diffusers converts them to names without the
  ``transformer.`` prefix and then silently ignores them;
* single-block ``linear1`` (q, k, v, ``proj_mlp``) unless the model has Flux.1's widths
  (3072, MLP 12288): diffusers splits ``linear1`` with those sizes written into the converter;
  blocks beyond Flux.1's 19 + 38 are likewise unknown to it;
* the Flux T5 text encoder (``text_encoder_2``).

For such a LoRA use the edit's own diffusers-layout ``edit.safetensors``
(``transformer.<module>.lora_A.weight``): diffusers loads it and ComfyUI reads that layout too.
The dual-stream blocks carry every LoRA-able projection erasekit's methods change on Flux
(EraseAnything's default targets; UCE's and ESD-x's text projections).

:func:`lora_from_deltas` turns weight deltas (ESD, UCE: ``delta.<parameter>``) into such LoRA
factors by truncated SVD; at full rank the LoRA is the delta (up to float32 rounding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ...files import atomic_write_bytes

# Denoiser component name (diffusers LoRA key prefix) per family.
DENOISER_PREFIX = {"sd": "unet", "flux": "transformer"}
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
NETWORK_MODULE = "networks.lora"

# CLIP text-encoder layers that Automatic1111 / ComfyUI / diffusers all map from lora_te_ names.
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")

# Flux (diffusers module inside a block) -> (BFL layer name, part index in a fused layer or None).
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None),
    "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None),
    "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation_lin", None),
}
_FLUX_PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
# What diffusers' converter (0.42) knows of Flux.1: block counts and single-block linear1's part widths.
_FLUX1_BLOCKS = {"double": 19, "single": 38}
_FLUX1_LINEAR1 = (3072, 3072, 3072, 12288)


def _factors(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``"<component>.<module>"`` -> (A (rank, in, ...), B (out, rank, ...)) of diffusers-layout
    LoRA tensors, checked: every tensor a factor, in pairs, with matching ranks."""
    if not tensors:
        raise ValueError("no LoRA tensors to convert")
    foreign = sorted(k for k in tensors if not k.endswith((A_SUFFIX, B_SUFFIX)))
    if foreign:
        raise ValueError(f"tensors {foreign[:2]} are not LoRA factors (names *{A_SUFFIX}, *{B_SUFFIX})")
    names = sorted({k[: -len(A_SUFFIX)] for k in tensors})
    unpaired = [n for n in names if n + A_SUFFIX not in tensors or n + B_SUFFIX not in tensors]
    if unpaired:
        raise ValueError(f"LoRA factors without their pair at {unpaired[:2]}")
    out = {}
    for name in names:
        a, b = tensors[name + A_SUFFIX], tensors[name + B_SUFFIX]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1] or "." not in name:
            raise ValueError(
                f"LoRA factors of {name} have shapes {tuple(a.shape)} (A) and {tuple(b.shape)} (B); "
                "expected A (rank, in) and B (out, rank) under a '<component>.<module>' name"
            )
        out[name] = (a, b)
    return out


def _entry(out: dict[str, Tensor], name: str, down: Tensor, up: Tensor) -> None:
    out[name + DOWN] = down.detach().contiguous()
    out[name + UP] = up.detach().contiguous()
    out[name + ALPHA] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1, as erasekit's LoRAs load


def _text_encoder_name(module: str, kohya_prefix: str) -> str:
    """kohya name of a CLIP text-encoder layer; its path may lack the ``text_model.`` level
    (transformers 5 flattened ``CLIPTextModel``), kohya names always have it."""
    if module.startswith("encoder."):
        module = "text_model." + module
    if _CLIP_LAYER.fullmatch(module) is None:
        raise ValueError(
            f"text encoder layer {module} has no kohya name the LoRA loaders share "
            "(only text_model.encoder.layers.N self_attn q/k/v/out_proj and mlp fc1/fc2)"
        )
    return kohya_prefix + module.replace(".", "_")


def _pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, in, ...) and B (out, r, ...) zero-padded to ``rank``: the same product B A."""
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    a = torch.cat([a, a.new_zeros(extra, *a.shape[1:])])
    b = torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], dim=1)
    return a, b


def _sd(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    rank = max(a.shape[0] for a, _ in factors.values())
    for name, (a, b) in factors.items():
        a, b = _pad_rank(a, b, rank)
        component, _, module = name.partition(".")
        if component == "unet":
            kohya = "lora_unet_" + module.replace(".", "_")
        elif component == "text_encoder":
            kohya = _text_encoder_name(module, "lora_te_")
        else:
            raise ValueError(f"an SD kohya LoRA holds the unet and text_encoder; got component {component!r}")
        _entry(out, kohya, a, b)
    return out


def _flux_layer(module: str) -> tuple[str, int | None]:
    """(kohya layer name, part of a fused layer or None) of a diffusers Flux module path."""
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
    table = (_FLUX_SINGLE if m.group(1).startswith("single") else _FLUX_DOUBLE) if m else {}
    if m is None or m.group(3) not in table:
        raise ValueError(
            f"Flux layer {module} cannot go into a kohya LoRA that diffusers reads back (it drops the layers "
            "outside the transformer blocks); use the edit's diffusers-layout edit.safetensors instead"
        )
    kind = "single" if m.group(1).startswith("single") else "double"
    index = int(m.group(2))
    if index >= _FLUX1_BLOCKS[kind]:
        raise ValueError(f"Flux layer {module}: diffusers' kohya converter knows {_FLUX1_BLOCKS[kind]} {kind} blocks")
    layer, part = table[m.group(3)]
    return f"lora_unet_{kind}_blocks_{index}_{layer}", part


def _fuse(layer: str, parts: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(down (n*r, in), up (sum of part widths, n*r)) of a fused BFL layer from its parts' LoRAs
    (part index -> (A (r_i, in), B (out_i, r_i))): A zero-padded to r = max r_i and stacked, B
    block-diagonal; a missing part gets zeros. ``up @ down`` stacks the parts' ``B @ A``."""
    n = next(count for short, count in _FLUX_PARTS.items() if layer.endswith("_" + short))
    a0, b0 = next(iter(parts.values()))
    if a0.dim() != 2:
        raise ValueError(f"{layer}: the fused Flux layers are Linear; got a {a0.dim()}-D LoRA")
    if layer.endswith("_linear1"):
        widths = _FLUX1_LINEAR1
        wrong = {i: b.shape[0] for i, (_, b) in parts.items() if b.shape[0] != widths[i]}
        if wrong:
            raise ValueError(
                f"{layer}: diffusers splits single-block linear1 at Flux.1's widths {widths} (q, k, v, mlp); this "
                f"model's differ {wrong}: use the edit's diffusers-layout edit.safetensors instead"
            )
    else:
        widths = (b0.shape[0],) * n
        if any(b.shape[0] != widths[0] for _, b in parts.values()):
            raise ValueError(f"{layer}: q, k and v LoRAs of different output widths")
    if any(a.shape[1] != a0.shape[1] for a, _ in parts.values()):
        raise ValueError(f"{layer}: the fused parts' LoRAs have different input widths")
    rank = max(a.shape[0] for a, _ in parts.values())
    dtype = torch.promote_types(a0.dtype, b0.dtype)
    downs, ups = [], []
    for i in range(n):
        a, b = parts.get(i, (a0.new_zeros(0, a0.shape[1]), b0.new_zeros(widths[i], 0)))
        a, b = _pad_rank(a.to(dtype), b.to(dtype), rank)
        downs.append(a)
        ups.append(b)
    return torch.cat(downs), torch.block_diag(*ups)


def _flux(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for name, (a, b) in factors.items():
        component, _, module = name.partition(".")
        if component == "transformer":
            layer, part = _flux_layer(module)
            if part is None:
                _entry(out, layer, a, b)
            else:
                fused.setdefault(layer, {})[part] = (a, b)
        elif component == "text_encoder":
            _entry(out, _text_encoder_name(module, "lora_te1_"), a, b)
        else:
            raise ValueError(
                f"a Flux kohya LoRA holds the transformer and the CLIP text_encoder; got component {component!r}"
            )
    for layer, parts in fused.items():
        _entry(out, layer, *_fuse(layer, parts))
    return dict(sorted(out.items()))


def to_kohya(tensors: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """A diffusers-layout LoRA as one kohya state dict (see the module docstring for the names).

    ``tensors``: ``<component>.<module>.lora_A.weight`` (rank, in) and ``.lora_B.weight``
    (out, rank) (4-D for a Conv2d: A (rank, in, kh, kw), B (out, rank, 1, 1)), alpha folded
    into B, component the denoiser's (``"unet"`` for ``family="sd"``, ``"transformer"`` for
    ``"flux"``) or ``"text_encoder"`` (CLIP). Returns ``NAME.lora_down.weight`` = A,
    ``NAME.lora_up.weight`` = B (Flux's fused q/k/v: stacked / block-diagonal, see above) and
    ``NAME.alpha`` = rank (float32 scalar), so the file changes each weight by exactly ``B @ A``.
    Tensors keep their dtype. ``ValueError`` (one line) for malformed input or a layer the
    format cannot carry for every loader.
    """
    factors = _factors(tensors)
    if family == "sd":
        return _sd(factors)
    if family == "flux":
        return _flux(factors)
    raise ValueError(f"no kohya LoRA layout for family {family!r}; known: {sorted(DENOISER_PREFIX)}")


def lora_can_carry(name: str, delta: Tensor) -> bool:
    """Whether a weight delta can be a LoRA: a Linear's (2-D) or a Conv2d's (4-D) ``*.weight``;
    not a bias or a norm."""
    return delta.dim() in (2, 4) and name.endswith(".weight")


def lora_from_deltas(deltas: dict[str, Tensor], rank: int, prefix: str) -> tuple[dict[str, Tensor], dict]:
    """LoRA factors that approximate weight deltas, by truncated SVD (computed in float64).

    ``deltas``: parameter name (``"<module>.weight"``) -> delta (out, in) of a Linear or
    (out, in, kh, kw) of a Conv2d, e.g. ``deltas_of(edit)`` of an ESD / UCE edit. Each delta,
    as a matrix D (out, in * kh * kw) = U S V^T, is cut to its ``r = min(rank, out, in * kh * kw)``
    largest singular values and split evenly: ``{prefix}.{module}.lora_B.weight`` = U_r sqrt(S_r)
    (out, r) and ``{prefix}.{module}.lora_A.weight`` = sqrt(S_r) V_r^T (r, in), float32 on the
    CPU, diffusers layout at alpha = rank (B A approximates D at strength 1). For a Conv2d, A is
    reshaped to a (r, in, kh, kw) kernel and B to (out, r, 1, 1), peft's and kohya's LoCon
    layout. ``prefix``: the component the deltas belong to ("unet", "transformer", "text_encoder").

    Returns ``(tensors, report)``; ``report``: ``{"rank": rank, "relative_error": overall,
    "parameters": {name: {"rank": r, "shape": list(delta.shape), "relative_error": e}}}`` with
    e = ||D - B A||_F / ||D||_F of the returned (float32) factors (0 for a zero delta) and overall
    = sqrt(sum ||D - B A||_F^2) / sqrt(sum ||D||_F^2). Biases and norms (1-D, or not
    ``*.weight``) cannot be a LoRA: ``ValueError`` naming them.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank!r}")
    if not prefix or prefix.endswith("."):
        raise ValueError(f"the LoRA key prefix must be a component name such as 'unet', got {prefix!r}")
    if not deltas:
        raise ValueError("no weight deltas to turn into a LoRA")
    bad = sorted(n for n, d in deltas.items() if not lora_can_carry(n, d))
    if bad:
        raise ValueError(
            f"only Linear (2-D) and Conv2d (4-D) weight deltas can become a LoRA; these cannot: {', '.join(bad)} "
            "(leave them out, and the LoRA lacks them, or export the merged model)"
        )
    tensors: dict[str, Tensor] = {}
    parameters: dict[str, dict] = {}
    err_sq = norm_sq = 0.0
    for name in sorted(deltas):
        full = deltas[name].detach().to("cpu", torch.float64)
        d = full.flatten(1)  # a Conv2d's (out, in, kh, kw) as (out, in * kh * kw)
        r = min(rank, *d.shape)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        root = s[:r].sqrt()
        b = (u[:, :r] * root).float()
        a = (root[:, None] * vh[:r]).float()
        err = torch.linalg.matrix_norm(d - b.double() @ a.double()).item()
        norm = torch.linalg.matrix_norm(d).item()
        if full.dim() == 4:
            a, b = a.reshape(r, *full.shape[1:]), b.reshape(*b.shape, 1, 1)
        module = name[: -len(".weight")]
        tensors[f"{prefix}.{module}{A_SUFFIX}"] = a.contiguous()
        tensors[f"{prefix}.{module}{B_SUFFIX}"] = b.contiguous()
        parameters[name] = {"rank": r, "shape": list(full.shape), "relative_error": err / norm if norm else 0.0}
        err_sq, norm_sq = err_sq + err**2, norm_sq + norm**2
    overall = (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0
    return tensors, {"rank": rank, "relative_error": overall, "parameters": parameters}


def _network_metadata(tensors: dict[str, Tensor]) -> dict[str, str]:
    """The ``ss_network_*`` keys of a kohya state dict, checked: every tensor a down / up / alpha
    of a layer with both factors. One rank (and alpha) throughout: its value; several:
    "Dynamic", as sd-scripts writes for LoRAs whose ranks differ per layer."""
    if not tensors:
        raise ValueError("no kohya LoRA tensors to save")
    foreign = sorted(k for k in tensors if not k.endswith((DOWN, UP, ALPHA)))
    if foreign:
        raise ValueError(f"tensors {foreign[:2]} are not kohya LoRA tensors (*{DOWN}, *{UP}, *{ALPHA})")
    layers = {k.rsplit(".", 2)[0] if not k.endswith(ALPHA) else k[: -len(ALPHA)] for k in tensors}
    unpaired = sorted(n for n in layers if n + DOWN not in tensors or n + UP not in tensors)
    if unpaired:
        raise ValueError(f"kohya LoRA layers without both factors: {unpaired[:2]}")
    ranks = {int(tensors[n + DOWN].shape[0]) for n in layers}
    alphas = {float(tensors[n + ALPHA]) if n + ALPHA in tensors else float(tensors[n + DOWN].shape[0]) for n in layers}
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }


def save_kohya(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya state dict (:func:`to_kohya`) as one ``.safetensors`` file, atomically (a
    temporary file beside it renamed into place: a failure leaves no partial file, and an
    existing file at ``path`` is replaced whole).

    The file's metadata: ``metadata`` (e.g. the edit's method, concepts and id; values must be
    strings, as safetensors stores them; anything else is written as JSON) plus
    ``ss_network_module = "networks.lora"``, ``ss_network_dim`` (the rank) and
    ``ss_network_alpha`` (the alpha), which describe the tensors and take precedence.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a kohya LoRA file is named *.safetensors, got {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the .safetensors file to write")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    meta |= _network_metadata(tensors)
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    return atomic_write_bytes(path, data)

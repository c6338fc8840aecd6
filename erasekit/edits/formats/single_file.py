"""Original-layout (LDM / CompVis) Stable Diffusion checkpoints: a StableDiffusionPipeline's UNet, VAE and
CLIP text encoder written as ONE ``.safetensors`` under the key names of the original SD 1.x checkpoints,
the file Automatic1111, ComfyUI and diffusers' ``from_single_file`` read.

The layout (:func:`sd_checkpoint_state`), with every index worked out from the models' configs:

- ``model.diffusion_model.*``, the UNet as the LDM ``UNetModel``: ``time_embed.{0,2}``; ``input_blocks.0.0``
  (conv_in); per resolution level ``layers_per_block`` blocks ``[ResBlock, SpatialTransformer?]`` and, but for
  the last level, one ``[Downsample]`` (``.0.op``); ``middle_block.{0,1,2}`` (ResBlock, SpatialTransformer,
  ResBlock); per level from the lowest resolution, ``layers_per_block + 1`` blocks ``[ResBlock,
  SpatialTransformer?, Upsample?]`` (the upsampler, ``.conv``, closes every level but the last); ``out.{0,2}``.
  ResBlock parameters are renamed (norm1 -> in_layers.0, conv1 -> in_layers.2, time_emb_proj -> emb_layers.1,
  norm2 -> out_layers.0, conv2 -> out_layers.3, conv_shortcut -> skip_connection); inside a transformer the
  names are the same in both layouts.
- ``first_stage_model.*``, the VAE as the LDM ``AutoencoderKL``: ``encoder.down.{i}.block.{j}`` (conv_shortcut
  -> nin_shortcut), ``.downsample.conv``, ``mid.block_1 / attn_1 / block_2``, ``norm_out``; the decoder's
  ``up.{i}`` are numbered from the highest resolution (diffusers' ``up_blocks.k`` is ``up.{n-1-k}``); the
  mid-block attention's q / k / v / proj_out are 1x1 convolutions there: (out, in) weights become
  (out, in, 1, 1).
- ``cond_stage_model.transformer.text_model.*``: SD 1.x keeps Hugging Face's CLIPTextModel names under that
  prefix (transformers >= 5.6 dropped the ``text_model.`` level from CLIPTextModel; it is put back).

Not in the file: the scheduler, the VAE's scaling factor, the prediction type and the tokenizer. A1111 and
ComfyUI take SD 1.x's (v1-inference.yaml: epsilon prediction, latents scaled by 0.18215, scaled-linear betas
0.00085..0.012), which is what SD 1.x models use; ``from_single_file`` takes them from ``config=``. A1111 loads
only the real SD 1.x structure (320-1280 channels, a CLIP ViT-L/14 text encoder); smaller UNets of the same
structure are written the same way and read back by diffusers. SD 2.x-like UNets (linear proj_in / proj_out,
per-level head counts) map the same way, but SD 2.x files hold an OpenCLIP text encoder
(``cond_stage_model.model.*``), which this module does not write: the text encoder is always in the SD 1.x
layout, which diffusers reads and A1111 does not for an SD 2.x model.

Reading a file back with stock diffusers, offline (what tests/test_export_single_file.py does)::

    pipe.save_pretrained(folder)  # configs, tokenizer, scheduler; its weight files are not needed
    back = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)

``config=`` naming a local diffusers folder is what makes this offline and exact: the UNet, VAE and text
encoder are built from that folder's configs and the tokenizer and scheduler are loaded from it with
from_pretrained; the weights come from the file. Without ``config=``, from_single_file infers the model type
from the keys (SD 1.5, unless the cross-attention width is SD 2's 1024) and fetches that model's configs from
the Hub even with ``local_files_only=True`` (it overrides the flag when no local configs are found): offline
that fails, and online a UNet smaller than SD's would not fit the fetched config. The folder's model_index.json decides
the safety checker: a pipeline saved without one is read back without one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ...errors import UserError
from ...files import atomic_write_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_P = r"(weight|bias)"  # a parameter's own name
_RESNET = {  # diffusers ResnetBlock2D -> LDM ResBlock (UNet)
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# A Transformer2DModel's parameters, named alike in both layouts (SpatialTransformer).
_TRANSFORMER = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0"
    rf"|ff\.net\.0\.proj|ff\.net\.2))\.{_P}"
)
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has cross-attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class CheckpointLayoutError(UserError, ValueError):
    """A model (or pipeline) that the original SD checkpoint layout cannot hold; the one-line
    message says what is not supported."""


def sd_checkpoint_state(unet, vae, text_encoder) -> dict[str, Tensor]:
    """The weights of a diffusers ``UNet2DConditionModel``, ``AutoencoderKL`` and transformers
    ``CLIPTextModel`` under their original SD 1.x checkpoint names (see the module docstring).

    Every parameter (and persistent buffer) of the three models appears exactly once; the tensors
    are the models' own (the VAE attention weights reshaped views), on their device and in their
    dtype, so models on the "meta" device map too. Raises :class:`CheckpointLayoutError` (a
    ValueError) with a one-line message for a model the layout cannot hold: not an SD 1.x/2.x-like
    UNet2DConditionModel (e.g. a Flux transformer, SDXL's added conditioning, per-level
    layers_per_block), a VAE other than AutoencoderKL, a text encoder other than CLIPTextModel, or a
    parameter the mapping does not know (a peft LoRA layer left on a model, say).
    """
    state: dict[str, Tensor] = {}
    for prefix, rename, module in (
        (UNET_PREFIX, _unet_renamer(unet), unet),
        (VAE_PREFIX, _vae_renamer(vae), vae),
        (TEXT_PREFIX, _text_renamer(text_encoder), text_encoder),
    ):
        kind = type(module).__name__
        for name, tensor in module.state_dict().items():
            new = rename(name)
            if new is None:
                raise CheckpointLayoutError(
                    f"{kind} parameter {name!r} has no name in the original SD checkpoint layout "
                    "(merge or remove LoRA / adapter layers before writing a checkpoint)"
                )
            key = prefix + new
            if key in state:
                raise CheckpointLayoutError(f"{kind} parameters map twice to {key!r}")
            if key.startswith(VAE_PREFIX) and ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear (out, in) -> 1x1 conv (out, in, 1, 1)
            state[key] = tensor
    return state


def save_sd_checkpoint(
    pipe, path: str | Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``pipe`` (a StableDiffusionPipeline, SD 1.x-like) as one original-layout
    ``.safetensors`` checkpoint at ``path`` (:func:`sd_checkpoint_state`), e.g. for Automatic1111's
    models/Stable-diffusion folder; returns the path.

    ``dtype``: None keeps each weight's own dtype (the pipeline's); ``torch.float16`` or "fp16"
    (also "fp32", "bf16") casts the floating-point weights. ``metadata`` (str -> str) is stored in
    the safetensors header. The file is written beside ``path`` and renamed into place, so ``path``
    holds the old file or the whole new one, never a part.

    Edits attached with :func:`erasekit.edits.apply` are written as the pipeline shows them only
    when they live in the weights (weight-delta edits: written merged); an attached edit of another
    kind (output adapter, LoRA, inference hook) is refused, since the file could not carry it.
    Raises :class:`CheckpointLayoutError` (a ValueError) for a pipeline the layout cannot hold, e.g.
    a FluxPipeline.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointLayoutError(f"checkpoint path {path} must end in .safetensors (readers go by the suffix)")
    cast = _dtype(dtype)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointLayoutError(f"checkpoint metadata must map str to str; {bad[0]!r} does not")
    missing = [c for c in ("unet", "vae", "text_encoder") if getattr(pipe, c, None) is None]
    if missing:
        raise CheckpointLayoutError(
            f"{type(pipe).__name__} has no {', '.join(missing)}; an original-layout SD checkpoint holds a "
            "Stable Diffusion 1.x/2.x pipeline (UNet, AutoencoderKL VAE, CLIP text encoder)"
        )
    _refuse_unwritable_edits(pipe.unet)
    state = sd_checkpoint_state(pipe.unet, pipe.vae, pipe.text_encoder)
    tensors = {}
    for key, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointLayoutError(f"{key} has no data (a model on the meta device); load its weights first")
        target = cast if cast is not None and tensor.is_floating_point() else tensor.dtype
        tensors[key] = tensor.detach().to(device="cpu", dtype=target).contiguous()

    from safetensors.torch import save_file

    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise CheckpointLayoutError(f"checkpoint dtype must be a floating-point dtype, not {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise CheckpointLayoutError(f"unknown checkpoint dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _refuse_unwritable_edits(denoiser) -> None:
    """Refuse a UNet with erasekit edits attached that do not live in its weights."""
    from ...models.base import EDIT_STACK_KEY
    from ..weight_delta import DeltaAttachment

    stack = denoiser.__dict__.get(EDIT_STACK_KEY)
    if stack is None:
        return
    if stack.depth:
        raise CheckpointLayoutError("cannot write a checkpoint inside edits_disabled(): the weights show no edits")
    other = [edit_id for edit_id, a in stack.attached.items() if not isinstance(a, DeltaAttachment)]
    if other:
        raise CheckpointLayoutError(
            f"edit {other[0]} is attached as hooks or extra layers, which a checkpoint cannot carry; "
            "remove it (erasekit.edits.remove) or write a weight-delta edit"
        )


# ---- the UNet ------------------------------------------------------------------------------------------------


def _check_unet(unet) -> tuple[int, list[bool], list[bool]]:
    """layers_per_block and which down / up levels have cross-attention, for an SD 1.x/2.x-like UNet."""
    from diffusers import UNet2DConditionModel

    kind = type(unet).__name__
    if not isinstance(unet, UNet2DConditionModel):
        raise CheckpointLayoutError(
            f"{kind} is not a UNet2DConditionModel; the original SD checkpoint layout holds SD 1.x/2.x UNets only"
        )
    cfg = unet.config
    down, up = list(cfg.down_block_types), list(cfg.up_block_types)
    unknown = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if unknown:
        raise CheckpointLayoutError(f"UNet block type {unknown[0]} has no SD 1.x/2.x checkpoint layout")
    if cfg.mid_block_type != "UNetMidBlock2DCrossAttn":
        raise CheckpointLayoutError(f"UNet mid block {cfg.mid_block_type} has no SD 1.x/2.x checkpoint layout")
    down_attn, up_attn = [_DOWN_TYPES[t] for t in down], [_UP_TYPES[t] for t in up]
    if len(down) != len(up) or up_attn != down_attn[::-1]:
        raise CheckpointLayoutError(
            f"UNet up blocks {up} do not mirror the down blocks {down}, as the SD checkpoint layout requires"
        )
    if not isinstance(cfg.layers_per_block, int):
        raise CheckpointLayoutError(
            f"UNet layers_per_block {cfg.layers_per_block} differs per level; the SD layout has one number"
        )
    extras = {
        "addition_embed_type": cfg.addition_embed_type,
        "class_embed_type": cfg.class_embed_type,
        "num_class_embeds": cfg.num_class_embeds,
        "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }
    used = {k: v for k, v in extras.items() if v is not None}
    if used:
        name, value = next(iter(used.items()))
        raise CheckpointLayoutError(f"UNet {name}={value!r} (e.g. SDXL) has no SD 1.x/2.x checkpoint layout")
    return cfg.layers_per_block, down_attn, up_attn


def _unet_renamer(unet):
    layers, down_attn, up_attn = _check_unet(unet)
    levels = len(down_attn)
    patterns = [
        (re.compile(rf"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"), "down_resnet"),
        (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), "down_attention"),
        (re.compile(rf"down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}"), "downsample"),
        (re.compile(rf"mid_block\.resnets\.([01])\.(\w+)\.{_P}"), "mid_resnet"),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), "mid_attention"),
        (re.compile(rf"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"), "up_resnet"),
        (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), "up_attention"),
        (re.compile(rf"up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}"), "upsample"),
        (re.compile(rf"(.+)\.{_P}"), "top"),
    ]

    def input_block(level: int, j: int) -> int:
        return 1 + level * (layers + 1) + j  # every level before the last ends with a downsampler block

    def output_block(level: int, j: int) -> int:
        return level * (layers + 1) + j

    def rename(name: str) -> str | None:
        for pattern, what in patterns:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            g = m.groups()
            if what == "top":
                return f"{_UNET_TOP[g[0]]}.{g[1]}" if g[0] in _UNET_TOP else None
            if what.endswith("attention") and not _TRANSFORMER.fullmatch(g[-1]):
                return None
            if what.endswith("resnet") and g[-2] not in _RESNET:
                return None
            if what == "mid_resnet":
                return f"middle_block.{2 * int(g[0])}.{_RESNET[g[1]]}.{g[2]}"
            if what == "mid_attention":
                return f"middle_block.1.{g[0]}"
            level, j = int(g[0]), (int(g[1]) if what not in ("downsample", "upsample") else layers)
            if level >= levels:
                return None
            if what == "down_resnet":
                return f"input_blocks.{input_block(level, j)}.0.{_RESNET[g[2]]}.{g[3]}"
            if what == "down_attention":
                return f"input_blocks.{input_block(level, j)}.1.{g[2]}"
            if what == "downsample":
                return f"input_blocks.{input_block(level, j)}.0.op.{g[1]}"
            if what == "up_resnet":
                return f"output_blocks.{output_block(level, j)}.0.{_RESNET[g[2]]}.{g[3]}"
            if what == "up_attention":
                return f"output_blocks.{output_block(level, j)}.1.{g[2]}"
            # upsample: after the level's transformer, when it has one
            return f"output_blocks.{output_block(level, j)}.{2 if up_attn[level] else 1}.conv.{g[1]}"
        return None

    return rename


# ---- the VAE -------------------------------------------------------------------------------------------------


def _vae_renamer(vae):
    from diffusers import AutoencoderKL

    kind = type(vae).__name__
    if not isinstance(vae, AutoencoderKL):
        raise CheckpointLayoutError(f"VAE {kind} is not an AutoencoderKL; the SD checkpoint layout holds that one")
    cfg = vae.config
    blocks = set(cfg.down_block_types) | set(cfg.up_block_types)
    if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise CheckpointLayoutError(f"VAE blocks {sorted(blocks)} have no SD checkpoint layout")
    levels = len(cfg.up_block_types)
    patterns = [
        (re.compile(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"), "down_resnet"),
        (re.compile(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}"), "downsample"),
        (re.compile(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}"), "up_resnet"),
        (re.compile(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}"), "upsample"),
        (re.compile(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_P}"), "mid_resnet"),
        (re.compile(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.{_P}"), "attn"),
        (re.compile(rf"(.+)\.{_P}"), "top"),
    ]

    def rename(name: str) -> str | None:
        for pattern, what in patterns:
            m = pattern.fullmatch(name)
            if m is None:
                continue
            g = m.groups()
            if what == "top":
                return f"{_VAE_TOP[g[0]]}.{g[1]}" if g[0] in _VAE_TOP else None
            if what.endswith("resnet") and g[-2] not in _VAE_RESNET:
                return None
            if what == "mid_resnet":
                return f"{g[0]}.mid.block_{int(g[1]) + 1}.{_VAE_RESNET[g[2]]}.{g[3]}"
            if what == "attn":
                return f"{g[0]}.mid.attn_1.{_VAE_ATTENTION[g[1]]}.{g[2]}"
            level = int(g[0])
            if level >= levels:
                return None
            if what == "down_resnet":
                return f"encoder.down.{level}.block.{g[1]}.{_VAE_RESNET[g[2]]}.{g[3]}"
            if what == "downsample":
                return f"encoder.down.{level}.downsample.conv.{g[1]}"
            up = levels - 1 - level  # the LDM decoder numbers its levels from the highest resolution
            if what == "up_resnet":
                return f"decoder.up.{up}.block.{g[1]}.{_VAE_RESNET[g[2]]}.{g[3]}"
            return f"decoder.up.{up}.upsample.conv.{g[1]}"
        return None

    return rename


# ---- the text encoder ----------------------------------------------------------------------------------------


def _text_renamer(text_encoder):
    from transformers import CLIPTextModel

    kind = type(text_encoder).__name__
    if not isinstance(text_encoder, CLIPTextModel):
        raise CheckpointLayoutError(
            f"text encoder {kind} is not a CLIPTextModel; the SD 1.x checkpoint layout holds that one"
        )
    known = re.compile(
        rf"embeddings\.((token|position)_embedding\.weight|position_ids)|encoder\.layers\.\d+\.[\w.]+"
        rf"|final_layer_norm\.{_P}"
    )

    def rename(name: str) -> str | None:
        name = name.removeprefix("text_model.")  # transformers < 5.6 nested the model one level deeper
        return name if known.fullmatch(name) else None

    return rename

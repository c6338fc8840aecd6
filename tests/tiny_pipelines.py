"""Tiny random-weight pipelines of each family, for unit tests (no files, no download).

Both make 32x32 images: the VAE downsamples by 2, so SD latents are (4, 16, 16) and Flux
latents pack to 64 tokens of 16 channels. Text: 32 tokens (CLIP and T5), width 32.
The SD UNet has cross-attention at three resolutions (16, 8 and the 4x4 mid block), so
``middle_resolution_layers`` picks the 8x8 ones, as SD 1.4's picks its 16x16 ones.
Each pipeline carries ``erasekit_defaults`` (small sizes, few steps) for its adapter.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel

from erasekit.toyworld.builders import clip_text_encoder, kl_vae, t5_text_encoder
from erasekit.toyworld.offline_tokenizers import clip_word_tokenizer, t5_word_tokenizer

TINY_WORDS = (
    "a an the photo image picture painting of in on with and at red blue green yellow car "
    "teddy bear circle square triangle dog cat garden park street house tree sky small big "
    "style sitting standing"
).split()
TEXT_LEN = 32
IMAGE_SIZE = 32
TINY_DEFAULTS = {
    "max_sequence_length": TEXT_LEN,
    "num_inference_steps": 4,
    "guidance": 3.0,
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
}


def _tiny_vae(**extra) -> AutoencoderKL:
    return kl_vae((16, 32), norm_groups=8, image_size=IMAGE_SIZE, **extra)


def _tiny_clip(tokenizer) -> CLIPTextModel:
    positions = max(TEXT_LEN, tokenizer.model_max_length)
    return clip_text_encoder(tokenizer, width=32, layers=2, max_positions=positions, mlp_ratio=2)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", tokenizer=None) -> StableDiffusionPipeline:
    """A random StableDiffusionPipeline: 32x32 images, DDIM, epsilon or v_prediction.

    ``tokenizer``: a CLIP tokenizer to use instead of the tiny word-level one (the text encoder
    gets one row per token and reads its ``model_max_length`` positions)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tokenizer is None:
            tokenizer = clip_word_tokenizer(TINY_WORDS, model_max_length=TEXT_LEN)
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
        )
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_clip(tokenizer),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
                prediction_type=prediction_type,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _finish(pipe)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False, t5_tokenizer=None) -> FluxPipeline:
    """A random FluxPipeline: 2 dual-stream + 1 single-stream blocks, 32x32 images.
    ``t5_tokenizer``: a T5 tokenizer to use instead of the tiny word-level one (the T5 encoder
    gets one embedding row per token)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok = clip_word_tokenizer(TINY_WORDS, model_max_length=TEXT_LEN)
        t5_tok = t5_tokenizer if t5_tokenizer is not None else t5_word_tokenizer(TINY_WORDS, model_max_length=TEXT_LEN)
        t5 = t5_text_encoder(
            t5_tok,
            width=32,
            layers=2,
            ff=64,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=TEXT_LEN,
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                base_image_seq_len=256,
                base_shift=0.5,
                max_image_seq_len=4096,
                max_shift=1.15,
                shift=3.0,
                use_dynamic_shifting=True,
            ),
            vae=_tiny_vae(shift_factor=0.1, scaling_factor=0.6, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=_tiny_clip(clip_tok),
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    return _finish(pipe)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.erasekit_defaults = dict(TINY_DEFAULTS)
    return pipe

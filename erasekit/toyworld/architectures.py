"""Architectures of the toy-world pipelines: the same diffusers and transformers classes as
SD 1.x and FLUX.1, at a size that trains on two CPU cores."""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)

from .builders import clip_text_encoder, kl_vae, t5_text_encoder
from .grammar import vocabulary
from .offline_tokenizers import clip_word_tokenizer, t5_word_tokenizer
from .render import IMAGE_SIZE

TEXT_LENGTH = 32  # tokens per prompt for both families' text encoders
LATENT_CHANNELS = 4


def build_vae() -> AutoencoderKL:
    """A 2x-downsampling KL autoencoder: (B, 3, 32, 32) images <-> (B, 4, 16, 16) latents."""
    return kl_vae(
        (32, 64), norm_groups=16, image_size=IMAGE_SIZE, latent_channels=LATENT_CHANNELS, mid_block_add_attention=False
    )


def sd_components() -> dict:
    """Fresh SD-style components (untrained): UNet, CLIP text encoder and tokenizer, VAE, DDIM."""
    tokenizer = clip_word_tokenizer(vocabulary(), model_max_length=TEXT_LENGTH)
    text_encoder = clip_text_encoder(tokenizer, width=128, layers=3, max_positions=TEXT_LENGTH)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        # v-prediction (as SD 2.x): with epsilon targets the loss barely depends on the caption
        # at high noise, and a UNet this small then learns to follow its text far too slowly.
        prediction_type="v_prediction",
    )
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=build_vae(), scheduler=scheduler)


def flux_components() -> dict:
    """Fresh Flux-style components (untrained): transformer, T5 + CLIP text encoders and
    tokenizers, VAE, flow-matching Euler scheduler."""
    words = vocabulary()
    tokenizer = clip_word_tokenizer(words, model_max_length=TEXT_LENGTH)
    tokenizer_2 = t5_word_tokenizer(words, model_max_length=TEXT_LENGTH)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=3,
        num_single_layers=3,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    return dict(
        transformer=transformer,
        text_encoder=clip_text_encoder(tokenizer, width=64, layers=2, max_positions=TEXT_LENGTH),
        tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(tokenizer_2, width=128, layers=3, ff=256, feed_forward_proj="gated-gelu"),
        tokenizer_2=tokenizer_2,
        vae=build_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    )

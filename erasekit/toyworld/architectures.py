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
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..models.offline_tokenizers import clip_word_tokenizer, t5_word_tokenizer
from .grammar import vocabulary
from .render import IMAGE_SIZE

TEXT_LENGTH = 32  # tokens per prompt for both families' text encoders
LATENT_CHANNELS = 4


def build_vae() -> AutoencoderKL:
    """A 2x-downsampling KL autoencoder: (B, 3, 32, 32) images <-> (B, 4, 16, 16) latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_clip_text(hidden: int, layers: int, tokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
    )
    return CLIPTextModel(cfg)


def sd_components() -> dict:
    """Fresh SD-style components (untrained): UNet, CLIP text encoder and tokenizer, VAE, DDIM."""
    tokenizer = clip_word_tokenizer(vocabulary(), model_max_length=TEXT_LENGTH)
    text_encoder = build_clip_text(128, 3, tokenizer)
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
        prediction_type="epsilon",
    )
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=build_vae(), scheduler=scheduler)


def flux_components() -> dict:
    """Fresh Flux-style components (untrained): transformer, T5 + CLIP text encoders and
    tokenizers, VAE, flow-matching Euler scheduler."""
    words = vocabulary()
    tokenizer = clip_word_tokenizer(words, model_max_length=TEXT_LENGTH)
    text_encoder = build_clip_text(64, 2, tokenizer)
    tokenizer_2 = t5_word_tokenizer(words, model_max_length=TEXT_LENGTH)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=128,
            d_kv=32,
            d_ff=256,
            num_layers=3,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
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
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return dict(
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        vae=build_vae(),
        scheduler=scheduler,
    )

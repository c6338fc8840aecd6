"""Random-weight components of the released families' classes at any size: the tiny test
pipelines and the toy world's pipelines are both built from these."""

from __future__ import annotations

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel


def kl_vae(
    channels: tuple[int, ...], norm_groups: int, image_size: int, latent_channels: int = 4, **extra
) -> AutoencoderKL:
    """AutoencoderKL downsampling by 2**(len(channels) - 1): (B, 3, S, S) <-> (B, 4, S/f, S/f)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups,
        sample_size=image_size,
        **extra,
    )


def clip_text_encoder(tokenizer, width: int, layers: int, max_positions: int, mlp_ratio: int = 4) -> CLIPTextModel:
    """A CLIP text encoder (4 heads, MLP ``mlp_ratio`` x ``width``) over ``tokenizer``'s ids."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * mlp_ratio,
            num_attention_heads=4,
            num_hidden_layers=layers,
            max_position_embeddings=max_positions,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def t5_text_encoder(tokenizer, width: int, layers: int, ff: int, **extra) -> T5EncoderModel:
    """A T5 encoder (4 heads of width/4) over ``tokenizer``'s ids."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // 4,
            d_ff=ff,
            num_layers=layers,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **extra,
        )
    )

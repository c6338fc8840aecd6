"""The released models' architectures as constructor arguments, so that they can be built
with random weights (for structure, parameter counts, speed and memory) without downloading.

SD 1.4 (CompVis/stable-diffusion-v1-4): UNet 859,520,964 parameters, CLIP ViT-L/14 text encoder,
the KL autoencoder (8x downsampling, 4 latent channels).
FLUX.1-dev: transformer (19 dual-stream + 38 single-stream blocks, width 3072), T5-XXL encoder,
CLIP ViT-L/14 text encoder, the 16-channel KL autoencoder.
"""

from __future__ import annotations

SD14_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# CLIPTextConfig of openai/clip-vit-large-patch14 (SD 1.x and FLUX.1's CLIP encoder).
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# The KL autoencoder body shared by SD 1.x and FLUX.1 (they differ in latent channels and scaling).
_KL_VAE_BODY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
SD14_VAE = _KL_VAE_BODY | {"latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215}
# DDIM with SD 1.x's noise schedule (the pipeline ships PNDM with these betas).
SD14_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# T5Config of google/t5-v1_1-xxl (encoder only in FLUX.1).
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": False,
}
FLUX1_VAE = _KL_VAE_BODY | {
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX1_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

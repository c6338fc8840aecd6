"""Real model configs on the meta device: parameter counts and the adapters' structure."""

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from erasekit.models import FamilyAdapter
from erasekit.models.flux import FluxAdapter
from erasekit.models.sd_unet import SDUNetAdapter

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


def test_sd14_unet_structure():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    adapter = FamilyAdapter.for_denoiser(unet)
    assert isinstance(adapter, SDUNetAdapter)
    attn_out = adapter.attachment_points("attn_out")
    assert len(attn_out) == 16 and len(adapter.attachment_points("text_proj")) == 32
    assert len(adapter.attention_layers()) == 16
    assert adapter.middle_resolution_layers() == [
        f"{block}.attentions.{i}.transformer_blocks.0.attn2"
        for block, n in (("down_blocks.2", 2), ("up_blocks.1", 3))
        for i in range(n)
    ]
    assert adapter.keyword_layers() == adapter.middle_resolution_layers()
    # Receler's eraser budget (rank 128 on every attn2 output): 3,209,408 = 0.373% of the UNet.
    eraser = sum(2 * 128 * p.width + 128 + p.width for p in attn_out)
    assert eraser == 3_209_408
    assert round(100 * eraser / 859_520_964, 3) == 0.373


def test_flux1_dev_transformer_structure():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
    n = sum(p.numel() for p in transformer.parameters())
    assert abs(n - 11.9e9) < 0.05e9
    adapter = FamilyAdapter.for_denoiser(transformer)
    assert isinstance(adapter, FluxAdapter)
    assert len(adapter.attachment_points("attn_out")) == 19
    assert adapter.keyword_layers() == ["transformer_blocks.18"]
    text_proj = adapter.attachment_points("text_proj")
    assert len(text_proj) == 57
    assert len(adapter.attention_layers()) == 57 and len(adapter.middle_resolution_layers()) == 19
    # EraseAnything's LoRA (rank 8 on add_q_proj and add_k_proj): 76 tensors, 1,867,776 parameters.
    qk = [p for p in text_proj if p.name.endswith(("add_q_proj", "add_k_proj"))]
    assert 2 * len(qk) == 76
    assert sum(8 * (p.in_features + p.width) for p in qk) == 1_867_776

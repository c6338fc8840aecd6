"""Real model configs on the meta device: parameter counts and the adapters' structure."""

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from real_configs import CLIP_L_TEXT, FLUX1_DEV_TRANSFORMER, FLUX1_VAE, SD14_UNET, SD14_VAE, T5_XXL

from erasekit.models import FamilyAdapter
from erasekit.models.flux import FluxAdapter
from erasekit.models.sd_unet import SDUNetAdapter


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


def test_released_text_encoders_and_autoencoders():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def count(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        assert count(CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))) == 123_060_480
        assert count(T5EncoderModel(T5Config(**T5_XXL))) == 4_762_310_656
        assert count(AutoencoderKL(**SD14_VAE)) == 83_653_863
        assert count(AutoencoderKL(**FLUX1_VAE)) == 83_819_683

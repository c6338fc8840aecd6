"""Original-layout SD checkpoints (erasekit.edits.formats.single_file): the file stock diffusers'
from_single_file reads back, offline, into the same pipeline (same weights, same images); the real
SD 1.4 structure's well-known key names; pipelines the layout cannot hold are refused in one line."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline
from transformers import CLIPTextConfig, CLIPTextModel

from erasekit.edits import Edit, apply, remove, weight_delta
from erasekit.edits.formats.single_file import (
    CheckpointLayoutError,
    save_sd_checkpoint,
    sd_checkpoint_state,
)
from erasekit.models import adapter_for, load_pipeline

PROMPTS = ["a photo of a red car", "a blue square in the park"]
SEEDS = [3, 11]
MODELS = ("unet", "vae", "text_encoder")
SD14_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_UNET = SD14_UNET | dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def _config_folder(pipe, folder):
    """``pipe`` saved with save_pretrained, its weight files deleted: configs, tokenizer, scheduler
    only, so whatever weights a pipeline read from it has come from the checkpoint."""
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    return folder


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _round_trip(pipe, tmp_path):
    path = save_sd_checkpoint(pipe, tmp_path / "model.safetensors")
    config = _config_folder(pipe, tmp_path / "config")
    back = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    back.set_progress_bar_config(disable=True)
    back.erasekit_defaults = dict(pipe.erasekit_defaults)
    return back


def _same_weights(pipe, back):
    for name in MODELS:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def _max_image_diff(pipe, back, steps=None):
    """Max abs difference of the two pipelines' images at the same seeds, after 8-bit rounding."""
    a = adapter_for(pipe).generate(PROMPTS, SEEDS, steps=steps)
    b = adapter_for(back).generate(PROMPTS, SEEDS, steps=steps)
    diff = ((a * 255).round() - (b * 255).round()).abs().max().item() / 255
    print(f"max image diff after 8-bit rounding: {diff:.6f} ({diff * 255:.0f}/255)")
    return diff


def test_tiny_pipeline_reads_back_through_stock_from_single_file(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    back = _round_trip(pipe, tmp_path)
    assert type(back.scheduler) is type(pipe.scheduler)
    assert _public(back.scheduler.config) == _public(pipe.scheduler.config)
    assert back.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert back.safety_checker is None
    _same_weights(pipe, back)
    assert _max_image_diff(pipe, back) <= 1 / 255


def test_shipped_toy_sd_pipeline_reads_back(tmp_path):
    pipe = load_pipeline("toy:sd")
    pipe.set_progress_bar_config(disable=True)
    back = _round_trip(pipe, tmp_path)
    assert back.vae.config.scaling_factor == pipe.vae.config.scaling_factor  # from config=, not the file
    assert back.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    _same_weights(pipe, back)
    assert _max_image_diff(pipe, back, steps=10) <= 1 / 255


def test_every_weight_appears_exactly_once():
    pipe = tiny_sd_pipeline(seed=0)
    state = sd_checkpoint_state(pipe.unet, pipe.vae, pipe.text_encoder)
    tensors = [t for name in MODELS for t in getattr(pipe, name).state_dict().values()]
    assert len(state) == len(tensors)
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in tensors)
    pointers = {t.data_ptr() for t in state.values()}
    assert len(pointers) == len(state) and pointers == {t.data_ptr() for t in tensors}  # the same tensors, once each
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in state)


def _sd14_models(unet_config=SD14_UNET):
    with torch.device("meta"):  # the real sizes without their memory
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                vocab_size=49408,
            )
        )
    return unet, vae, text


def test_sd14_structure_has_the_original_key_names():
    unet, vae, text = _sd14_models()
    state = sd_checkpoint_state(unet, vae, text)
    expected = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # upsampler, no attention
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # upsampler after attention
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    }
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected
    counts = {p: sum(k.startswith(p) for k in state) for p in ("model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    assert infer_diffusers_model_type(state) == "v1"


@pytest.mark.parametrize("unet_config", [SD14_UNET, SD2_UNET], ids=["sd14", "sd2"])
def test_diffusers_converters_map_the_real_structures_back(unet_config):
    """diffusers' own original-layout -> diffusers conversion gives back every name and shape."""
    unet, vae, text = _sd14_models(unet_config)
    state = sd_checkpoint_state(unet, vae, text)
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        converted = convert(state, dict(model.config))
        assert {k: tuple(v.shape) for k, v in converted.items()} == {
            k: tuple(v.shape) for k, v in model.state_dict().items()
        }


def test_fp16_and_metadata(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    path = save_sd_checkpoint(pipe, tmp_path / "half.safetensors", metadata={"concept": "car"}, dtype="fp16")
    loaded = load_file(path)
    state = sd_checkpoint_state(pipe.unet, pipe.vae, pipe.text_encoder)
    assert loaded.keys() == state.keys()
    assert all(t.dtype == torch.float16 for t in loaded.values())
    assert all(torch.equal(loaded[k], state[k].half()) for k in state)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"concept": "car"}


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    pipe = tiny_sd_pipeline(seed=0)
    path = save_sd_checkpoint(pipe, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_sd_checkpoint(pipe, path, dtype=torch.float16)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_flux_and_other_unets_are_refused_in_one_line(tmp_path):
    flux = tiny_flux_pipeline()
    cases = [
        lambda: save_sd_checkpoint(flux, tmp_path / "flux.safetensors"),
        lambda: sd_checkpoint_state(flux.transformer, flux.vae, flux.text_encoder),
        lambda: sd_checkpoint_state(UNet2DConditionModel(**_tiny_unet(class_embed_type="timestep")), None, None),
        lambda: sd_checkpoint_state(
            UNet2DConditionModel(**_tiny_unet(up_block_types=("CrossAttnUpBlock2D",) * 3)), None, None
        ),
        lambda: save_sd_checkpoint(tiny_sd_pipeline(), tmp_path / "model.ckpt"),
    ]
    for case in cases:
        with pytest.raises(ValueError) as caught:
            case()
        assert isinstance(caught.value, CheckpointLayoutError)
        assert "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def _tiny_unet(**changes):
    return _public(json.loads(json.dumps(dict(tiny_sd_pipeline().unet.config)))) | changes


def test_weight_edits_are_written_merged_and_hook_edits_refused(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    name, param = next(iter(adapter_for(pipe).parameter_group("cross_attn").items()))
    key = _checkpoint_key(pipe, param)
    original, delta = param.detach().clone(), torch.full_like(param, 0.25)
    edit = Edit("test", ["car"], "sd", "tiny", {weight_delta.delta_key(name): delta}, kind="weight_delta")
    apply(pipe, edit)
    path = save_sd_checkpoint(pipe, tmp_path / "edited.safetensors")
    remove(pipe, edit)
    assert torch.equal(load_file(path)[key], original + delta)

    settings = {"hook": "keyword_zeroing", "keyword_list": ["car"], "case_variants": True}
    hook = Edit("test", ["car"], "sd", "tiny", {}, settings, kind="inference_hook")
    apply(pipe, hook)
    with pytest.raises(CheckpointLayoutError, match="remove it"):
        save_sd_checkpoint(pipe, tmp_path / "hooked.safetensors")
    remove(pipe, hook)
    assert not (tmp_path / "hooked.safetensors").exists()


def _checkpoint_key(pipe, param):
    """The checkpoint key that holds the tensor ``param``."""
    state = sd_checkpoint_state(pipe.unet, pipe.vae, pipe.text_encoder)
    return next(k for k, t in state.items() if t.data_ptr() == param.data_ptr())

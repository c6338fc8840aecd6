"""load_pipeline / adapter_for: real loading path, family checks before weights, defaults."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import TINY_DEFAULTS, tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.models import (
    FamilyAdapter,
    UnsupportedPipelineError,
    adapter_for,
    load_pipeline,
    write_defaults,
)
from erasekit.models.flux import FluxAdapter
from erasekit.models.sd_unet import SDUNetAdapter


@pytest.mark.parametrize(
    "build, adapter_cls",
    [(tiny_sd_pipeline, SDUNetAdapter), (tiny_flux_pipeline, FluxAdapter)],
)
def test_saved_tiny_pipeline_loads_and_generates(tmp_path, build, adapter_cls):
    pipe = build()
    pipe.save_pretrained(tmp_path)
    write_defaults(tmp_path, {**TINY_DEFAULTS, "num_inference_steps": 2})

    loaded = load_pipeline(tmp_path)
    adapter = adapter_for(loaded)
    assert isinstance(adapter, adapter_cls)
    assert adapter is adapter_for(loaded)  # cached
    assert (adapter.default_height, adapter.default_width) == (32, 32)
    assert adapter.generation_steps == adapter.default_steps == 2
    if adapter.family == "flux":
        assert adapter.max_sequence_length == TINY_DEFAULTS["max_sequence_length"]

    images = adapter.generate(["a red car", "a teddy bear in the garden"], seeds=[0, 1])
    assert images.shape == (2, 3, 32, 32)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    # Same weights, same seeds -> the loaded pipeline reproduces the original.
    original = adapter_for(pipe).generate(["a red car"], seeds=[0], steps=2)
    torch.testing.assert_close(images[:1], original, atol=1e-5, rtol=0)


def _write_index(folder, index):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD3_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Right class name, wrong parts: an SDXL UNet saved under the SD 1.x pipeline class.
SD_WITH_TWO_ENCODERS = {**SDXL_INDEX, "_class_name": "StableDiffusionPipeline"}


@pytest.mark.parametrize(
    "index, must_name",
    [
        (SDXL_INDEX, ["StableDiffusionXLPipeline", "text_encoder_2", "UNet2DConditionModel", "SDXL"]),
        (SD3_INDEX, ["StableDiffusion3Pipeline", "SD3Transformer2DModel", "text_encoder_3", "SD3"]),
        (SD_WITH_TWO_ENCODERS, ["StableDiffusionPipeline", "text_encoder_2"]),
    ],
)
def test_unsupported_pipelines_rejected_before_weights(tmp_path, monkeypatch, index, must_name):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not be loaded for an unsupported pipeline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_weights)
    folder = _write_index(tmp_path / "model", index)
    with pytest.raises(UnsupportedPipelineError) as err:
        load_pipeline(folder)
    message = str(err.value)
    for name in must_name + ["StableDiffusionPipeline", "FluxPipeline"]:  # found + supported
        assert name in message
    assert isinstance(err.value, ValueError)


def test_missing_folder_or_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        load_pipeline(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(empty)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_pipeline(file)


def test_adapter_for_rejects_an_unsupported_loaded_pipeline():
    class StableDiffusion3Pipeline:  # stands in for a loaded SD3 pipeline
        components = {"transformer": torch.nn.Linear(1, 1), "text_encoder_3": torch.nn.Linear(1, 1)}

    with pytest.raises(UnsupportedPipelineError, match="StableDiffusion3Pipeline"):
        adapter_for(StableDiffusion3Pipeline())


def test_unknown_defaults_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown erasekit defaults"):
        write_defaults(tmp_path, {"steps": 3})
    with pytest.warns(UserWarning, match="unknown erasekit defaults"):
        adapter = SDUNetAdapter(tiny_sd_pipeline(), defaults={"steps": 3, "height": 64})
    assert adapter.default_height == 64  # the known keys still apply


def test_rollout_defaults_can_differ_from_generation_defaults():
    pipe = tiny_sd_pipeline()
    pipe.erasekit_defaults = {"num_inference_steps": 20, "guidance": 4.0, "rollout_steps": 10}
    adapter = SDUNetAdapter(pipe)
    assert (adapter.generation_steps, adapter.generation_guidance) == (20, 4.0)
    assert (adapter.default_steps, adapter.default_guidance) == (10, 4.0)
    # Without a defaults file: the ESD recipe and the stock pipeline defaults.
    pipe.erasekit_defaults = {}
    plain = SDUNetAdapter(pipe)
    assert (plain.default_steps, plain.default_guidance) == (50, 3.0)
    assert plain.prediction == "epsilon" and plain.family == "sd"


def test_for_denoiser_dispatches_on_the_denoiser_class(sd_pipe, flux_pipe):
    assert isinstance(FamilyAdapter.for_denoiser(sd_pipe.unet), SDUNetAdapter)
    assert isinstance(FamilyAdapter.for_denoiser(flux_pipe.transformer), FluxAdapter)
    with pytest.raises(UnsupportedPipelineError, match="Linear"):
        FamilyAdapter.for_denoiser(torch.nn.Linear(2, 2))
    bare = FamilyAdapter.for_denoiser(sd_pipe.unet)
    with pytest.raises(RuntimeError, match="full pipeline"):
        bare.encode(["a car"])

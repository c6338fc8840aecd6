"""``erasekit export``: every edit kind with weights leaves erasekit in each format, and stock
diffusers loading the files gives erasekit's images (exact kinds) or the distilled LoRA's
(Receler); inference-time edits and bad outputs are refused with one line."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.cli import main
from erasekit.edits import Edit, apply, load_edit, lora, output_adapter, remove, weight_delta
from erasekit.export import LORA_WEIGHTS, RECORD, ExportError, export
from erasekit.methods import receler
from erasekit.methods.distill import _Moments, distil_to_lora, distil_to_text_lora, reduced_rank_fit
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
PROMPTS, SEEDS = ["a photo of a red car", "a circle in the park"], [0, 1]


def _lora_edit(adapter, seed=0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    prefix = lora.lora_prefix(adapter)
    tensors = {}
    for p in adapter.attachment_points("text_proj")[:3]:
        tensors[f"{prefix}.{p.name}.lora_A.weight"] = torch.randn(4, p.in_features, generator=g) * 0.4
        tensors[f"{prefix}.{p.name}.lora_B.weight"] = torch.randn(p.width, 4, generator=g) * 0.4
    return Edit("eraseanything", ["car"], adapter.family, "tiny", tensors, kind="lora")


def _delta_edit(adapter, seed=0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    params = [(n, p) for n, p in adapter.parameter_group("cross_attn").items() if p.dim() == 2][:4]
    tensors = {weight_delta.delta_key(n): torch.randn(p.shape, generator=g) * 0.1 for n, p in params}
    return Edit("uce", ["car"], adapter.family, "tiny", tensors, kind="weight_delta")


def _receler_edit(adapter, seed=0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    erasers = {p.name: output_adapter.Eraser(p.width, 4) for p in receler.eraser_points(adapter, extra=True)}
    for e in erasers.values():
        with torch.no_grad():
            e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=g) * 0.05)
    tensors = {k: v.clone() for k, v in output_adapter.eraser_tensors(erasers).items()}
    return Edit("receler", ["car"], adapter.family, "tiny", tensors, kind="output_adapter")


def _images(pipe, edit=None) -> torch.Tensor:
    if edit is not None:
        apply(pipe, edit)
    try:
        return adapter_for(pipe).generate(PROMPTS, SEEDS)
    finally:
        if edit is not None:
            remove(pipe, edit)


def _stock_images(pipe) -> torch.Tensor:
    """Images of a pipeline loaded by stock diffusers, sampled as the tiny pipelines are."""
    pipe.erasekit_defaults = tiny_sd_pipeline().erasekit_defaults
    return adapter_for(pipe).generate(PROMPTS, SEEDS)


def _diff_8bit(a, b) -> float:
    return ((a * 255).round() - (b * 255).round()).abs().max().item() / 255


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_lora_edit_as_a_diffusers_lora_folder_loads_in_stock_diffusers(family, tmp_path):
    pipe = BUILDERS[family]()
    edit = _lora_edit(adapter_for(pipe))
    record = export(edit, pipe, "diffusers-lora", tmp_path / "out", progress=False)
    assert record["relative_error"] == 0.0 and (tmp_path / "out" / LORA_WEIGHTS).is_file()
    stock = BUILDERS[family]()
    stock.load_lora_weights(str(tmp_path / "out"))  # the default weight name: no argument needed
    assert _diff_8bit(adapter_for(stock).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), edit)) <= 1 / 255


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_weight_delta_edit_as_a_kohya_file_at_full_rank_gives_the_edit_images(family, tmp_path):
    pipe = BUILDERS[family]()
    edit = _delta_edit(adapter_for(pipe))
    record = export(edit, pipe, "kohya", tmp_path / "uce.safetensors", rank=64, progress=False)
    assert record["relative_error"] < 1e-5, record["relative_error"]
    stock = BUILDERS[family]()
    stock.load_lora_weights(str(tmp_path), weight_name="uce.safetensors")
    assert _diff_8bit(adapter_for(stock).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), edit)) <= 1 / 255


def test_a_low_rank_svd_records_its_error(tmp_path):
    pipe = tiny_sd_pipeline()
    edit = _delta_edit(adapter_for(pipe))
    full = export(edit, pipe, "diffusers-lora", tmp_path / "full", rank=64, progress=False)
    low = export(edit, pipe, "diffusers-lora", tmp_path / "low", rank=1, progress=False)
    assert full["relative_error"] < 1e-5 < low["relative_error"] < 1
    on_disk = json.loads((tmp_path / "low" / RECORD).read_text())
    assert on_disk["relative_error"] == pytest.approx(low["relative_error"]) and on_disk["rank"] == 1


def test_deltas_a_lora_cannot_carry_are_left_out_and_counted_in_the_error(tmp_path):
    pipe = tiny_flux_pipeline()
    adapter = adapter_for(pipe)
    edit = _delta_edit(adapter)
    bias = next(n for n, p in adapter.parameter_group("cross_attn").items() if p.dim() == 1)
    edit.tensors[weight_delta.delta_key(bias)] = torch.ones_like(adapter.parameter_group("cross_attn")[bias])
    record = export(edit, pipe, "diffusers-lora", tmp_path / "out", progress=False)
    assert list(record["dropped"]) == [bias] and 0 < record["relative_error"] < 1


def test_a_weight_delta_edit_merged_loads_as_a_stock_pipeline_and_a_single_file(tmp_path):
    pipe = tiny_sd_pipeline()
    edit = _delta_edit(adapter_for(pipe))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    record = export(edit, pipe, "merged", tmp_path / "merged", progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # the pipeline is as it was
    expected = _images(tiny_sd_pipeline(), edit)
    folder = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert _diff_8bit(_stock_images(folder), expected) <= 1 / 255
    single = tmp_path / "merged" / "merged.safetensors"
    assert str(single) in record["files"]
    config = tmp_path / "config"
    tiny_sd_pipeline().save_pretrained(config)
    back = StableDiffusionPipeline.from_single_file(str(single), config=str(config), local_files_only=True)
    assert _diff_8bit(_stock_images(back), expected) <= 1 / 255


def test_a_lora_edit_merged_gives_its_images(tmp_path):
    pipe = tiny_flux_pipeline()
    edit = _lora_edit(adapter_for(pipe))
    export(edit, pipe, "merged", tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "m.safetensors").exists()  # original-layout checkpoints are SD-only
    folder = DiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert _diff_8bit(_stock_images(folder), _images(tiny_flux_pipeline(), edit)) <= 1 / 255


def test_reduced_rank_fit_recovers_a_low_rank_map_and_reports_the_residual():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)
    x = torch.randn(400, 5, generator=g)
    m = _Moments(5, 6)
    m.add(x, x @ true.T)
    a, b, rel = reduced_rank_fit(m, 2, ridge=0.0)
    assert torch.allclose((b @ a).float(), true, atol=1e-5) and rel < 1e-6
    a1, b1, rel1 = reduced_rank_fit(m, 1, ridge=0.0)
    fitted = x.double() @ (b1 @ a1).T
    direct = float((fitted - x.double() @ true.double().T).norm() / (x.double() @ true.double().T).norm())
    assert rel1 == pytest.approx(direct, rel=1e-6) and rel1 > 0.05


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_receler_edit_is_distilled_into_a_lora_that_follows_its_erasers(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    edit = _receler_edit(adapter)
    distilled, report = distil_to_lora(
        pipe, edit, ["a photo of a car"], ["", "a circle in the park"], rank=8, progress=False
    )
    assert distilled.kind == "lora" and distilled.hyperparameters["distilled_from"] == edit.id
    assert report["relative_residual"] < 0.35, report["relative_residual"]
    carriers = {k.rsplit(".lora_", 1)[0] for k in distilled.tensors}
    expected = {f"{lora.lora_prefix(adapter)}.{p.name}.to_out.0" for p in adapter.attachment_points("attn_out")}
    expected |= {
        f"transformer.{p.name.rsplit('.', 1)[0]}.proj_out" for p in adapter.attachment_points("attn_out_extra")
    }
    assert carriers == expected
    # the LoRA moves the prediction the way the erasers do, much more than it differs from them
    x = adapter.sample_noise(1, generator=torch.Generator().manual_seed(3))
    t = adapter.sample_timesteps(1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = adapter.encode(["a photo of a car"])
        base = adapter.predict(x, t, cond)
        apply(pipe, edit)
        by_erasers = adapter.predict(x, t, cond)
        remove(pipe, edit)
        apply(pipe, distilled)
        by_lora = adapter.predict(x, t, cond)
        remove(pipe, distilled)
    assert (by_lora - by_erasers).norm() < 0.5 * (by_erasers - base).norm()
    # exported as a kohya file (SD) or diffusers folder (Flux), stock loading gives the distilled LoRA's images
    per_layer = {"distill_rank": 8, "distill_into": "attention-output", "progress": False}
    if family == "sd":
        record = export(edit, pipe, "kohya", tmp_path / "r.safetensors", **per_layer)
        stock = BUILDERS[family]()
        stock.load_lora_weights(str(tmp_path), weight_name="r.safetensors")
    else:
        record = export(edit, pipe, "diffusers-lora", tmp_path / "r", **per_layer)
        stock = BUILDERS[family]()
        stock.load_lora_weights(str(tmp_path / "r"))
    assert "distilled" in record["approximation"] and 0 < record["relative_error"] < 0.35
    # the export distils on its own prompts (the lexicon's), so compare with the file's own LoRA
    loaded = Edit("receler-distilled", ["car"], family, "tiny", _file_lora(tmp_path, family), kind="lora")
    assert _diff_8bit(adapter_for(stock).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), loaded)) <= 1 / 255


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_receler_edit_distilled_end_to_end_into_the_prompts_keys_and_values(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    edit = _receler_edit(adapter)
    distilled, report = distil_to_text_lora(
        pipe, edit, ["a photo of a car"], ["a circle in the park"], rank=4, steps=4, iterations=60, progress=False
    )
    assert distilled.kind == "lora" and distilled.hyperparameters["distilled_from"] == edit.id
    modules = {k.rsplit(".lora_", 1)[0].split(".", 1)[1] for k in distilled.tensors}
    assert modules == set(report["targets"]) and modules
    assert all(m.rsplit(".", 1)[1] in {"to_k", "to_v", "add_k_proj", "add_v_proj"} for m in modules)
    # 2 prompts + "" (added), 2 seeds, 4 states, the prompt's branch and the empty one ("" once)
    assert report["examples"] == (2 * 2 + 1) * 2 * 4
    # trained: much closer to the erasers' predictions than the base model is
    assert report["relative_residual"] < 0.8, report
    assert report["loss"][1] < report["loss"][0]
    # the model is left as it was, and the LoRA file loads in stock diffusers
    assert not any("lora" in n for n, _ in adapter.denoiser.named_modules())
    distilled.save(tmp_path / "e")
    stock = BUILDERS[family]()
    stock.load_lora_weights(str(tmp_path / "e"), weight_name="edit.safetensors")
    assert _diff_8bit(adapter_for(stock).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), distilled)) <= 1 / 255


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_export_distils_into_keys_values_and_outputs_a_kohya_file_stock_diffusers_loads(family, tmp_path, monkeypatch):
    _shorter_distillation(monkeypatch)
    pipe = BUILDERS[family]()
    edit = _receler_edit(adapter_for(pipe))
    into = "prompt-keys-values+attention-output"
    record = export(edit, pipe, "kohya", tmp_path / "k.safetensors", distill_rank=4, distill_into=into, progress=False)
    assert "output projections" in record["approximation"], record["approximation"]
    # the prompt's keys and values, and one more LoRA after each eraser: its attention's output
    # projection (Flux single-stream: the block's proj_out)
    targets = set(record["distill"]["targets"])
    text = {m for m in targets if m.rsplit(".", 1)[1] in {"to_k", "to_v", "add_k_proj", "add_v_proj"}}
    points = output_adapter.erasers_from_tensors(edit.tensors)
    after = {p.rsplit(".", 1)[0] + ".proj_out" if p.startswith("single_") else p + ".to_out.0" for p in points}
    assert text and targets - text == after
    assert any(m.endswith("proj_out") for m in after) == (family == "flux")
    kohya = BUILDERS[family]()
    kohya.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    export(edit, pipe, "diffusers-lora", tmp_path / "r", distill_rank=4, distill_into=into, progress=False)
    folder = load_file(str(tmp_path / "r" / LORA_WEIGHTS))  # the same fit, as a diffusers folder
    loaded = Edit("receler-distilled", ["car"], family, "tiny", folder, kind="lora")
    assert _diff_8bit(adapter_for(kohya).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), loaded)) <= 1 / 255


def _shorter_distillation(monkeypatch) -> list[dict]:
    """Make the export's end-to-end distillation (its own prompts) a shorter fit; returns the
    keyword arguments of each call."""
    from erasekit.methods import distill

    real = distill.distil_to_text_lora
    calls = []

    def short(*a, **k):
        calls.append(k)
        return real(*a, **(k | {"iterations": 20, "steps": 3, "states": 2}))

    monkeypatch.setattr(distill, "distil_to_text_lora", short)
    return calls


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_export_distils_a_receler_edit_end_to_end_by_default_into_a_kohya_file(family, tmp_path, monkeypatch):
    calls = _shorter_distillation(monkeypatch)
    pipe = BUILDERS[family]()
    edit = _receler_edit(adapter_for(pipe))
    record = export(edit, pipe, "kohya", tmp_path / "k.safetensors", distill_rank=4, progress=False)
    assert len(calls) == 1 and "keys and values" in record["approximation"] and 0 < record["relative_error"] < 1.5
    kohya = BUILDERS[family]()
    kohya.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    if family == "sd":  # the same file, read back as diffusers-layout factors
        (tmp_path / "k.safetensors").rename(tmp_path / "r.safetensors")
    else:  # the same fit (same seeds) as a diffusers folder
        export(edit, pipe, "diffusers-lora", tmp_path / "r", distill_rank=4, progress=False)
    loaded = Edit("receler-distilled", ["car"], family, "tiny", _file_lora(tmp_path, family), kind="lora")
    assert _diff_8bit(adapter_for(kohya).generate(PROMPTS, SEEDS), _images(BUILDERS[family](), loaded)) <= 1 / 255


def _file_lora(tmp_path, family):
    from safetensors.torch import load_file

    if family == "flux":
        return load_file(str(tmp_path / "r" / LORA_WEIGHTS))
    from erasekit.edits.formats.kohya import DOWN, UP

    kohya = load_file(str(tmp_path / "r.safetensors"))
    names = {n: m for n, m in tiny_sd_pipeline().unet.named_modules()}
    out = {}
    for key, v in kohya.items():
        if key.endswith(DOWN):
            layer = key[: -len(DOWN)][len("lora_unet_") :]
            module = next(n for n in names if n.replace(".", "_") == layer)
            out[f"unet.{module}.lora_A.weight"] = v
            out[f"unet.{module}.lora_B.weight"] = kohya[key[: -len(DOWN)] + UP]
    return out


def test_inference_time_edits_and_bad_outputs_are_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    hook = Edit(
        "keyword_zeroing",
        ["car"],
        "sd",
        "tiny",
        {},
        {"hook": "keyword_zeroing", "keyword_list": ["car"]},
        kind="inference_hook",
    )
    with pytest.raises(ExportError, match="acts at inference time"):
        export(hook, pipe, "kohya", tmp_path / "k.safetensors")
    edit = _lora_edit(adapter_for(pipe))
    with pytest.raises(ExportError, match="one .safetensors file"):
        export(edit, pipe, "kohya", tmp_path / "k.bin")
    with pytest.raises(ExportError, match="unknown export format"):
        export(edit, pipe, "ckpt", tmp_path / "x")
    with pytest.raises(ExportError, match="made for 'sd'"):
        export(edit, tiny_flux_pipeline(), "diffusers-lora", tmp_path / "x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="mine"):
        export(edit, pipe, "diffusers-lora", mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    export(edit, pipe, "diffusers-lora", tmp_path / "again", progress=False)
    with pytest.raises(Exception, match="again"):
        export(edit, pipe, "diffusers-lora", tmp_path / "again")  # an earlier export: only with overwrite
    export(edit, pipe, "diffusers-lora", tmp_path / "again", overwrite=True, progress=False)


def test_the_export_command_writes_a_kohya_file(tmp_path, capsys):
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    edit = _lora_edit(adapter_for(pipe))
    edit.save(tmp_path / "edit")
    out = tmp_path / "edit.safetensors"
    assert (
        main(
            [
                "export",
                str(tmp_path / "edit"),
                "--model",
                str(tmp_path / "model"),
                "--format",
                "kohya",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file() and "relative error 0.0000" in capsys.readouterr().out
    assert (
        main(
            [
                "export",
                str(tmp_path / "edit"),
                "--model",
                str(tmp_path / "model"),
                "--format",
                "kohya",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err
    assert load_edit(tmp_path / "edit").id == edit.id

"""The edit kinds (erasekit.edits): each attaches, scales and detaches bit for bit; edits saved
before edit.json recorded the kind still apply; the package stays below the methods."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline
from transformers import CLIPTextModel

from erasekit.edits import (
    KINDS,
    Edit,
    apply,
    export_merged,
    kind_of,
    load_edit,
    lora,
    output_adapter,
    remove,
    weight_delta,
)
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
PROMPT = "a photo of a car"


def _randn(shape, g, std=0.1):
    return torch.randn(shape, generator=g) * std


def _output_adapter_edit(adapter, g):
    erasers = {p.name: output_adapter.Eraser(p.width, 4) for p in output_adapter.points(adapter)[:2]}
    for e in erasers.values():
        with torch.no_grad():
            e.up.weight.copy_(_randn(e.up.weight.shape, g))
    return {k: v.clone() for k, v in output_adapter.eraser_tensors(erasers).items()}, {}


def _weight_delta_edit(adapter, g):
    params = list(adapter.parameter_group("cross_attn").items())[:3]
    return {weight_delta.delta_key(n): _randn(p.shape, g) for n, p in params}, {}


def _lora_edit(adapter, g):
    prefix = lora.lora_prefix(adapter)
    tensors = {}
    for p in adapter.attachment_points("text_proj")[:2]:
        tensors[f"{prefix}.{p.name}.lora_A.weight"] = _randn((4, p.in_features), g, 0.5)
        tensors[f"{prefix}.{p.name}.lora_B.weight"] = _randn((p.width, 4), g, 0.5)
    return tensors, {}


def _safe_guidance_edit(adapter, g):
    settings = {
        "negative_prompt": "",
        "warmup_steps": 0,
        "guidance_scale": 1000.0,
        "threshold": 0.01,
        "momentum_scale": 0.3,
        "mom_beta": 0.4,
    }
    return {}, settings | {"hook": "safe_guidance", "safety_concept": "car"}


def _keyword_zeroing_edit(adapter, g):
    return {}, {"hook": "keyword_zeroing", "keyword_list": ["car"], "case_variants": True}


def _safree_edit(adapter, g):
    from erasekit.methods import make_config

    return {}, vars(make_config("safree", "paper")) | {"hook": "safree", "keyword_list": ["car"]}


MAKERS = {
    "output_adapter": ("output_adapter", _output_adapter_edit),
    "weight_delta": ("weight_delta", _weight_delta_edit),
    "lora": ("lora", _lora_edit),
    "safe_guidance": ("inference_hook", _safe_guidance_edit),
    "keyword_zeroing": ("inference_hook", _keyword_zeroing_edit),
    "safree": ("inference_hook", _safree_edit),
}


def _make(case, adapter, seed=0):
    kind, maker = MAKERS[case]
    tensors, hp = maker(adapter, torch.Generator().manual_seed(seed))
    return Edit("test", ["car"], adapter.family, "tiny", tensors, hp, kind=kind)


def _out(adapter, x, t):
    with torch.no_grad():  # encoded on every call: keyword zeroing recognises prompts encoded while attached
        return adapter.predict(x, t, adapter.encode([PROMPT]))


def _snapshot(adapter):
    den = adapter.denoiser
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in den.modules())
    return {k: v.clone() for k, v in den.state_dict().items()}, hooks, [type(m) for m in den.modules()]


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("case", list(MAKERS))
def test_attach_scale_detach_restores_the_model_bit_for_bit(case, family):
    adapter = adapter_for(BUILDERS[family]())
    g = torch.Generator().manual_seed(0)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    base = _out(adapter, x, t)
    state, hooks, structure = _snapshot(adapter)
    edit = _make(case, adapter)
    assert kind_of(edit) is KINDS[MAKERS[case][0]]

    handle = kind_of(edit).attach(adapter, edit, 1.0)
    edited = _out(adapter, x, t)
    assert (edited - base).abs().max() > 1e-5
    with adapter.edits_disabled():
        assert torch.equal(_out(adapter, x, t), base)
    handle.set_scale(0.0)
    assert torch.equal(_out(adapter, x, t), base)
    handle.set_scale(0.5)
    half = _out(adapter, x, t)
    assert not torch.equal(half, base) and not torch.equal(half, edited)
    handle.set_scale(1.0)
    assert torch.equal(_out(adapter, x, t), edited)
    handle.detach()

    assert torch.equal(_out(adapter, x, t), base)
    after, after_hooks, after_structure = _snapshot(adapter)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert after_hooks == hooks and after_structure == structure
    stack = adapter.edit_stack
    assert not stack.attached and not stack.kinds and not stack.switches


@pytest.mark.parametrize("case", [c for c in MAKERS if c != "safree"])  # SAFREE edits always had a kind
def test_apply_records_the_kind_and_old_edit_folders_without_it_still_apply(case, tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    g = torch.Generator().manual_seed(0)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    base = _out(adapter, x, t)
    legacy_method = {
        "output_adapter": "receler",
        "weight_delta": "uce",
        "lora": "eraseanything",
        "safe_guidance": "sld",
        "keyword_zeroing": "keyword_zeroing",
    }[case]
    edit = _make(case, adapter)
    edit.method = legacy_method
    edit.save(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "edit.json").read_text())
    assert meta["kind"] == MAKERS[case][0]
    apply(pipe, load_edit(tmp_path / "e"))
    edited = _out(adapter, x, t)
    assert adapter.edit_stack.attached
    remove(pipe, edit)
    assert torch.equal(_out(adapter, x, t), base)

    del meta["kind"]  # as written before edit.json recorded kinds
    meta["hyperparameters"].pop("hook", None)
    (tmp_path / "e" / "edit.json").write_text(json.dumps(meta))
    old = load_edit(tmp_path / "e")
    assert old.kind == MAKERS[case][0]
    apply(pipe, old)
    assert torch.equal(_out(adapter, x, t), edited)
    remove(pipe, old)
    assert torch.equal(_out(adapter, x, t), base)


def test_an_unknown_kind_is_refused_naming_the_known_ones():
    pipe = tiny_sd_pipeline()
    edit = Edit("someday", ["car"], "sd", "tiny", {})
    assert edit.kind == ""
    with pytest.raises(ValueError, match="weight_delta"):
        apply(pipe, edit)
    hook = Edit("someday", ["car"], "sd", "tiny", {}, {"hook": "nothing"}, kind="inference_hook")
    with pytest.raises(ValueError, match="safe_guidance"):
        apply(pipe, hook)
    assert not adapter_for(pipe).edit_stack.attached


def test_weight_deltas_on_the_text_encoder(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    g = torch.Generator().manual_seed(0)
    name, param = next((n, p) for n, p in pipe.text_encoder.named_parameters() if n.endswith("mlp.fc1.weight"))
    den_name, den_param = next(iter(adapter.parameter_group("cross_attn").items()))
    before, den_before = param.detach().clone(), den_param.detach().clone()
    base = adapter.encode([PROMPT]).embeds
    tensors = {
        weight_delta.delta_key(name, "text_encoder"): _randn(param.shape, g),
        weight_delta.delta_key(den_name): _randn(den_param.shape, g),
    }
    edit = Edit("future", ["car"], "sd", "tiny", tensors, kind="weight_delta")
    apply(pipe, edit)
    assert weight_delta.attached_parameters(adapter) == {den_name, f"text_encoder:{name}"}
    edited = adapter.encode([PROMPT]).embeds
    assert (edited - base).abs().max() > 1e-5
    with adapter.edits_disabled():
        assert torch.equal(adapter.encode([PROMPT]).embeds, base)
    folder = export_merged(pipe, edit, tmp_path / "merged")
    assert torch.equal(adapter.encode([PROMPT]).embeds, edited)  # the pipeline is left as it was
    stock = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert torch.equal(stock.state_dict()[name], param.detach())
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    remove(pipe, edit)
    assert torch.equal(param, before) and torch.equal(den_param, den_before)
    assert torch.equal(adapter.encode([PROMPT]).embeds, base)
    with pytest.raises(ValueError, match="components this pipeline lacks"):
        apply(pipe, Edit("future", ["car"], "sd", "tiny", {"delta:nowhere.w": torch.zeros(1)}, kind="weight_delta"))


def test_edits_do_not_import_the_layers_above():
    code = (
        "import sys, erasekit.edits\n"
        "from erasekit.edits import inference_hook, lora, output_adapter, weight_delta\n"
        "above = ('erasekit.methods', 'erasekit.evaluation', 'erasekit.bench', 'erasekit.cli', 'erasekit.toyworld')\n"
        "# the top-level package imports the toy world's (light) registration module, nothing under it\n"
        "bad = sorted(m for m in sys.modules if m.startswith(above) and m != 'erasekit.toyworld')\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)

"""The kohya single-file LoRA (erasekit.edits.formats.kohya): key names, stock diffusers loading
gives erasekit's own images (SD and Flux), LoRAs from weight deltas by truncated SVD, bad input."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import Edit, apply, weight_delta
from erasekit.edits.formats.kohya import lora_from_deltas, save_kohya, to_kohya
from erasekit.methods import uce
from erasekit.methods.uce import UCEConfig
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
PREFIX = {"sd": "unet", "flux": "transformer"}
PROMPTS, SEEDS = ["a photo of a red car", "a circle in the park"], [0, 1]
KOHYA_KEY = re.compile(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")


def _lora_tensors(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA factors (ranks 2 and 4, non-zero B) on the attention projections: every
    attn1 / attn2 q, k, v, out of the SD UNet; Flux's dual-stream image and text q, k, v and
    outputs, the text q of block 1 left out (a fused qkv with a missing part)."""
    g = torch.Generator().manual_seed(seed)
    den = BUILDERS[family]().components[PREFIX[family]]
    if family == "sd":
        wanted = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    else:
        wanted = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
    tensors = {}
    for i, (name, module) in enumerate(den.named_modules()):
        if not re.fullmatch(wanted, name) or name == "transformer_blocks.1.attn.add_q_proj":
            continue
        rank = 2 if i % 2 else 4
        key = f"{PREFIX[family]}.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return tensors


def _stock_images(family: str, folder, weight_name: str) -> torch.Tensor:
    pipe = BUILDERS[family]()
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return adapter_for(pipe).generate(PROMPTS, SEEDS)


def _apply_images(family: str, edit: Edit | None) -> torch.Tensor:
    pipe = BUILDERS[family]()
    if edit is not None:
        apply(pipe, edit)
    return adapter_for(pipe).generate(PROMPTS, SEEDS)


def _max_8bit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two image batches in [0, 1] after rounding to 8 bits, in [0, 1] units."""
    return ((a * 255).round() - (b * 255).round()).abs().max().item() / 255


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_lora_edit_as_a_kohya_file_loads_in_stock_diffusers_with_erasekit_images(family, tmp_path):
    tensors = _lora_tensors(family)
    edit = Edit("eraseanything", ["car"], family, "tiny", tensors, kind="lora")
    kohya = to_kohya(tensors, family)
    assert all(KOHYA_KEY.fullmatch(k) for k in kohya)
    save_kohya(tmp_path / "erase.safetensors", kohya, {"erasekit_method": "eraseanything", "erasekit_id": edit.id})

    with safe_open(str(tmp_path / "erase.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["erasekit_id"] == edit.id
    assert {k: v.shape for k, v in load_file(str(tmp_path / "erase.safetensors")).items()} == {
        k: v.shape for k, v in kohya.items()
    }

    from_stock = _stock_images(family, tmp_path, "erase.safetensors")
    from_apply = _apply_images(family, edit)
    assert _max_8bit_diff(from_stock, from_apply) <= 1 / 255
    assert (from_stock - from_apply).abs().max() < 1e-4
    assert (from_apply - _apply_images(family, None)).abs().max() > 1e-2  # the LoRA does something


def test_sd_kohya_names_are_the_module_paths_with_alpha_the_rank():
    tensors = _lora_tensors("sd")
    kohya = to_kohya(tensors, "sd")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(kohya)
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    modules = {k[len("unet.") : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_" + m.replace(".", "_") for m in modules}
    # one rank for every layer (smaller ones zero-padded: the same B A), alpha = that rank
    assert {v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")} == {4}
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    for m in modules:
        a, b = tensors[f"unet.{m}.lora_A.weight"], tensors[f"unet.{m}.lora_B.weight"]
        kname = "lora_unet_" + m.replace(".", "_")
        torch.testing.assert_close(kohya[f"{kname}.lora_up.weight"] @ kohya[f"{kname}.lora_down.weight"], b @ a)
        assert torch.equal(kohya[f"{kname}.lora_down.weight"][: a.shape[0]], a)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_text_encoder_loras_get_kohya_te_names_and_load_in_stock_diffusers(family, tmp_path):
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(0)
    pipe = BUILDERS[family]()
    tensors = {}
    for name, module in pipe.text_encoder.named_modules():
        if re.fullmatch(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.[qkvo]\w*_proj|mlp\.fc[12])", name):
            tensors[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g)
            tensors[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g)
    assert len(tensors) == 2 * 2 * 6  # two layers of q, k, v, out, fc1, fc2
    kohya = to_kohya(tensors, family)
    te = "lora_te_" if family == "sd" else "lora_te1_"
    assert f"{te}text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in kohya
    assert f"{te}text_model_encoder_layers_0_mlp_fc2.alpha" in kohya
    save_kohya(tmp_path / "te.safetensors", kohya, {})
    pipe.load_lora_weights(str(tmp_path), weight_name="te.safetensors")
    loaded = {n: m for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)}
    assert {f"text_encoder.{n}.lora_A.weight" for n in loaded} == {k for k in tensors if k.endswith("A.weight")}
    for name, m in loaded.items():
        adapter = m.active_adapters[0]
        got = m.lora_B[adapter].weight @ m.lora_A[adapter].weight * m.scaling[adapter]
        want = tensors[f"text_encoder.{name}.lora_B.weight"] @ tensors[f"text_encoder.{name}.lora_A.weight"]
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="text encoder layer"):
        to_kohya(
            {
                "text_encoder.embeddings.x.lora_A.weight": torch.ones(2, 3),
                "text_encoder.embeddings.x.lora_B.weight": torch.ones(3, 2),
            },
            family,
        )


def test_flux_fuses_q_k_v_into_the_bfl_qkv_layer_block_diagonally():
    tensors = _lora_tensors("flux")
    kohya = to_kohya(tensors, "flux")
    qkv = "lora_unet_double_blocks_1_txt_attn_qkv"
    down, up = kohya[f"{qkv}.lora_down.weight"], kohya[f"{qkv}.lora_up.weight"]
    ranks = [tensors[f"transformer.transformer_blocks.1.attn.add_{p}_proj.lora_A.weight"].shape[0] for p in "kv"]
    r = max(ranks)
    assert down.shape == (3 * r, 32) and up.shape == (3 * 32, 3 * r) and kohya[f"{qkv}.alpha"].item() == 3 * r
    assert not up[:32].any() and not down[:r].any()  # no LoRA on add_q_proj: zero part
    for i, p in enumerate("qkv"):
        key = f"transformer.transformer_blocks.1.attn.add_{p}_proj"
        want = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] if p != "q" else torch.zeros(32, 32)
        torch.testing.assert_close((up @ down)[32 * i : 32 * (i + 1)], want)
    off = up.clone()
    for i in range(3):
        off[32 * i : 32 * (i + 1), r * i : r * (i + 1)] = 0
    assert not off.any()
    assert "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight" in kohya  # to_out.0
    assert "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight" in kohya  # to_add_out


def test_flux1_single_block_linear1_splits_back_into_the_projections_in_diffusers_converter():
    """At Flux.1's widths (3072; MLP 12288) the fused linear1 (q, k, v, mlp) is what diffusers'
    kohya converter (the one load_lora_weights runs) splits into the separate LoRAs again."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for part, width, rank in (("attn.to_q", 3072, 2), ("attn.to_v", 3072, 3), ("proj_mlp", 12288, 3)):
        key = f"transformer.single_transformer_blocks.5.{part}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 3072, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g)
    kohya = to_kohya(tensors, "flux")
    assert kohya["lora_unet_single_blocks_5_linear1.lora_down.weight"].shape == (12, 3072)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    probe = torch.randn(3072, 4, generator=g)  # B A compared through a random probe: B (A probe)
    for key in tensors:
        part = key.rsplit(".lora_", 1)[0]
        b, a = back[f"{part}.lora_B.weight"], back[f"{part}.lora_A.weight"]
        want_b, want_a = tensors[f"{part}.lora_B.weight"], tensors[f"{part}.lora_A.weight"]
        torch.testing.assert_close(b @ (a @ probe), want_b @ (want_a @ probe))
    assert not back["transformer.single_transformer_blocks.5.attn.to_k.lora_B.weight"].any()


@pytest.mark.parametrize(
    "module, match",
    [
        ("single_transformer_blocks.0.attn.to_q", "Flux.1's widths"),  # the tiny model is narrower
        ("x_embedder", "outside the transformer blocks"),
        ("time_text_embed.text_embedder.linear_1", "outside the transformer blocks"),
        ("transformer_blocks.0.norm1.bogus", "cannot go into a kohya LoRA"),
    ],
)
def test_flux_layers_that_diffusers_would_drop_are_refused(module, match):
    tensors = {
        f"transformer.{module}.lora_A.weight": torch.ones(2, 32),
        f"transformer.{module}.lora_B.weight": torch.ones(32, 2),
    }
    with pytest.raises(ValueError, match=match):
        to_kohya(tensors, "flux")


def test_bad_lora_input_is_refused():
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    with pytest.raises(ValueError, match="family"):
        to_kohya({"unet.x.lora_A.weight": a, "unet.x.lora_B.weight": b}, "sdxl")
    with pytest.raises(ValueError, match="without their pair"):
        to_kohya({"unet.x.lora_A.weight": a}, "sd")
    with pytest.raises(ValueError, match="not LoRA factors"):
        to_kohya({"unet.x.weight": a}, "sd")
    with pytest.raises(ValueError, match="shapes"):
        to_kohya({"unet.x.lora_A.weight": a, "unet.x.lora_B.weight": torch.ones(8, 3)}, "sd")
    with pytest.raises(ValueError, match="component 'vae'"):
        to_kohya({"vae.x.lora_A.weight": a, "vae.x.lora_B.weight": b}, "sd")


# ---- LoRA from weight deltas ------------------------------------------------------------------


def test_a_rank_2_delta_is_reconstructed_exactly_at_rank_2_and_above():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 2, generator=g) @ torch.randn(2, 40, generator=g)
    for rank in (2, 3, 100):
        tensors, report = lora_from_deltas({"blocks.0.proj.weight": delta}, rank, "unet")
        a, b = tensors["unet.blocks.0.proj.lora_A.weight"], tensors["unet.blocks.0.proj.lora_B.weight"]
        used = min(rank, 24)
        assert a.shape == (used, 40) and b.shape == (24, used) and a.dtype == b.dtype == torch.float32
        entry = report["parameters"]["blocks.0.proj.weight"]
        assert entry["rank"] == used and entry["shape"] == [24, 40]
        assert entry["relative_error"] < 1e-6 and report["relative_error"] < 1e-6
        torch.testing.assert_close(b @ a, delta)


def test_a_truncated_full_rank_delta_reports_the_error_svd_predicts():
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(20, 30, generator=g), torch.randn(16, 8, generator=g)
    tensors, report = lora_from_deltas({"p.weight": d1, "q.weight": d2, "z.weight": torch.zeros(5, 6)}, 1, "unet")
    errors_sq, norms_sq = [], []
    for name, d in (("p", d1), ("q", d2)):
        s = np.linalg.svd(d.double().numpy(), compute_uv=False)
        predicted = np.sqrt((s[1:] ** 2).sum() / (s**2).sum())
        assert report["parameters"][f"{name}.weight"]["relative_error"] == pytest.approx(predicted, rel=1e-5)
        errors_sq.append((s[1:] ** 2).sum())
        norms_sq.append((s**2).sum())
        b, a = tensors[f"unet.{name}.lora_B.weight"], tensors[f"unet.{name}.lora_A.weight"]
        assert (torch.linalg.matrix_norm(d - b @ a) / torch.linalg.matrix_norm(d)).item() == pytest.approx(
            predicted, rel=1e-5
        )
    assert report["parameters"]["z.weight"] == {"rank": 1, "shape": [5, 6], "relative_error": 0.0}
    assert not tensors["unet.z.lora_B.weight"].any()
    assert report["relative_error"] == pytest.approx(np.sqrt(sum(errors_sq) / sum(norms_sq)), rel=1e-5)
    assert report["rank"] == 1


def test_conv_deltas_become_locon_factors():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 3, 3, 3, generator=g)  # (out, in, kh, kw): rank at most 6
    tensors, report = lora_from_deltas({"conv.weight": delta}, 8, "unet")
    a, b = tensors["unet.conv.lora_A.weight"], tensors["unet.conv.lora_B.weight"]
    assert a.shape == (6, 3, 3, 3) and b.shape == (6, 6, 1, 1)
    assert report["parameters"]["conv.weight"]["shape"] == [6, 3, 3, 3] and report["relative_error"] < 1e-6
    torch.testing.assert_close((b.flatten(1) @ a.flatten(1)).reshape(delta.shape), delta)
    _, cut = lora_from_deltas({"conv.weight": delta}, 1, "unet")
    s = np.linalg.svd(delta.flatten(1).double().numpy(), compute_uv=False)
    assert cut["relative_error"] == pytest.approx(np.sqrt((s[1:] ** 2).sum() / (s**2).sum()), rel=1e-5)


def test_conv_weight_deltas_as_a_kohya_lora_load_in_stock_diffusers(tmp_path):
    """An ESD-u-like edit (resnet convolutions and a time-embedding Linear changed) at full rank:
    stock diffusers' kohya loader gives the weight edit's images."""
    import torch.nn as nn

    from erasekit.edits.weight_delta import NAME as WEIGHT_DELTA
    from erasekit.edits.weight_delta import delta_key

    pipe = tiny_sd_pipeline()
    convs = [n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Conv2d) and ".resnets." in n][:4]
    linear = next(n for n, m in pipe.unet.named_modules() if n.endswith("time_emb_proj"))
    g = torch.Generator().manual_seed(3)
    weights = dict(pipe.unet.named_parameters())
    deltas = {f"{n}.weight": 0.2 * torch.randn(weights[f"{n}.weight"].shape, generator=g) for n in [*convs, linear]}
    base = uce.fit(tiny_sd_pipeline(), "circle", UCEConfig(), progress=False)
    edit = Edit(
        kind=WEIGHT_DELTA,
        method="esd",
        concepts=["circle"],
        family="sd",
        base_model=base.base_model,
        tensors={delta_key(k, ""): v for k, v in deltas.items()},
    )
    full = max(min(d.flatten(1).shape) for d in deltas.values())
    tensors, report = lora_from_deltas(deltas, full, "unet")
    assert report["relative_error"] < 1e-5 and any(t.dim() == 4 for t in tensors.values())
    save_kohya(tmp_path / "esd.safetensors", to_kohya(tensors, "sd"), {"erasekit_method": "esd"})
    from_stock = _stock_images("sd", tmp_path, "esd.safetensors")
    from_apply = _apply_images("sd", edit)
    assert _max_8bit_diff(from_stock, from_apply) <= 1 / 255
    assert (from_stock - from_apply).abs().max() < 1e-4
    assert _max_8bit_diff(from_apply, _apply_images("sd", None)) > 8 / 255  # the edit does something


def test_bias_and_norm_deltas_cannot_become_a_lora():
    deltas = {"a.weight": torch.ones(3, 4), "a.bias": torch.ones(3), "norm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match="a.bias, norm.weight") as err:
        lora_from_deltas(deltas, 2, "unet")
    assert "\n" not in str(err.value) and "a.weight" not in str(err.value)
    with pytest.raises(ValueError, match="rank"):
        lora_from_deltas({"a.weight": torch.ones(3, 4)}, 0, "unet")
    with pytest.raises(ValueError, match="no weight deltas"):
        lora_from_deltas({}, 2, "unet")


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_uce_edit_as_a_full_rank_kohya_lora_gives_the_weight_edit_images(family, tmp_path):
    edit = uce.fit(BUILDERS[family](), "circle", UCEConfig(), progress=False)
    deltas = weight_delta.deltas_of(edit)
    assert deltas and len(deltas) == len(edit.tensors)  # UCE changes denoiser weights only
    full = max(min(d.shape) for d in deltas.values())
    tensors, report = lora_from_deltas(deltas, full, PREFIX[family])
    assert report["relative_error"] < 1e-5
    save_kohya(tmp_path / "uce.safetensors", to_kohya(tensors, family), {"erasekit_method": "uce"})

    from_stock = _stock_images(family, tmp_path, "uce.safetensors")
    from_apply = _apply_images(family, edit)
    assert _max_8bit_diff(from_stock, from_apply) <= 1 / 255
    assert (from_stock - from_apply).abs().max() < 1e-4
    assert (from_apply - _apply_images(family, None)).abs().max() > 1e-3  # the edit does something


# ---- the file ---------------------------------------------------------------------------------


def test_save_kohya_writes_network_metadata_and_replaces_whole(tmp_path):
    path = tmp_path / "x.safetensors"
    kohya = to_kohya(_lora_tensors("flux"), "flux")  # fused layers: ranks differ per layer
    save_kohya(path, kohya, {"erasekit_concepts": ["car", "dog"], "note": "hi"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["erasekit_concepts"] == '["car", "dog"]' and meta["note"] == "hi"

    sd = to_kohya(_lora_tensors("sd"), "sd")
    save_kohya(path, sd, {})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert set(load_file(str(path))) == set(sd)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left

    with pytest.raises(ValueError, match="not kohya LoRA tensors"):
        save_kohya(path, {"unet.x.lora_A.weight": torch.ones(2, 2)}, {})
    with pytest.raises(ValueError, match="without both factors"):
        save_kohya(path, {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, {})
    with pytest.raises(ValueError, match="safetensors"):
        save_kohya(tmp_path / "x.pt", sd, {})
    assert set(load_file(str(path))) == set(sd)  # refused writes left the file as it was

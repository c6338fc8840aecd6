"""Baselines (ESD, UCE, keyword zeroing, SLD) on tiny pipelines of both families, and the
adapter surface they added (parameter groups, projection roles, call_inputs, main_text_encoder)."""

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from edit_asserts import assert_same_tensors
from peft import LoraConfig
from test_models_meta import FLUX1_DEV_TRANSFORMER, SD14_UNET
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import apply, load_edit, remove
from erasekit.edits.weight_delta import export_merged
from erasekit.methods import METHODS, esd, keyword_zeroing, make_config, method_module, sld, uce
from erasekit.methods.esd import ESDConfig
from erasekit.methods.sld import SLDConfig
from erasekit.methods.uce import UCEConfig
from erasekit.models import FamilyAdapter, adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
FAMILIES = ["sd", "flux"]
PROMPT = "a photo of a car"
OTHER = "a photo of a dog"
CONFIGS = {
    "esd": lambda: ESDConfig(iterations=3, rollout_steps=3, lr=1e-2, checkpoint_every=2),
    "uce": lambda: UCEConfig(preserve="dog"),
    "keyword_zeroing": lambda: keyword_zeroing.KeywordZeroingConfig(),
    "sld": lambda: SLDConfig(warmup_steps=0),
}
BASELINES = list(CONFIGS)


def _xt(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)


def _out(adapter, x, t, prompt=PROMPT):
    """The denoiser's output; the prompt is encoded on every call (keyword zeroing recognises
    prompts encoded while it is applied)."""
    with torch.no_grad():
        return adapter.predict(x, t, adapter.encode([prompt]))


def _image(adapter, prompt=PROMPT):
    with torch.no_grad():
        return adapter.generate([prompt], [0], steps=3)


def _fit(method, pipe, concept="car", **overrides):
    import dataclasses

    return method_module(method).fit(
        pipe, concept, dataclasses.replace(CONFIGS[method](), **overrides), progress=False
    )


# ---- every baseline: the Edit contract -----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", BASELINES)
def test_edit_contract(method, family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    base, base_img = _out(adapter, x, t), _image(adapter)
    state = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}

    edit = _fit(method, pipe)
    assert edit.method == method and edit.family == family and edit.concepts == ["car"]
    assert torch.equal(_out(adapter, x, t), base)  # fit leaves the pipeline as it was

    apply(pipe, edit)
    edited, edited_img = _out(adapter, x, t), _image(adapter)
    assert (edited - base).abs().max() > 1e-4
    assert (edited_img - base_img).abs().max() > 1e-4  # through the stock pipeline call
    with adapter.edits_disabled():
        assert torch.equal(_out(adapter, x, t), base)
    assert torch.equal(_out(adapter, x, t), edited)
    remove(pipe, edit)
    assert torch.equal(_out(adapter, x, t), base)
    assert torch.equal(_image(adapter), base_img)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())

    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert loaded.method == method and loaded.id == edit.id
    apply(pipe, loaded)
    assert torch.equal(_out(adapter, x, t), edited)
    assert torch.equal(_image(adapter), edited_img)
    apply(pipe, loaded, scale=0.0)  # re-applying replaces; scale 0 is the base model
    assert torch.equal(_out(adapter, x, t), base)
    assert torch.equal(_image(adapter), base_img)
    apply(pipe, loaded, scale=0.5)
    half = _out(adapter, x, t)
    assert not torch.equal(half, base) and not torch.equal(half, edited)
    remove(pipe, loaded)
    assert torch.equal(_out(adapter, x, t), base)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())
    assert not adapter.edit_stack.switches  # nothing left registered


def test_methods_are_registered_with_presets():
    for name in BASELINES:
        assert name in METHODS
        module = method_module(name)
        assert {"paper", "fast"} <= set(module.PRESETS)
        assert callable(module.fit) and not hasattr(module, "attach")  # edits attach by kind
    assert make_config("esd", "paper").iterations is None  # the family's release value at fit time
    assert make_config("esd", "paper").resolved("sd").iterations == 200
    assert make_config("esd", "paper").resolved("sd").lr == 5e-5
    assert make_config("esd", "paper").resolved("flux").iterations == 1400
    assert make_config("esd", "paper").resolved("flux").lr == 1e-4
    assert make_config("esd", "paper", {"group": "esd-u", "eta": "1"}).eta == 1.0
    assert make_config("uce", "paper").lamb == 0.5
    assert make_config("sld", "max").guidance_scale == 5000


# ---- ESD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_esd_teacher_passes_use_the_frozen_weights(family, monkeypatch):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    group = adapter.parameter_group("cross_attn")
    original = {n: p.detach().clone() for n, p in group.items()}
    seen = []  # (edits enabled?, group weights equal to the original?) for every predict
    real = type(adapter).predict

    def spy(self, *args, **kwargs):
        same = all(torch.equal(p, original[n]) for n, p in group.items())
        seen.append((self.edits_enabled, same))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "predict", spy)
    edit = esd.fit(pipe, "car", CONFIGS["esd"](), progress=False)
    teacher = [same for enabled, same in seen if not enabled]
    student = [same for enabled, same in seen if enabled]
    assert len(teacher) == 3 and all(teacher)  # one batched teacher pass per iteration
    assert not all(student)  # the student (and its rollouts) did move away
    assert all(torch.equal(p, original[n]) for n, p in group.items())  # fit restored the originals
    assert set(edit.tensors) == {"delta." + n for n in group}
    assert any(d.abs().max() > 0 for d in edit.tensors.values())


def test_esd_u_trains_everything_but_cross_attention(sd_pipe):
    edit = _fit("esd", tiny_sd_pipeline(), group="esd-u", iterations=1)
    names = {k[len("delta.") :] for k in edit.tensors}
    adapter = adapter_for(sd_pipe)
    assert names == set(adapter.parameter_group("non_cross_attn"))
    assert not any("attn2" in n for n in names)


def test_esd_targets():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert esd.esd_target(c, u, 2.0, "concept").item() == -1.0  # release: e_c - 2 (e_c - e_u)
    assert esd.esd_target(c, u, 1.0, "uncond").item() == -1.0  # ALGORITHMS' form, eta 1: the same
    with pytest.raises(ValueError, match="target_base"):
        esd.esd_target(c, u, 1.0, "zero")


def test_esd_resumes_to_the_same_weights(tmp_path, interrupted_at_rollout):
    cfg = ESDConfig(iterations=4, rollout_steps=3, lr=1e-2, checkpoint_every=2)
    full = esd.fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    grads = {n: p.requires_grad for n, p in adapter.denoiser.named_parameters()}
    with interrupted_at_rollout(adapter, 4):  # iteration 4 of 4: after the checkpoint at 2
        esd.fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in adapter.denoiser.named_parameters())
    assert not adapter.edit_stack.switches
    assert {n: p.requires_grad for n, p in adapter.denoiser.named_parameters()} == grads
    resumed = esd.fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_esd_refuses_to_train_under_a_weight_edit():
    pipe = tiny_sd_pipeline()
    edit = _fit("uce", pipe)
    apply(pipe, edit)
    with pytest.raises(ValueError, match="remove them first"):
        esd.fit(pipe, "car", CONFIGS["esd"](), progress=False)
    remove(pipe, edit)


# ---- weight edits: UCE maths, stacking, merged export ---------------------------------------


def test_uce_solves_its_least_squares_problem():
    """With a huge erase scale the edited projections map the concept's token to the guide's
    projection; preserved concepts keep theirs."""
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    edit = _fit("uce", pipe, guide="dog", preserve="cat", erase_scale=1e6, preserve_scale=1e6)
    emb = {p: adapter.encode([p]).embeds[0, adapter.token_indices(p, p)[-1]] for p in ("car", "dog", "cat")}
    points = [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]
    assert {k[len("delta.") :] for k in edit.tensors} == {p.name + ".weight" for p in points}
    before = {p.name: (p.module(emb["dog"]), p.module(emb["cat"]), p.module(emb["car"])) for p in points}
    apply(pipe, edit)
    for p in points:
        to_dog, keep_cat, was_car = before[p.name]
        torch.testing.assert_close(p.module(emb["car"]), to_dog, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(p.module(emb["cat"]), keep_cat, atol=1e-3, rtol=1e-3)
        assert (was_car - to_dog).abs().max() > 1e-2
    remove(pipe, edit)


def test_uce_several_concepts_and_flux_records_block_inputs():
    pipe = tiny_flux_pipeline()
    edit = uce.fit(pipe, "car; dog", UCEConfig(templates="{concept}; a photo of a {concept}"), progress=False)
    assert edit.concepts == ["car", "dog"] and len(edit.hyperparameters["erase_prompts"]) == 4
    names = {k[len("delta.") :] for k in edit.tensors}
    assert names == {f"transformer_blocks.{i}.attn.add_{r}_proj.weight" for i in range(2) for r in "kv"}
    with pytest.raises(ValueError, match="car"):
        uce.fit(pipe, "car", UCEConfig(templates="a photo of a dog"), progress=False)


def test_weight_edits_stack_and_come_off_in_any_order():
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    base = _out(adapter, x, t)
    car, dog = _fit("uce", pipe, "car"), _fit("uce", pipe, "dog")
    apply(pipe, car)
    only_car = _out(adapter, x, t)
    apply(pipe, dog)
    both = _out(adapter, x, t)
    assert not torch.equal(both, only_car)
    remove(pipe, car)
    apply(pipe, car)
    torch.testing.assert_close(_out(adapter, x, t), both)  # sums commute up to rounding
    remove(pipe, dog)
    assert torch.equal(_out(adapter, x, t), only_car)
    with adapter.edits_disabled(), pytest.raises(RuntimeError, match="edits_disabled"):
        remove(pipe, car)
    remove(pipe, car)
    assert torch.equal(_out(adapter, x, t), base)
    assert "weight_delta" not in adapter.edit_stack.kinds


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["esd", "uce"])
def test_merged_export_loads_with_the_stock_class(method, family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    cond = adapter.encode([PROMPT])
    edit = _fit(method, pipe)
    other = _fit("uce", pipe, "dog")  # another weight edit must not leak into the export
    apply(pipe, edit)
    with torch.no_grad():
        edited = adapter.predict(x, t, cond)
    edited_weights = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    apply(pipe, other)
    with torch.no_grad():
        stacked = adapter.predict(x, t, cond)
    folder = export_merged(pipe, edit, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(adapter.predict(x, t, cond), stacked)  # the pipeline is left as it was
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "erasekit_edit.json").is_file()
    stock = type(adapter.denoiser).from_pretrained(folder)
    assert type(stock) in (UNet2DConditionModel, FluxTransformer2DModel)
    loaded = stock.state_dict()
    assert loaded.keys() == edited_weights.keys()
    assert all(torch.equal(loaded[k], edited_weights[k]) for k in loaded)  # bit for bit
    with torch.no_grad():
        merged = FamilyAdapter.for_denoiser(stock).predict(x, t, cond)
    # Not torch.equal: a plain save/load round trip of the UNEDITED model already moves CPU
    # outputs by ~1e-6 (the loaded tensors' memory alignment changes the kernels' summation).
    torch.testing.assert_close(merged, edited, atol=1e-5, rtol=1e-5)
    remove(pipe, other)
    remove(pipe, edit)


# ---- keyword zeroing -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_keyword_zeroing_touches_only_prompts_with_the_keyword(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    base = {p: _out(adapter, x, t, p) for p in (PROMPT, OTHER, "a red car in a park")}
    x2, t2 = x.expand(2, *x.shape[1:]), t.expand(2)
    with torch.no_grad():
        base_mixed = adapter.predict(x2, t2, adapter.encode([OTHER, PROMPT]))
    base_img = {p: _image(adapter, p) for p in (PROMPT, OTHER)}
    edit = keyword_zeroing.fit(pipe, "car")
    apply(pipe, edit)
    assert (_out(adapter, x, t, PROMPT) - base[PROMPT]).abs().max() > 1e-4
    assert (_out(adapter, x, t, "a red car in a park") - base["a red car in a park"]).abs().max() > 1e-4
    assert torch.equal(_out(adapter, x, t, OTHER), base[OTHER])
    assert torch.equal(_image(adapter, OTHER), base_img[OTHER])
    assert (_image(adapter, PROMPT) - base_img[PROMPT]).abs().max() > 1e-4
    # A batch mixing both: each row as on its own (the keyword's row is edited, the other not).
    with torch.no_grad():
        mixed = adapter.predict(x2, t2, adapter.encode([OTHER, PROMPT]))
    assert torch.equal(mixed[0], base_mixed[0]) and (mixed[1] - base_mixed[1]).abs().max() > 1e-4
    remove(pipe, edit)
    assert torch.equal(_out(adapter, x, t, PROMPT), base[PROMPT])


def test_keyword_positions_follow_the_prompt(sd_pipe):
    adapter = adapter_for(sd_pipe)
    tokenizer, _ = adapter.main_text_encoder()
    runs = keyword_zeroing.keyword_id_runs(tokenizer, ["teddy bear"])
    for prompt in ("a teddy bear", "a red teddy bear in a park", "teddy bear and a teddy bear"):
        ids = tokenizer(prompt, padding="max_length", max_length=32)["input_ids"]
        assert keyword_zeroing.find_runs(ids, runs, set(tokenizer.all_special_ids)) == adapter.token_indices(
            prompt, "teddy bear"
        )
    ids = tokenizer("a bear and a teddy", padding="max_length", max_length=32)["input_ids"]
    assert keyword_zeroing.find_runs(ids, runs, set(tokenizer.all_special_ids)) == []


def test_zeroing_value_rows_is_zeroing_attention_columns(sd):
    """The mechanism's identity: attention output with the keyword's probability columns set
    to 0 (no renormalisation) == output with the keyword's value rows set to 0."""
    attn = sd.denoiser.get_submodule(sd.attention_layers()[0])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 32, 32, generator=g)
    cols = torch.zeros(2, 32, dtype=torch.bool)
    cols[1, [4, 5]] = True
    with torch.no_grad():
        q, k, v = attn.to_q(h), attn.to_k(ctx), attn.to_v(ctx)
        split = lambda z: z.view(2, -1, attn.heads, z.shape[-1] // attn.heads).transpose(1, 2)
        p = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // attn.heads)).softmax(-1)
        p = p.masked_fill(cols[:, None, None, :], 0.0)
        ref = attn.to_out[0]((p @ split(v)).transpose(1, 2).reshape(2, 16, -1))
        hook = attn.to_v.register_forward_hook(lambda _m, _a, out: torch.where(cols[..., None], out * 0.0, out))
        try:
            got = attn(h, encoder_hidden_states=ctx)
        finally:
            hook.remove()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- SLD -----------------------------------------------------------------------------------


def test_sld_matches_diffusers_safe_pipeline(sd_pipe):
    from diffusers import StableDiffusionPipelineSafe

    cfg = SLDConfig(warmup_steps=1, guidance_scale=50.0, threshold=0.01, momentum_scale=0.3, mom_beta=0.4)
    safe = StableDiffusionPipelineSafe(
        vae=sd_pipe.vae,
        text_encoder=sd_pipe.text_encoder,
        tokenizer=sd_pipe.tokenizer,
        unet=sd_pipe.unet,
        scheduler=sd_pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = "car"
    kwargs = dict(
        prompt=[PROMPT],
        negative_prompt=[""],
        num_inference_steps=4,
        guidance_scale=3.0,
        height=32,
        width=32,
        output_type="np",
    )
    with torch.no_grad():
        plain = safe(generator=torch.Generator().manual_seed(0), sld_guidance_scale=0.0, **kwargs).images
        ref = safe(
            generator=torch.Generator().manual_seed(0),
            sld_guidance_scale=cfg.guidance_scale,
            sld_warmup_steps=cfg.warmup_steps,
            sld_threshold=cfg.threshold,
            sld_momentum_scale=cfg.momentum_scale,
            sld_mom_beta=cfg.mom_beta,
            **kwargs,
        ).images
        edit = sld.fit(sd_pipe, "car", cfg)
        apply(sd_pipe, edit)
        try:
            ours = sd_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
        finally:
            remove(sd_pipe, edit)
    ours, ref, plain = (torch.as_tensor(a) for a in (ours, ref, plain))
    assert (ref - plain).abs().max() > 1e-3  # the reference did steer
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guided", [False, True])
def test_sld_on_single_branch_calls(guided):
    """Flux: true CFG calls the branches one by one, distilled Flux makes one guided call."""
    pipe = tiny_flux_pipeline(guidance_embeds=guided)
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    cond, neg, safety = adapter.encode([PROMPT]), adapter.encode([""]), adapter.encode(["car"])
    with torch.no_grad():
        c, u, s = (adapter.predict(x, t, e, guidance=2.0) for e in (cond, neg, safety))
    cfg = SLDConfig(warmup_steps=0, guidance_scale=50.0)
    edit = sld.fit(pipe, "car", cfg)
    apply(pipe, edit)
    with torch.no_grad():
        got_c = adapter.predict(x, t, cond, guidance=2.0)
        got_u = adapter.predict(x, t, neg, guidance=2.0)
    remove(pipe, edit)
    g_s, _ = sld.sld_term(c, u, s, torch.zeros_like(c), cfg)
    torch.testing.assert_close(got_c, c - g_s)
    assert torch.equal(got_u, u)  # the unconditional branch passes unchanged


def test_sld_warmup_and_momentum_follow_the_trajectory(sd_pipe):
    adapter = adapter_for(sd_pipe)
    x, _ = _xt(adapter)
    cond = adapter.encode([PROMPT])
    steps = [torch.tensor([900]), torch.tensor([600]), torch.tensor([300])]
    with torch.no_grad():
        base = [adapter.predict(x, t, cond) for t in steps]
    edit = sld.fit(sd_pipe, "car", SLDConfig(warmup_steps=1, guidance_scale=50.0))
    apply(sd_pipe, edit)
    with torch.no_grad():
        first = [adapter.predict(x, t, cond) for t in steps]
        again = [adapter.predict(x, t, cond) for t in steps]  # t went up: a new trajectory
    remove(sd_pipe, edit)
    assert torch.equal(first[0], base[0])  # warm-up step
    assert not torch.equal(first[1], base[1]) and not torch.equal(first[2], base[2])
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ---- adapter surface added for the baselines -----------------------------------------------


def test_parameter_groups_partition_linear_and_conv_layers(family_adapter):
    cross = family_adapter.parameter_group("cross_attn")
    rest = family_adapter.parameter_group("non_cross_attn")
    assert cross and rest and not set(cross) & set(rest)
    layers = {
        n: m for n, m in family_adapter.denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    assert set(cross) | set(rest) == {
        f"{n}.{k}" for n, m in layers.items() for k, _ in m.named_parameters(recurse=False)
    }
    if family_adapter.family == "sd":
        assert all(".attn2." in n for n in cross)
    else:
        assert {n.split(".")[3] for n in cross} == {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    with pytest.raises(ValueError, match="cross_attn"):
        family_adapter.parameter_group("attention")


def test_parameter_groups_on_real_configs():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
    sd_cross = FamilyAdapter.for_denoiser(unet).parameter_group("cross_attn")
    assert len(sd_cross) == 16 * 5  # to_q, to_k, to_v, to_out weights + to_out bias, 16 attn2
    flux_cross = FamilyAdapter.for_denoiser(transformer).parameter_group("cross_attn")
    assert len(flux_cross) == 19 * 4 * 2  # 4 text-stream projections, weight and bias
    assert sum(p.numel() for p in flux_cross.values()) == 19 * 4 * (3072 * 3072 + 3072)


def test_projection_roles(family_adapter):
    roles = [p.role for p in family_adapter.attachment_points("text_proj")]
    assert roles == (["k", "v"] * 7 if family_adapter.family == "sd" else ["q", "k", "v"] * 2)
    assert all(p.role is None for p in family_adapter.attachment_points("attn_out"))


def test_main_text_encoder_makes_the_embeddings(family_adapter):
    tokenizer, encoder = family_adapter.main_text_encoder()
    ids = tokenizer([PROMPT], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(encoder(ids)[0], family_adapter.encode([PROMPT]).embeds)


@pytest.mark.parametrize("name", ["sd", "flux", "flux_guided"])
def test_call_inputs_repeat_a_stock_pipeline_call(name, request):
    adapter = request.getfixturevalue(name)
    calls = []
    handle = adapter.denoiser.register_forward_hook(
        lambda _m, a, kw, out: calls.append((a, kw, out)), with_kwargs=True
    )
    try:
        _image(adapter)
    finally:
        handle.remove()
    assert calls
    for args, kwargs, out in calls:
        latents, t, cond, guidance = adapter.call_inputs(args, kwargs)
        assert t.shape == (latents.shape[0],) and cond.batch_size == latents.shape[0]
        assert (guidance is not None) == (name == "flux_guided")
        with torch.no_grad():
            again = adapter.predict(latents, t, cond, guidance)
        torch.testing.assert_close(again, out[0] if isinstance(out, tuple) else out.sample)


def test_uce_token_span_to_end_and_the_objects_template_set():
    """token_span "to-end" (the original release) maps every position from the concept's last
    token to the end of the sequence onto the guide's aligned positions; template_set "objects"
    adds the object templates to the erased prompts; the defaults are the current release."""
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    assert (UCEConfig().token_span, UCEConfig().template_set) == ("last", "none")
    edit = _fit("uce", pipe, "car", token_span="to-end", erase_scale=1e6)
    start = adapter.token_indices("car", "car")[-1]
    length = adapter.encode(["car"]).embeds.shape[1]
    assert edit.hyperparameters["token_rows"] == length - start
    car, guide = adapter.encode(["car"]).embeds[0], adapter.encode([""]).embeds[0]
    points = [p for p in adapter.attachment_points("text_proj") if p.role in ("k", "v")]
    rows = [start, length - 1]  # the concept's last token and the last padding position
    before = {p.name: p.module(guide[[r - start for r in rows]]) for p in points}
    apply(pipe, edit)
    for p in points:
        torch.testing.assert_close(p.module(car[rows]), before[p.name], atol=1e-2, rtol=1e-2)
    remove(pipe, edit)
    objects = _fit("uce", pipe, "car", template_set="objects")
    assert objects.hyperparameters["erase_prompts"] == ["car"] + [
        t.format(concept="car") for t in uce.OBJECT_TEMPLATES
    ]
    assert objects.hyperparameters["token_rows"] == 1 + len(uce.OBJECT_TEMPLATES)


def _weight_edit(method: str, pipe):
    from test_mace import TINY as MACE_TINY

    from erasekit.methods.mace import MACEConfig
    from erasekit.methods.rece import RECEConfig

    config = {"uce": UCEConfig(preserve="dog"), "rece": RECEConfig(samples=1), "mace": MACEConfig(**MACE_TINY)}[method]
    return method_module(method).fit(pipe, "car", config, progress=False)


@pytest.mark.parametrize("method", ["uce", "rece", "mace"])
def test_weight_edits_are_named_for_the_plain_model_under_a_users_lora(method):
    # A user's peft LoRA on the same projections inserts ".base_layer." into the parameter names;
    # the edit must still name the plain model's parameters, or it would not load without the LoRA.
    plain = _weight_edit(method, tiny_sd_pipeline())
    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v"]), adapter_name="user")
    assert any(".base_layer." in n for n, _ in pipe.unet.named_parameters())
    wrapped = _weight_edit(method, pipe)
    assert sorted(wrapped.tensors) == sorted(plain.tensors)


def test_mace_sees_an_attached_weight_edit_under_a_users_lora():
    # The check compares plain parameter names: under a user's LoRA the raw names carry
    # ".base_layer.", and an attached edit on those projections must still be found.
    from erasekit.edits import apply, remove

    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v"]), adapter_name="user")
    edit = _weight_edit("uce", pipe)
    apply(pipe, edit)
    try:
        with pytest.raises(ValueError, match="remove them first"):
            _weight_edit("mace", pipe)
    finally:
        remove(pipe, edit)

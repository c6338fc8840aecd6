"""MACE on tiny pipelines of both families: the closed forms (refinement, fusion), the index
matching, the attention-map LoRA training, resume, determinism and the edit's contract."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from edit_asserts import assert_same_tensors
from peft.tuners.tuners_utils import BaseTunerLayer
from real_tokenizers import EOS_ID, clip_bpe_tokenizer, tiny_sd_pipeline_with
from test_models_meta import FLUX1_DEV_TRANSFORMER, SD14_UNET
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.cli import main
from erasekit.edits import Edit, apply, load_edit, remove
from erasekit.edits.weight_delta import PREFIX
from erasekit.errors import ConfigError
from erasekit.methods import get_method, mace, make_config, method_help
from erasekit.methods.mace import MACEConfig, fit
from erasekit.models import FamilyAdapter, adapter_for, base_linear

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
FAMILIES = ["sd", "flux"]
TINY_SEED = MACEConfig().seed
TEMPLATES = "a photo of a {concept}|an image of a {concept}"
TINY = dict(
    templates=TEMPLATES,
    mapping="dog",
    image_prompt="a photo of a {concept}",
    images=2,
    image_steps=2,
    mask_samples=1,
    samples=2,
    iterations=3,
    lr=1e-2,
    checkpoint_every=2,
)


def _cfg(**kw) -> MACEConfig:
    return MACEConfig(**(TINY | kw))


def _xt(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)


def _out(adapter, x, t, prompt="a photo of a car"):
    with torch.no_grad():
        return adapter.predict(x, t, adapter.encode([prompt]))


def _weights(adapter, points):
    return {p.name: base_linear(p.module).weight.detach().double() for p in points}


def _delta_edit(adapter, deltas: dict[str, torch.Tensor]) -> Edit:
    """A weight-delta edit from point name -> delta (float64)."""
    names = {id(p): n for n, p in adapter.denoiser.named_parameters()}
    points = {p.name: p for p in mace.kv_points(adapter)}
    tensors = {PREFIX + names[id(base_linear(points[n].module).weight)]: d.float() for n, d in deltas.items()}
    return Edit(
        method="mace", concepts=["test"], family=adapter.family, base_model="", tensors=tensors, kind="weight_delta"
    )


def _inputs(adapter, prompt: str, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """point name -> the point's input (L, d) on ``prompt`` (float64), at the first (noise,
    timestep) draw of ``mace.record_moments`` with ``seed``."""
    points = mace.kv_points(adapter)
    seen = {}
    handles = [
        p.module.register_forward_pre_hook(lambda _m, a, n=p.name: seen.__setitem__(n, a[0][0].double()))
        for p in points
    ]
    g = torch.Generator().manual_seed(seed)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    try:
        _out(adapter, x, t, prompt)
    finally:
        for h in handles:
            h.remove()
    return seen


# ---- closed forms ---------------------------------------------------------------------------


def test_refine_zeroes_the_gradient_of_its_objective():
    g = torch.Generator().manual_seed(0)
    d, out, n, m = 6, 5, 9, 4
    w0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    f, gg = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(m, d, generator=g, dtype=torch.float64)
    l1, lamb = 0.7, 0.3
    d1, _ = mace.refine(w0, f.T @ f, gg.T @ f, l1 * p.T @ p, lamb)
    w = (w0 + d1).requires_grad_(True)
    objective = (
        ((w @ f.T - w0 @ gg.T) ** 2).sum() + l1 * ((w @ p.T - w0 @ p.T) ** 2).sum() + lamb * ((w - w0) ** 2).sum()
    )
    objective.backward()
    assert w.grad.abs().max() < 1e-10
    # Mapping every token to itself with nothing to preserve changes nothing.
    same, _ = mace.refine(w0, f.T @ f, f.T @ f, torch.zeros(d, d, dtype=torch.float64), 0.0)
    assert same.abs().max() < 1e-12


def test_fusion_equals_a_direct_least_squares_solve():
    g = torch.Generator().manual_seed(1)
    d, out = 7, 4

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    w0, d1 = rnd(out, d), 0.1 * rnd(out, d)
    tokens = [rnd(5, d), rnd(6, d)]  # two concepts' token inputs (rows)
    loras = [rnd(out, 1) @ rnd(1, d), rnd(out, 1) @ rnd(1, d)]  # rank-1 LoRA deltas
    prior = rnd(8, d)
    l2, lamb = 0.5, 0.2
    d_star, _, _ = mace.fuse(d1, loras, [e.T @ e for e in tokens], l2 * prior.T @ prior, lamb)
    # argmin_W sum_i ||W E_i - (W'+dW_i) E_i||^2 + l2 ||W P - W0 P||^2 + lamb ||W - W'||^2, stacked.
    w1 = w0 + d1
    a = torch.cat([*tokens, l2**0.5 * prior, lamb**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([*(e @ (w1 + dw).T for e, dw in zip(tokens, loras)), l2**0.5 * prior @ w0.T, lamb**0.5 * w1.T])
    direct = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(w0 + d_star, direct, rtol=1e-9, atol=1e-10)
    # One LoRA, no prior, no anchor, full-rank tokens: W* = W' + dW.
    e = rnd(12, d)
    assert torch.linalg.matrix_rank(e.T @ e) == d
    one, _, _ = mace.fuse(d1, loras[:1], [e.T @ e], torch.zeros(d, d, dtype=torch.float64), 0.0)
    torch.testing.assert_close(one, d1 + loras[0], rtol=1e-9, atol=1e-10)


def test_cfis_sampler_concentrates_on_200_to_400(sd):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([mace.sample_timestep(sd, True, g) for _ in range(4000)]).double()
    assert abs(t.mean().item() - 300) < 10
    assert ((t >= 200) & (t < 400)).double().mean() > 0.85
    p = mace.cfis_probabilities()
    assert abs((p * torch.arange(1000)).sum().item() - 300) < 1 and p[200:400].sum() > 0.85


# ---- index matching -------------------------------------------------------------------------


def test_index_matching_on_the_real_clip_tokenizer():
    pipe = tiny_sd_pipeline_with(clip_bpe_tokenizer())
    adapter = adapter_for(pipe)
    length = adapter.encode([""]).embeds.shape[1]
    assert length == 77
    tok, _ = adapter.main_text_encoder()
    template, concept, mapping = "a photo of {concept} in a park", "nudity", "a person wearing clothes"
    f_pos, g_pos = mace.cfr_positions(adapter, template, concept, mapping, length)
    ids_f = mace._ids(adapter, template.format(concept=concept), length)
    ids_g = mace._ids(adapter, template.format(concept=mapping), length)
    concept_pos = adapter.token_indices(template.format(concept=concept), concept)
    mapping_pos = adapter.token_indices(template.format(concept=mapping), mapping)
    assert len(concept_pos) > 1  # "nudity" is several BPE pieces
    assert len(f_pos) == len(g_pos) <= 77
    assert not set(f_pos) & set(concept_pos) and not set(g_pos) & set(mapping_pos)
    assert f_pos[0] == g_pos[0] == 0  # the start token
    # Suffixes run to the end of the padding; the longer one is cut (here the mapping's is shorter).
    assert len(mapping_pos) > len(concept_pos) and g_pos[-1] == 76
    assert f_pos[-1] == 76 - (len(mapping_pos) - len(concept_pos))
    # Prefixes pair position with position; suffixes pair the same words, then end and padding.
    assert [ids_f[p] for p in f_pos[:4]] == [ids_g[p] for p in g_pos[:4]]
    n_suffix = len(f_pos) - 4
    assert [ids_f[p] for p in f_pos[4:]][:3] == [ids_g[p] for p in g_pos[4:]][:3]
    assert len(f_pos) == 4 + min(77 - (concept_pos[-1] + 1), 77 - (mapping_pos[-1] + 1)) == 4 + n_suffix
    # S of stage 2: the concept's pieces and every position whose id is 49407 after the text.
    prompt = template.format(concept=concept)
    s = mace.loss_tokens(adapter, prompt, concept, True, length)
    assert s == concept_pos + [p for p, i in enumerate(ids_f) if i == EOS_ID]
    assert mace.loss_tokens(adapter, prompt, concept, False, length) == concept_pos
    assert tok.eos_token_id == EOS_ID
    # An empty mapping: an empty span where the concept would be.
    f_pos, g_pos = mace.cfr_positions(adapter, template, concept, "", length)
    assert len(f_pos) == len(g_pos) and g_pos[4] == 4


def test_eos_positions_of_the_t5_tokenizer(flux):
    length = flux.encode([""]).embeds.shape[1]
    ids = mace._ids(flux, "a photo of a car", length)
    assert mace.tail_positions(flux, "a photo of a car", length) == list(range(5, length))
    assert ids[5] == 1 and set(ids[6:]) == {0}  # T5: </s>, then padding


# ---- stage 1 on the models ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_refinement_maps_the_residual_tokens_to_the_mapping(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    points = mace.kv_points(adapter)
    w0 = _weights(adapter, points)
    # The normal equations hold (a full-rank system: lamb > 0).
    ref = mace.refinement(adapter, ["car"], _cfg(samples=2), pipe)
    assert ref.residual < 1e-9 and 0 < ref.mapping_error < 1
    assert ref.stage.draws == (1 if family == "sd" else 2)  # SD's inputs do not depend on the draw
    # One template: fewer pairs than input dimensions, so with lamb = 0 the map is exact.
    cfg = _cfg(templates="a photo of a {concept}", lamb=0.0, samples=1)
    ref = mace.refinement(adapter, ["car"], cfg, pipe)
    assert ref.mapping_error < 1e-6
    if family == "sd":  # every projection reads the text encoder's output: one group
        assert len(set(ref.stage.groups.values())) == 1
    length = ref.stage.length
    f_pos, g_pos = mace.cfr_positions(adapter, "a photo of a {concept}", "car", "dog", length)
    x_f, x_g = _inputs(adapter, "a photo of a car"), _inputs(adapter, "a photo of a dog")
    concept_pos = adapter.token_indices("a photo of a car", "car")
    for p in points:
        w1 = w0[p.name] + ref.deltas[p.name]
        target = x_g[p.name][g_pos] @ w0[p.name].T
        gap = (x_f[p.name][f_pos] @ w0[p.name].T - target).norm()
        assert gap > 1e-2 * target.norm()  # the residual tokens' projections were not the mapping's
        assert (x_f[p.name][f_pos] @ w1.T - target).norm() < 1e-3 * gap  # now they are
    assert not set(f_pos) & set(concept_pos)  # the concept's own token is not mapped


def test_preservation_keeps_preserved_projections(sd_pipe):
    adapter = adapter_for(sd_pipe)
    points = mace.kv_points(adapter)
    w0 = _weights(adapter, points)
    kept = _inputs(adapter, "a photo of a cat")
    drift = {}
    for scale in (0.0, 1e4):
        cfg = _cfg(templates=TEMPLATES, preserve="cat", train_preserve_scale=scale, lamb=1e-3, samples=1)
        ref = mace.refinement(adapter, ["car"], cfg, sd_pipe)
        drift[scale] = max(
            float((kept[p.name] @ ref.deltas[p.name].T).norm() / (kept[p.name] @ w0[p.name].T).norm()) for p in points
        )
    assert drift[0.0] > 0.05
    assert drift[1e4] < 1e-3


def test_preserve_scale_enters_once(sd_pipe):
    adapter = adapter_for(sd_pipe)
    s, lamb = 3e-2, 0.5
    ref = mace.refinement(
        adapter, ["car"], _cfg(preserve="cat", train_preserve_scale=s, lamb=lamb, samples=1), sd_pipe
    )
    p = mace.kv_points(adapter)[0]
    w0 = base_linear(p.module).weight.detach().double()
    c_ff = ref.stage.moment(p.name, "cfr.aa", None)
    c_gf = ref.stage.moment(p.name, "cfr.ba", None)
    b_dom = ref.stage.moment(p.name, "domain", None)
    eye = torch.eye(w0.shape[1], dtype=torch.float64)
    once = w0 @ (c_gf - c_ff) @ torch.linalg.inv(c_ff + s * b_dom + lamb * eye)
    twice = w0 @ (c_gf - c_ff) @ torch.linalg.inv(c_ff + s * s * b_dom + lamb * eye)
    torch.testing.assert_close(ref.deltas[p.name], once, rtol=1e-8, atol=1e-10)
    assert (ref.deltas[p.name] - twice).abs().max() > 1e-6
    release = make_config("mace", "nudity-release")
    assert release.train_preserve_scale == pytest.approx(make_config("mace", "nudity").train_preserve_scale ** 2)


# ---- stage 2: the attention-map LoRA --------------------------------------------------------


def test_attention_loss_trains_only_the_lora_and_lowers_masked_attention(monkeypatch):
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    cfg = _cfg(iterations=30, lr=3e-2, include_eos=False)
    g = torch.Generator().manual_seed(5)
    latents, regions = mace.concept_data(adapter, "car", cfg, g)
    monkeypatch.setattr(mace, "concept_data", lambda *a, **k: (latents, regions))
    captured = {}
    real_fuse = mace.fuse

    def capture(d1, dws, grams, prior, lamb):
        captured[len(captured)] = (d1, dws)
        return real_fuse(d1, dws, grams, prior, lamb)

    monkeypatch.setattr(mace, "fuse", capture)
    others = [p for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()]
    steps = {"n": 0}
    real_step = torch.optim.AdamW.step

    def checked_step(self, *a, **k):
        steps["n"] += 1
        assert all(p.grad is None for p in others)  # no weight of the pipeline gets a gradient
        trained = {id(p) for group in self.param_groups for p in group["params"]}
        with_grad = [n for n, p in adapter.denoiser.named_parameters() if p.grad is not None]
        assert with_grad and all(".lora_" in n for n in with_grad)
        assert all(id(p) in trained for n, p in adapter.denoiser.named_parameters() if p.grad is not None)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", checked_step)
    edit = fit(pipe, "car", cfg, progress=False)
    assert steps["n"] == 30
    assert not [m for m in adapter.denoiser.modules() if isinstance(m, BaseTunerLayer)]  # nothing left attached
    points = mace.kv_points(adapter)
    d1s = {p.name: captured[i][0] for i, p in enumerate(points)}
    dws = {p.name: captured[i][1][0] for i, p in enumerate(points)}
    assert any(dw.abs().max() > 0 for dw in dws.values())

    def masked_attention(deltas) -> float:
        e = _delta_edit(adapter, deltas)
        apply(pipe, e)
        idx = adapter.token_indices("a photo of a car", "car")
        cond = adapter.encode(["a photo of a car"])
        total = 0.0
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for i in range(len(latents)):
                for _ in range(3):
                    noise = torch.randn(latents[i : i + 1].shape, generator=gen)
                    t = mace.sample_timestep(adapter, True, gen)
                    with adapter.probe(token_indices=idx) as probe:
                        adapter.predict(adapter.add_noise(latents[i : i + 1], noise, t), t, cond)
                    maps = [probe.last(layer) for layer in probe.layers]
                    masks = [mace.layer_mask(regions[i], probe.resolution(layer)) for layer in probe.layers]
                    total += float(mace.attention_loss(maps, masks))
        remove(pipe, e)
        return total

    refined = masked_attention(d1s)
    trained = masked_attention({n: d1s[n] + dws[n] for n in d1s})
    assert trained < 0.8 * refined
    assert edit.metrics["lora_loss"]["car"]["last_tenth_mean"] < edit.metrics["lora_loss"]["car"]["first_tenth_mean"]


def test_attention_loss_forms():
    maps = [torch.full((1, 2, 4, 3), 0.5), torch.full((1, 2, 1, 3), 0.25)]
    masks = [torch.tensor([True, False, True, False]), torch.tensor([True])]
    assert mace.attention_loss(maps, masks).item() == pytest.approx(2 * 2 * 3 * 0.25 + 2 * 3 * 0.0625)
    assert mace.attention_loss(maps, masks, "norm").item() == pytest.approx((12 * 0.25) ** 0.5 + (6 * 0.0625) ** 0.5)
    assert mace.layer_mask(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), (4, 4)).reshape(4, 4)[:2, :2].all()


# ---- fit: the edit --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_applies_and_removes_bit_for_bit(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    x, t = _xt(adapter)
    base = _out(adapter, x, t)
    state = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    edit = fit(pipe, "car, cat", _cfg(), progress=False)
    assert edit.kind == "weight_delta" and edit.method == "mace" and edit.concepts == ["car", "cat"]
    names = {k[len(PREFIX) :] for k in edit.tensors}
    assert names == {n + ".weight" for n in (p.name for p in mace.kv_points(adapter))}
    assert torch.equal(_out(adapter, x, t), base)  # fit leaves the pipeline as it was
    assert not adapter.edit_stack.switches
    m = edit.metrics
    assert m["cfr_residual"] < 1e-9 and m["fusion_residual"] < 1e-9
    assert set(m["lora_loss"]) == {"car", "cat"} and m["iterations"] == 6
    assert m["train_seconds"] >= m["lora_seconds"] and "fusion_seconds" in m and "cfr_seconds" in m
    apply(pipe, edit)
    edited = _out(adapter, x, t)
    assert (edited - base).abs().max() > 1e-4
    remove(pipe, edit)
    assert torch.equal(_out(adapter, x, t), base)
    assert all(torch.equal(p, state[n]) for n, p in adapter.denoiser.named_parameters())
    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    apply(pipe, loaded)
    assert torch.equal(_out(adapter, x, t), edited)
    remove(pipe, loaded)
    assert torch.equal(_out(adapter, x, t), base)


def test_same_config_same_edit():
    a = fit(tiny_flux_pipeline(), "car", _cfg(), progress=False)
    b = fit(tiny_flux_pipeline(), "car", _cfg(), progress=False)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = fit(tiny_flux_pipeline(), "car", _cfg(seed=3), progress=False)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)


def test_resume_gives_the_same_edit(tmp_path, monkeypatch):
    cfg = _cfg(iterations=3, checkpoint_every=2)
    full = fit(tiny_sd_pipeline(), "car, cat", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5 of 6 (the second concept's second): after the checkpoint at 4
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        fit(pipe, "car, cat", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["iteration"] == 4
    assert not [m for m in adapter.denoiser.modules() if isinstance(m, BaseTunerLayer)]
    assert not adapter.edit_stack.switches  # the refinement came off too
    resumed = fit(pipe, "car, cat", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.metrics["resumed_from"] == 4
    assert_same_tensors(full, resumed)
    with pytest.raises(ValueError, match="other settings"):
        fit(pipe, "car, cat", _cfg(iterations=3, checkpoint_every=2, lr=5e-3), checkpoint_dir=tmp_path / "b")


# ---- settings, registry, errors -------------------------------------------------------------


def test_presets_and_parameter_counts():
    paper = make_config("mace")
    assert (paper.rank, paper.lr, paper.lamb, paper.cfis, paper.seed) == (1, 1e-5, 1e2, True, 2024)
    assert paper.resolved_iterations("nudity") == 120 and paper.resolved_iterations("ship") == 50
    assert len(paper.templates.split("|")) == 30 and paper.loss_form == "squared" and paper.include_eos
    nudity = make_config("mace", "nudity")
    assert (nudity.lr, nudity.lamb, nudity.cfis, nudity.train_preserve_scale) == (1e-5, 0.0, False, 7e-7)
    assert nudity.mapping == "a person wearing clothes" and nudity.prior_size == mace.COCO_2014_CAPTIONS
    assert {"paper", "fast", "nudity", "nudity-release"} <= set(get_method("mace").presets)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
    sd14, flux1 = FamilyAdapter.for_denoiser(unet), FamilyAdapter.for_denoiser(transformer)
    assert get_method("mace").trainable_parameters(sd14, paper) == 19_169_280
    assert mace.lora_parameters(sd14, 1) == 49_536 and mace.lora_parameters(flux1, 1) == 233_472
    assert get_method("mace").training_iterations(paper, "sd", "nudity, naked, car") == 120 + 120 + 50
    assert "mace: MACE (Lu et al., CVPR 2024)" in method_help("mace")


def test_bad_settings_are_one_line_errors(sd_pipe, tmp_path, capsys):
    with pytest.raises(ConfigError, match="mace: lr must be a finite number > 0, got 0"):
        make_config("mace", "paper", {"lr": "0"})
    with pytest.raises(ConfigError, match="mace: loss_form must be one of 'squared', 'norm', got 'cube'"):
        make_config("mace", "paper", {"loss_form": "cube"})
    with pytest.raises(ConfigError, match="mace: mapping must be one mapping or one per concept"):
        fit(sd_pipe, "car, cat", _cfg(mapping="dog, tree, sky"), progress=False)
    with pytest.raises(ValueError, match="car"):
        fit(sd_pipe, "car", _cfg(templates="a photo of a dog"), progress=False)
    with pytest.raises(ValueError, match="twice"):
        fit(sd_pipe, "car, car", _cfg(), progress=False)
    with pytest.raises(FileNotFoundError, match="no prior caption file"):
        fit(sd_pipe, "car", _cfg(prior_prompts=str(tmp_path / "absent.csv")), progress=False)
    args = [
        "erase",
        "--method",
        "mace",
        "--model",
        str(tmp_path / "m"),
        "--concept",
        "car",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(args + ["--set", "rank=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mace: rank must be an integer >= 1, got 0" in err


def test_prior_captions_and_weight_edits_in_the_way(sd_pipe, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("image_id,prompt\n1,a red car in the park\n2,a dog on the street\n3,a tree\n")
    assert mace.read_captions(csv, 2) == ["a red car in the park", "a dog on the street"]
    adapter = adapter_for(sd_pipe)
    cfg = _cfg(prior_prompts=str(csv), prior_size=30, train_preserve_scale=1e-3, samples=1)
    ref = mace.refinement(adapter, ["car"], cfg, sd_pipe)
    assert ref.stage.prior_factor == 10 and len(ref.stage.captions) == 3
    p = mace.kv_points(adapter)[0]
    assert ref.stage.moment(p.name, "prior", None).abs().max() > 0
    edit = _delta_edit(adapter, {p.name: torch.ones_like(base_linear(p.module).weight, dtype=torch.float64)})
    apply(sd_pipe, edit)
    try:
        with pytest.raises(ValueError, match="remove them first"):
            fit(sd_pipe, "car", _cfg(), progress=False)
    finally:
        remove(sd_pipe, edit)


def test_cli_erase_with_mace(tmp_path):
    from tiny_pipelines import TINY_DEFAULTS

    from erasekit.models.loading import write_defaults

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    write_defaults(tmp_path / "model", TINY_DEFAULTS)
    sets = ["iterations=2", "images=2", "image_steps=2", "mask_samples=1", "samples=1", f"templates={TEMPLATES}"]
    args = ["erase", "--method", "mace", "--model", str(tmp_path / "model"), "--concept", "car,cat"]
    args += ["--out", str(tmp_path / "edit"), "--threads", "1", "--set", "image_prompt=a photo of a {concept}"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert meta["method"] == "mace" and meta["kind"] == "weight_delta" and meta["concepts"] == ["car", "cat"]
    assert meta["hyperparameters"]["lora_steps"] == [2, 2]


def test_loss_layers_cover_every_attention_to_the_text(sd, flux):
    cfg = make_config("mace", "fast")
    assert mace.attention_loss_layers(sd, cfg) == sd.attention_layers()  # every attn2
    layers = mace.attention_loss_layers(flux, cfg)
    assert any(n.startswith("single_transformer_blocks.") for n in layers)
    assert any(n.startswith("transformer_blocks.") for n in layers)
    assert mace.attention_loss_layers(flux, MACEConfig(attn_layers="transformer_blocks.0")) == ["transformer_blocks.0"]


def test_export_merged_and_as_an_svd_lora(tmp_path):
    from diffusers import UNet2DConditionModel as Unet

    from erasekit.export import export

    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    edit = fit(pipe, "car", _cfg(), progress=False)
    x, t = _xt(adapter)
    apply(pipe, edit)
    edited = _out(adapter, x, t)
    remove(pipe, edit)
    merged = export(edit, pipe, "merged", tmp_path / "merged", progress=False)
    assert merged["relative_error"] == 0.0
    unet = Unet.from_pretrained(tmp_path / "merged" / "unet")
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=adapter.encode(["a photo of a car"]).embeds).sample
    torch.testing.assert_close(out, edited, rtol=1e-5, atol=1e-5)
    lora = export(edit, pipe, "diffusers-lora", tmp_path / "lora", rank=32, progress=False)
    assert lora["relative_error"] < 1e-5  # rank 32 = the full width of the tiny projections

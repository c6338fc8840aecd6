"""Receler on tiny pipelines of both families."""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from edit_asserts import assert_same_tensors
from test_models_meta import FLUX1_DEV_TRANSFORMER, SD14_UNET
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import apply, load_edit, remove
from erasekit.edits.output_adapter import attach_modules, recording
from erasekit.errors import UserError
from erasekit.methods import ConfigError, receler
from erasekit.methods.receler import RecelerConfig, build_erasers, fit
from erasekit.models import FamilyAdapter, adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
TINY = dict(iterations=4, rank=8, adv_tokens=4, adv_steps=2, rollout_steps=3, checkpoint_every=2, lr=1e-2)


def _inputs(adapter, prompt="a photo of a red car", seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g), adapter.encode([prompt])


def _perturb(erasers, seed=0):
    g = torch.Generator().manual_seed(seed)
    for e in erasers.values():
        with torch.no_grad():
            e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=g) * 0.1)


def test_eraser_count_and_size_on_the_real_sd14_config():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
    with torch.device("meta"):
        erasers = build_erasers(FamilyAdapter.for_denoiser(unet), rank=128)
    assert len(erasers) == 16
    assert sum(p.numel() for e in erasers.values() for p in e.parameters()) == 3_209_408


def test_flux1_dev_gets_one_eraser_per_dual_stream_block():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
        erasers = build_erasers(FamilyAdapter.for_denoiser(transformer), rank=128)
        extra = build_erasers(FamilyAdapter.for_denoiser(transformer), rank=128, extra=True)
    assert len(erasers) == 19 and len(extra) == 19 + 38  # with the single-stream blocks
    assert all(e.down.in_features == 3072 for e in extra.values())


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_zero_initialised_erasers_leave_outputs_unchanged(family):
    adapter = adapter_for(BUILDERS[family]())
    x, t, cond = _inputs(adapter)
    base = adapter.predict(x, t, cond)
    handle = attach_modules(adapter, build_erasers(adapter, rank=8), "zero", 1.0)
    assert torch.equal(adapter.predict(x, t, cond), base)
    handle.remove()


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_soft_prompt_reaches_the_student_and_carries_eraser_gradients(family):
    """The release's bug (the adversarial prompt never reaches the model) cannot come back."""
    adapter = adapter_for(BUILDERS[family]())
    x, t, cond = _inputs(adapter, prompt="a red car")
    erasers = build_erasers(adapter, rank=8)
    _perturb(erasers)
    handle = attach_modules(adapter, erasers, "train", 1.0)
    pos = [p + 1 for p in adapter.token_indices("a red car", "car")][:1] + [
        adapter.token_indices("a red car", "car")[-1] + 2
    ]
    d = cond.embeds.shape[-1]

    def eraser_grads(adv):
        for e in erasers.values():
            e.zero_grad(set_to_none=True)
        adv = adv.clone().requires_grad_(True)
        out = adapter.predict(x, t, cond.with_tokens(pos, adv))
        out.pow(2).mean().backward()
        assert adv.grad is not None and adv.grad.abs().sum() > 0
        return out.detach(), torch.cat([p.grad.flatten() for e in erasers.values() for p in e.parameters()])

    out1, g1 = eraser_grads(torch.zeros(len(pos), d))
    out2, g2 = eraser_grads(torch.randn(len(pos), d, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(out1, out2)  # the student sees the soft prompt
    assert g1.abs().sum() > 0 and not torch.allclose(g1, g2)  # eraser gradients depend on it
    handle.remove()


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_fit_apply_remove_save_load(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    edit = fit(pipe, "car", RecelerConfig(prompt="a photo of a {concept}", **TINY), progress=False)
    assert edit.method == "receler" and edit.family == family and edit.concepts == ["car"]
    x, t, cond = _inputs(adapter, prompt="a photo of a car")
    base = adapter.predict(x, t, cond)

    apply(pipe, edit)
    edited = adapter.predict(x, t, cond)
    assert not torch.allclose(edited, base)
    with adapter.edits_disabled():
        assert torch.equal(adapter.predict(x, t, cond), base)
    remove(pipe, edit)
    assert torch.equal(adapter.predict(x, t, cond), base)

    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert loaded.hyperparameters["rank"] == 8 and loaded.id == edit.id
    apply(pipe, loaded)
    assert torch.equal(adapter.predict(x, t, cond), edited)
    apply(pipe, loaded, scale=0.0)  # re-applying replaces; scale 0 is the base model
    assert torch.equal(adapter.predict(x, t, cond), base)
    remove(pipe, loaded)
    with pytest.raises(ValueError, match="not applied"):
        remove(pipe, loaded)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_eraser_layers_keeps_the_erasers_at_the_named_points_only(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    every = list(build_erasers(adapter, rank=8))
    first, last = every[0], every[-1]
    assert len(every) >= 2 and list(build_erasers(adapter, rank=8, layers=f" {first}, {last}")) == [first, last]
    config = RecelerConfig(prompt="a photo of a {concept}", eraser_layers=first, **TINY)
    edit = fit(pipe, "car", config, progress=False)
    assert {k[len("erasers.") : -len(".down.weight")] for k in edit.tensors if k.endswith(".down.weight")} == {first}
    with pytest.raises(ConfigError, match="receler: eraser_layers 'no_such_block' matches no eraser point"):
        build_erasers(adapter, rank=8, layers="no_such_block")


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_extra_erasers_on_the_single_stream_blocks(family, tmp_path):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    plain = set(build_erasers(adapter, rank=8))
    names = set(build_erasers(adapter, rank=8, extra=True))
    singles = {
        f"single_transformer_blocks.{i}.attn"
        for i in range(len(getattr(adapter.denoiser, "single_transformer_blocks", [])))
    }
    assert names == plain | singles and (family == "sd") == (not singles)
    edit = fit(pipe, "car", RecelerConfig(prompt="a photo of a {concept}", extra_erasers=True, **TINY), progress=False)
    stored = {k[len("erasers.") : -len(".down.weight")] for k in edit.tensors if k.endswith(".down.weight")}
    assert stored == names
    if singles:  # the single-stream erasers were trained, not left at zero
        assert all(edit.tensors[f"erasers.{n}.up.weight"].abs().sum() > 0 for n in singles)
    x, t, cond = _inputs(adapter, prompt="a photo of a car")
    base = adapter.predict(x, t, cond)
    edit.save(tmp_path / "edit")
    apply(pipe, load_edit(tmp_path / "edit"))
    assert not torch.allclose(adapter.predict(x, t, cond), base)
    remove(pipe, edit)
    assert torch.equal(adapter.predict(x, t, cond), base)


def test_several_edits_average_their_erasers(sd_pipe):
    import copy

    adapter = adapter_for(sd_pipe)
    x, t, cond = _inputs(adapter)
    e1 = build_erasers(adapter, 8)
    _perturb(e1, 1)
    zero = build_erasers(adapter, 8)  # zero-initialised: E(h) = 0
    h = attach_modules(adapter, e1, "one", 1.0)
    alone = adapter.predict(x, t, cond)
    h2 = attach_modules(adapter, copy.deepcopy(e1), "same", 1.0)
    assert torch.allclose(adapter.predict(x, t, cond), alone, atol=1e-6)  # mean of equals
    h2.remove()
    h2 = attach_modules(adapter, zero, "zero", 1.0)
    averaged = adapter.predict(x, t, cond)  # (E1 + 0) / 2
    h.remove()
    h2.remove()
    h = attach_modules(adapter, e1, "half", 0.5)
    assert torch.allclose(adapter.predict(x, t, cond), averaged, atol=1e-6)
    h.remove()
    assert "output_adapter" not in adapter.edit_stack.kinds


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, interrupted_at_rollout):
    cfg = RecelerConfig(prompt="a photo of a {concept}", **TINY)
    full = fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)

    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    with interrupted_at_rollout(adapter, 4):  # iteration 4 of 4: after the checkpoint at 2
        fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert not list(adapter.denoiser._forward_hooks.values())  # nothing left attached
    resumed = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_resume_restores_the_preservation_rollouts_too(tmp_path, interrupted_at_draw):
    """With preservation on, the kept concept's x_t has its own source (here a pool): its state
    goes into the checkpoint, so a resumed run still ends with the same weights."""
    cfg = RecelerConfig(
        prompt="a photo of a {concept}",
        **TINY,
        preserve_weight=1.0,
        preserve="dog, cat",
        rollout_source="pool",
        rollout_pool=2,
        rollout_refresh=1,
    )
    full = fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    assert full.metrics["rollout_draws"] == 2 * cfg.iterations  # one erase and one kept draw per iteration

    pipe = tiny_sd_pipeline()
    with interrupted_at_draw(7):  # the first draw of iteration 4 of 4: after the checkpoint at 2
        fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_concept_missing_from_prompt_is_an_error(sd_pipe):
    with pytest.raises(ValueError, match="car"):
        fit(sd_pipe, "car", RecelerConfig(prompt="a photo of a dog", **TINY), progress=False)


def test_edit_for_another_family_is_refused(sd_pipe, flux_pipe):
    edit = fit(
        sd_pipe, "car", RecelerConfig(prompt="a photo of a {concept}", **(TINY | {"iterations": 1})), progress=False
    )
    with pytest.raises(ValueError, match="family 'sd'"):
        apply(flux_pipe, edit)


def test_load_edit_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an erasekit edit"):
        load_edit(tmp_path)
    (tmp_path / "edit.json").write_text("{not json")
    (tmp_path / "edit.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt edit"):
        load_edit(tmp_path)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_preservation_silences_the_erasers_on_kept_concepts(family):
    """The extension's term is the only difference between the two runs; it must make the
    erasers act less on the kept concept's prompt than on the erased one's."""
    cfg = dict(TINY, prompt="a photo of a {concept}", adv_tokens=0, iterations=6, lr=3e-2)

    def eraser_energy(edit, prompt):
        pipe = BUILDERS[family]()
        adapter = adapter_for(pipe)
        x, t, cond = _inputs(adapter, prompt=prompt)
        apply(pipe, edit)
        with recording(adapter) as outs:
            adapter.predict(x, t, cond)
        return receler.preservation_loss(outs).item()

    plain = fit(BUILDERS[family](), "car", RecelerConfig(**cfg), progress=False)
    kept = fit(BUILDERS[family](), "car", RecelerConfig(**cfg, preserve_weight=1e4, preserve="dog"), progress=False)
    assert plain.hyperparameters["preserved_concepts"] == [] and kept.hyperparameters["preserved_concepts"] == ["dog"]
    assert eraser_energy(kept, "a photo of a dog") < 0.1 * eraser_energy(plain, "a photo of a dog")
    assert eraser_energy(kept, "a photo of a car") > 0


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_preserve_layers_silences_the_named_points_only(family):
    """With ``preserve_layers`` naming one point, the erasers there go silent on the kept
    concept's prompt and the others keep acting on it as without preservation."""
    cfg = dict(TINY, prompt="a photo of a {concept}", adv_tokens=0, iterations=6, lr=3e-2)
    first = next(iter(build_erasers(adapter_for(BUILDERS[family]()), rank=8)))

    def energy(edit, points):
        pipe = BUILDERS[family]()
        adapter = adapter_for(pipe)
        x, t, cond = _inputs(adapter, prompt="a photo of a dog")
        apply(pipe, edit)
        chosen = {n for n in build_erasers(adapter, rank=8) if (n == first) == (points == "first")}
        with recording(adapter, chosen) as outs:
            adapter.predict(x, t, cond)
        assert len(outs) == len(chosen)
        return receler.preservation_loss(outs).item()

    plain = fit(BUILDERS[family](), "car", RecelerConfig(**cfg), progress=False)
    kept = RecelerConfig(**cfg, preserve_weight=1e4, preserve="dog", preserve_layers=first)
    one = fit(BUILDERS[family](), "car", kept, progress=False)
    assert energy(one, "first") < 0.1 * energy(plain, "first")
    assert energy(one, "others") > 0.1 * energy(plain, "others") > 0
    with pytest.raises(ConfigError, match="receler: preserve_layers 'no_such_block' matches no eraser point"):
        fit(BUILDERS[family](), "car", dataclasses.replace(kept, preserve_layers="no_such_block"), progress=False)
    with pytest.raises(ConfigError, match="preserve_layers"):
        RecelerConfig(preserve_layers=first)


def test_preserved_concepts_come_from_the_config_or_the_lexicon(sd_pipe):
    cfg = RecelerConfig(preserve_weight=1.0, lexicon="toyworld")
    assert receler.preserved_concepts(cfg, sd_pipe, "circle") == ["square", "triangle", "star", "heart", "cross"]
    assert receler.preserved_concepts(
        RecelerConfig(preserve_weight=1.0, preserve="dog, circle"), sd_pipe, "circle"
    ) == ["dog"]
    assert receler.preserved_concepts(RecelerConfig(), sd_pipe, "circle") == []  # weight 0: off
    with pytest.raises(ValueError, match="preserve="):
        receler.preserved_concepts(RecelerConfig(preserve_weight=1.0, preserve="circle"), sd_pipe, "circle")


def test_clean_erase_loss_joins_the_adversarial_one_only_with_a_soft_prompt():
    cfg = dict(TINY, prompt="a photo of a {concept}", iterations=2)
    adv = fit(tiny_sd_pipeline(), "car", RecelerConfig(**cfg), progress=False)
    both = fit(tiny_sd_pipeline(), "car", RecelerConfig(**cfg, adv_clean_erase=True), progress=False)
    assert any(not torch.equal(adv.tensors[k], both.tensors[k]) for k in adv.tensors if k.startswith("erasers."))
    plain = dict(cfg, adv_tokens=0)
    off = fit(tiny_sd_pipeline(), "car", RecelerConfig(**plain), progress=False)
    flag = fit(tiny_sd_pipeline(), "car", RecelerConfig(**plain, adv_clean_erase=True), progress=False)
    assert all(torch.equal(off.tensors[k], flag.tensors[k]) for k in off.tensors)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_erase_target_is_anchored_on_anchor_prompt(family):
    """With eta 0 the target is the frozen model's prediction on the anchor. Anchored on the
    erased prompt itself, the target equals the zero-initialised student's prediction: the loss
    is 0 and the erasers never move. Anchored on "" (paper), they do."""
    cfg = dict(TINY, prompt="a photo of a {concept}", adv_tokens=0, eta=0.0)
    same = fit(BUILDERS[family](), "car", RecelerConfig(**cfg, anchor_prompt="a photo of a car"), progress=False)
    plain = fit(BUILDERS[family](), "car", RecelerConfig(**cfg), progress=False)
    ups = lambda edit: [v for k, v in edit.tensors.items() if k.endswith(".up.weight")]
    assert same.metrics["final_erase_loss"] == 0.0
    assert all(torch.count_nonzero(u) == 0 for u in ups(same))
    assert plain.metrics["final_erase_loss"] > 0 and any(torch.count_nonzero(u) > 0 for u in ups(plain))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_input_space_adversary_moves_only_the_concept_words_rows(family, tmp_path, interrupted_at_draw):
    """adv_space="input": the adversary is the concept word's input row in every text encoder;
    the text encoders never change, the edit holds erasers only, and resume restores the rows."""
    cfg = RecelerConfig(adv_space="input", **TINY)
    pipe = BUILDERS[family]()
    encoders = {
        n: {k: v.clone() for k, v in m.state_dict().items()}
        for n, m in pipe.components.items()
        if n.startswith("text_encoder") and m is not None
    }
    seen = []
    real = receler.attack_word

    def spy(adapter, erasers, rows, *a, **k):
        before = {n: r.detach().clone() for n, r in rows.items()}
        out = real(adapter, erasers, rows, *a, **k)
        seen.append({n: not torch.equal(before[n], r) for n, r in rows.items()})
        assert all(p.grad is None for m in adapter.text_encoders() for p in m.parameters())
        assert all(p.grad is None for p in adapter.denoiser.parameters())
        return out

    receler.attack_word = spy
    try:
        full = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        receler.attack_word = real
    towers = {"sd": {"text_encoder"}, "flux": {"text_encoder", "text_encoder_2"}}[family]
    # iteration 1: the erasers start at zero, so the attack's loss and gradient are zero there
    assert len(seen) == cfg.iterations and all(set(s) == towers for s in seen)
    assert all(all(s.values()) for s in seen[1:])
    for n, state in encoders.items():
        assert all(torch.equal(v, getattr(pipe, n).state_dict()[k]) for k, v in state.items())
    assert all(k.startswith("erasers.") for k in full.tensors)
    with interrupted_at_draw(4):  # iteration 4 of 4: after the checkpoint at 2
        fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_a_population_of_input_space_adversaries(sd_pipe, tmp_path, interrupted_at_draw):
    """adv_population: the first adversary starts at the concept word's row, the others at other
    tokens' rows; each iteration steps one of them (the others stay), and resume restores all."""
    from erasekit.methods.adversary import word_rows

    cfg = RecelerConfig(adv_space="input", adv_population=3, **(TINY | {"iterations": 6, "checkpoint_every": 3}))
    concept_row = word_rows(sd_pipe, "car")["text_encoder"]
    seen = []
    real = receler.attack_word

    def spy(adapter, erasers, rows, *a, **k):
        seen.append((rows["text_encoder"], rows["text_encoder"].detach().clone()))
        return real(adapter, erasers, rows, *a, **k)

    receler.attack_word = spy
    try:
        full = fit(sd_pipe, "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        receler.attack_word = real
    members = list(dict.fromkeys(id(r) for r, _ in seen))
    assert len(seen) == 6 and len(members) >= 2  # several adversaries took turns
    starts = {}
    for row, before in seen:
        starts.setdefault(id(row), before)
    first_turns = list(starts.values())
    assert sum(torch.equal(b, concept_row) for b in first_turns) <= 1
    assert any(not torch.equal(b, concept_row) for b in first_turns)  # a random token's row, not the word's
    with interrupted_at_draw(5):  # after the checkpoint at 3
        fit(tiny_sd_pipeline(seed=0), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(tiny_sd_pipeline(seed=0), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)
    with pytest.raises(UserError, match="adv_population"):
        RecelerConfig(adv_population=2)


def test_input_space_adversary_needs_a_one_token_concept(sd_pipe):
    with pytest.raises(UserError, match="'teddy bear' is not one token for the text_encoder tokenizer"):
        fit(sd_pipe, "teddy bear", RecelerConfig(adv_space="input", **TINY), progress=False)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_image_adversary_denoises_the_concepts_images_as_textual_inversion(family, tmp_path, interrupted_at_draw):
    """adv_images: the adversary's target is the training target at a noised latent of the frozen
    model's concept images (made once, edits off), the erasers also erase there, and resume
    reproduces the run."""
    cfg = RecelerConfig(adv_space="input", adv_images=2, adv_image_steps=2, **TINY)
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    made, targets, drawn = [], [], []
    real_generate, real_attack, real_noised = type(adapter).generate, receler.attack_word, receler.noised_latent

    def generate(self, prompts, seeds, **kw):
        made.append((list(prompts), self.edit_stack.depth > 0))  # depth > 0: edits disabled
        return real_generate(self, prompts, seeds, **kw)

    def spy(adapter, erasers, rows, concept, prompt, x_t, t, target, *a, **k):
        targets.append((x_t, t, target))
        return real_attack(adapter, erasers, rows, concept, prompt, x_t, t, target, *a, **k)

    def noised(adapter, latents, g):
        out = real_noised(adapter, latents, g)
        drawn.append((latents, out))
        return out

    type(adapter).generate, receler.attack_word, receler.noised_latent = generate, spy, noised
    try:
        full = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        type(adapter).generate, receler.attack_word, receler.noised_latent = real_generate, real_attack, real_noised
    assert made == [(["car", "car"], True)]
    assert len(targets) == len(drawn) == cfg.iterations
    # The adversary's (x_t, t, target) is a noised latent of one of the 2 images and the denoiser's
    # training target there (noise for SD's epsilon model, noise - x0 for Flux's velocity).
    for (x, t, tgt), (latents, (x_i, t_i, target_i)) in zip(targets, drawn):
        assert latents.shape[0] == 2 and x.shape[0] == 1
        assert x is x_i and t is t_i and tgt is target_i
    assert full.metrics["phase_seconds"]["adversary"] > 0
    with interrupted_at_draw(4):
        fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_image_adversary_needs_an_input_space_adversary():
    from erasekit.methods.config import ConfigError

    with pytest.raises(ConfigError, match="adv_images must be 0 unless adv_space is input"):
        RecelerConfig(adv_images=2, **TINY)


def test_mask_of_a_fixed_area_keeps_the_most_attended_pixels():
    # One layer, one head, one token, 2 images on a 2x4 grid: attention rises left to right.
    ramp = torch.arange(8.0).reshape(1, 1, 8, 1)
    maps = [torch.cat([ramp, ramp.flip(2)])]  # (2, 1, 8, 1)
    by_area = receler.concept_mask(maps, (2, 4), threshold=0.1, area=0.25)
    assert by_area.shape == (2, 2, 4)
    assert by_area[0].flatten().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert by_area[1].flatten().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # The threshold rule (paper) marks every pixel at >= 10% of the min-max range: 7 of 8 here.
    by_threshold = receler.concept_mask(maps, (2, 4), threshold=0.1)
    assert by_threshold.sum().item() == 14


@pytest.mark.parametrize("area", [0.0, 0.25])
def test_fit_records_the_masks_coverage(sd_pipe, area):
    edit = fit(sd_pipe, "car", RecelerConfig(prompt="a photo of a {concept}", reg_area=area, **TINY), progress=False)
    coverage = edit.metrics["mask_coverage"]
    assert 0 < coverage <= 1
    if area:
        assert coverage == pytest.approx(area, abs=0.1)  # ties at the cut may add a pixel or two


@pytest.mark.parametrize("family", list(BUILDERS))
def test_erasers_on_the_prompts_keys_and_values(family, tmp_path):
    """eraser_site="text_proj": one eraser per text projection; the edit saves, loads and applies
    like any Receler edit, and the regulariser (image positions) must be off."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    cfg = RecelerConfig(prompt="a photo of a {concept}", eraser_site="text_proj", reg_weight=0.0, **TINY)
    edit = fit(pipe, "car", cfg, progress=False)
    names = {k.split(".", 1)[1].rsplit(".", 2)[0] for k in edit.tensors if k.startswith("erasers.")}
    assert names == {p.name for p in adapter.attachment_points("text_proj")}
    erasers = sum(v.numel() for k, v in edit.tensors.items() if k.startswith("erasers."))
    assert receler.trainable_parameters(pipe, cfg) == erasers
    x, t, cond = _inputs(adapter, prompt="a photo of a car")
    base = adapter.predict(x, t, cond)
    edit.save(tmp_path / "e")
    loaded = load_edit(tmp_path / "e")
    apply(pipe, loaded)
    assert not torch.allclose(adapter.predict(x, t, cond), base)
    remove(pipe, loaded)
    assert torch.equal(adapter.predict(x, t, cond), base)
    with pytest.raises(UserError, match="reg_weight"):
        RecelerConfig(eraser_site="text_proj")


def test_extra_erasers_are_named_as_unused_on_the_text_projections(caplog):
    """The fast preset's extra_erasers has no text-projection counterpart: the same erasers, and
    a log line that says so."""
    adapter = adapter_for(BUILDERS["flux"]())
    with caplog.at_level("INFO", logger="erasekit.methods.receler"):
        extra = receler.eraser_points(adapter, True, "text_proj")
    assert [p.name for p in extra] == [p.name for p in receler.eraser_points(adapter, False, "text_proj")]
    assert "extra_erasers has no effect" in caplog.text


@pytest.mark.parametrize("where", ["kept", "adversary", "both"])
def test_preservation_runs_under_the_prompt_asked_for(where, monkeypatch):
    """preserve_prompt: the kept concept's x_t is denoised under the kept concept's prompt, the
    adversary's prompt of the iteration (the concept word with its soft tokens), or both."""
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    dog = adapter.encode(["a photo of a dog"]).embeds
    cls = type(adapter)
    real = cls.predict
    calls = []

    def spy(self, latents, t, cond, guidance=None):
        if torch.is_grad_enabled():  # the adversary's and the student's passes
            calls.append(cond.embeds.detach().clone())
        return real(self, latents, t, cond, guidance)

    monkeypatch.setattr(cls, "predict", spy)
    cfg = RecelerConfig(
        prompt="a photo of a {concept}", **TINY, preserve_weight=1.0, preserve="dog", preserve_prompt=where
    )
    fit(pipe, "car", cfg, progress=False)
    on_dog = sum(e.shape == dog.shape and torch.equal(e, dog) for e in calls)
    per_iteration = cfg.adv_steps + 1 + (2 if where == "both" else 1)  # adversary, erase, preservation
    assert len(calls) == cfg.iterations * per_iteration
    assert on_dog == (0 if where == "adversary" else cfg.iterations)
    with pytest.raises(UserError, match="preserve_prompt"):
        RecelerConfig(preserve_prompt="adversary")  # no preservation term to run

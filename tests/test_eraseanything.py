"""EraseAnything on tiny pipelines of both families (and the real FLUX.1-dev config on meta)."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from edit_asserts import assert_same_tensors
from peft.tuners.tuners_utils import BaseTunerLayer
from test_models_meta import FLUX1_DEV_TRANSFORMER, SD14_UNET
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

import erasekit
from erasekit import lexicon
from erasekit.edits import apply, load_edit, remove
from erasekit.edits.lora import attach_lora, init_lora, lora_shapes, lora_targets
from erasekit.errors import UserError
from erasekit.methods import eraseanything as ea
from erasekit.methods import make_config
from erasekit.methods.eraseanything import EraseAnythingConfig, fit
from erasekit.models import Conditioning, FamilyAdapter, adapter_for
from erasekit.toyworld import lexicon as toy_lexicon

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
# Words of the tiny pipelines' vocabulary; "teddy bear" is a two-token synonym.
WORDS = dict(synonyms="teddy bear", irrelevant="dog,cat,tree")
TINY = dict(
    iterations=4, preserve_images=2, preserve_steps=2, rollout_steps=3, rsc_steps=2, checkpoint_every=2, **WORDS
)


def _cfg(**kw) -> EraseAnythingConfig:
    return EraseAnythingConfig(**(TINY | kw))


def _inputs(adapter, prompt="a photo of a car", seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g), adapter.encode([prompt])


def _predict(adapter, inputs):
    with torch.no_grad():
        return adapter.predict(*inputs)


def _shapes(adapter, rank):
    """EraseAnything's LoRA shapes at its default targets."""
    return lora_shapes(adapter, rank, lora_targets(adapter, EraseAnythingConfig.targets))


def _random_lora(adapter, seed=0, std=0.3):
    """A LoRA in the diffusers layout with non-zero A and B (the trained init has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * std for k, s in _shapes(adapter, 8).items()}


@pytest.fixture(scope="module")
def trained():
    """One short run per family with a large learning rate, so that the edit is visible."""
    out = {}
    for family, build in BUILDERS.items():
        out[family] = fit(build(), "car", _cfg(lr=3e-2), progress=False)
    return out


# ---- structure ------------------------------------------------------------------------------


def test_lora_on_the_real_flux1_dev_config_has_76_tensors_and_1867776_parameters():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)
    adapter = FamilyAdapter.for_denoiser(transformer)
    shapes = _shapes(adapter, EraseAnythingConfig().rank)
    assert len(shapes) == 76
    assert sum(a * b for a, b in shapes.values()) == 1_867_776
    assert all(k.startswith("transformer.transformer_blocks.") for k in shapes)
    assert {k.split(".")[-3] for k in shapes} == {"add_q_proj", "add_k_proj"}
    # Injected through peft with the full module names: nothing else is matched.
    with torch.device("meta"):
        handle = attach_lora(adapter, {k: torch.empty(s) for k, s in shapes.items()}, "meta")
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(lora) == 76 and sum(p.numel() for p in lora.values()) == 1_867_776
    assert len(_layers(transformer)) == 38
    handle.remove()
    assert not _layers(transformer)


def test_lora_on_sd14_sits_on_the_cross_attention_keys_and_values():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
    shapes = _shapes(FamilyAdapter.for_denoiser(unet), 8)
    assert len(shapes) == 64  # 16 attn2 x (to_k, to_v) x (A, B)
    assert all(".attn2.to_k.lora_" in k or ".attn2.to_v.lora_" in k for k in shapes)
    assert all(k.startswith("unet.") for k in shapes)
    assert all(a == 8 and b == 768 for k, (a, b) in shapes.items() if "lora_A" in k)


def _layers(denoiser):
    return [n for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lora_wraps_exactly_the_target_projections(family):
    adapter = adapter_for(BUILDERS[family]())
    handle = attach_lora(adapter, _random_lora(adapter), "t")
    names = [p.name for p in lora_targets(adapter, EraseAnythingConfig.targets)]
    assert sorted(_layers(adapter.denoiser)) == sorted(names)
    suffixes = {n.rsplit(".", 1)[1] for n in names}
    assert suffixes == ({"to_k", "to_v"} if family == "sd" else {"add_q_proj", "add_k_proj"})
    handle.remove()


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_gaussian_init_leaves_the_model_unchanged(family):
    adapter = adapter_for(BUILDERS[family]())
    inputs = _inputs(adapter)
    base = _predict(adapter, inputs)
    init = init_lora(_shapes(adapter, 8), torch.Generator().manual_seed(0))
    a = torch.cat([v.flatten() for k, v in init.items() if "lora_A" in k])
    assert abs(a.std().item() - 1 / 8) < 0.01  # peft's "gaussian": A ~ N(0, 1/r), B = 0
    assert all(not v.any() for k, v in init.items() if "lora_B" in k)
    handle = attach_lora(adapter, init, "init")
    assert torch.equal(_predict(adapter, inputs), base)
    handle.remove()


# ---- the frozen teacher ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_negative_guidance_target_comes_from_the_base_model(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    x, t, cond = _inputs(adapter)
    anchor = adapter.encode([""])
    base = ea.negative_guidance_target(adapter, x, t, cond, anchor, 1.0)
    handle = attach_lora(adapter, _random_lora(adapter), "student", trainable=True)
    with_lora = ea.negative_guidance_target(adapter, x, t, cond, anchor, 1.0)
    torch.testing.assert_close(with_lora, base, rtol=0, atol=1e-6)
    # The same computation with the LoRA left on differs: the switch is what makes it frozen.
    with torch.no_grad():
        out = adapter.predict(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([anchor, cond]))
    v_a, v_c = out.chunk(2)
    assert (v_a - (v_c - v_a) - base).abs().max() > 1e-4
    assert all(p.requires_grad for p in handle.parameters())  # the switch restored the flags
    handle.remove()


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_teacher_passes_run_with_the_lora_off_and_the_student_with_it_on(family, monkeypatch):
    """Every denoiser call of a training run, classified: a run that computed teacher terms
    (or frozen features) with the LoRA on, or student passes with it off, fails here."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    calls = []
    state = {"rollout": 0, "generate": 0}
    real_predict, real_rollout, real_generate = (type(adapter).predict, type(adapter).rollout, type(adapter).generate)

    def lora_on(a):
        layers = [m for m in a.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            return None
        flags = {
            not m.disable_adapters and any(n.startswith("erasekit_training") for n in m.active_adapters)
            for m in layers
        }
        assert len(flags) == 1, "some LoRA layers on, others off"
        return flags.pop()

    def predict(self, *args, **kwargs):
        calls.append(
            {
                "grad": torch.is_grad_enabled(),
                "lora": lora_on(self),
                "rollout": state["rollout"] > 0,
                "generate": state["generate"] > 0,
            }
        )
        return real_predict(self, *args, **kwargs)

    def rollout(self, *args, **kwargs):
        calls.append({"rollout_call": True, "lora": lora_on(self), "enabled": self.edits_enabled})
        state["rollout"] += 1
        try:
            return real_rollout(self, *args, **kwargs)
        finally:
            state["rollout"] -= 1

    def generate(self, *args, **kwargs):
        state["generate"] += 1
        calls.append({"generate_call": True, "lora": lora_on(self), "enabled": self.edits_enabled})
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            state["generate"] -= 1

    monkeypatch.setattr(type(adapter), "predict", predict)
    monkeypatch.setattr(type(adapter), "rollout", rollout)
    monkeypatch.setattr(type(adapter), "generate", generate)
    fit(pipe, "car", _cfg(iterations=4), progress=False)

    gen = [c for c in calls if c.get("generate_call")]
    assert gen and all(c["lora"] in (None, False) and not c["enabled"] for c in gen)  # frozen images
    passes = [c for c in calls if "grad" in c]
    rollouts = [c for c in passes if c["rollout"]]
    students = [c for c in passes if not c["rollout"] and c["grad"]]
    teachers = [c for c in passes if not c["rollout"] and not c["grad"]]
    rollout_calls = [c for c in calls if c.get("rollout_call")]
    assert len(rollout_calls) == 4 and all(c["lora"] and c["enabled"] for c in rollout_calls)
    assert all(c["lora"] for c in rollouts)  # x_t from the EDITED model
    assert students and all(c["lora"] for c in students)
    # lower: 2 teacher passes (anchor + concept, batched into one call); upper: F_syn + 3 F_ir
    assert teachers and all(c["lora"] is False for c in teachers)
    assert len(teachers) == 2 * (1 + 4)


# ---- prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_indices_point_at_the_synonym_after_shuffle_and_swap(family):
    adapter = adapter_for(BUILDERS[family]())
    tokenizer, max_length = adapter._main_tokenizer()
    g = torch.Generator().manual_seed(3)
    prompt = "a photo of a red car in the park"
    original = adapter.token_indices(prompt, "car")
    moved = 0
    for _ in range(10):
        new, word = ea.rewrite_prompt(prompt, "car", ["teddy bear"], g, shuffle_prob=1.0, synonym_prob=1.0)
        assert word == "teddy bear" and "car" not in new.split()
        assert sorted(new.replace("teddy bear", "X").split()) == sorted(prompt.replace("car", "X").split())
        idx = adapter.token_indices(new, word)
        ids = tokenizer(new, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        assert [ids[i] for i in idx] == tokenizer("teddy bear", add_special_tokens=False)["input_ids"]
        assert len(idx) == 2 and idx[1] == idx[0] + 1  # both pieces, contiguous
        moved += idx[0] != original[0]
    assert moved >= 5  # the keyword's position changes


def test_rewrite_probabilities_and_determinism():
    g = torch.Generator().manual_seed(0)
    p = "a photo of a car"
    assert ea.rewrite_prompt(p, "car", ["auto"], g, 0.0, 0.0) == (p, "car")
    for _ in range(5):
        new, word = ea.rewrite_prompt(p, "car", [], g, 0.0, 1.0)  # no synonyms: no swap
        assert (new, word) == (p, "car")
    a = [ea.rewrite_prompt(p, "car", ["auto", "automobile"], torch.Generator().manual_seed(7)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError, match="not in prompt"):
        ea.rewrite_prompt("a photo of a dog", "car", [], g)
    new, word = ea.rewrite_prompt(
        "a teddy bear, sitting", "teddy bear", ["car"], torch.Generator().manual_seed(1), 1.0, 0.0
    )
    assert "teddy bear" in new  # a multi-word keyword moves as one unit


# ---- losses ---------------------------------------------------------------------------------


def test_reverse_self_contrastive_and_pcgrad():
    f_syn = torch.tensor([1.0, 0.0, 0.0])
    ir = [torch.tensor([0.0, 1.0, 0.0])] * 3
    near, far = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    assert ea.reverse_self_contrastive(near, f_syn, ir) > ea.reverse_self_contrastive(far, f_syn, ir)
    s = torch.stack([torch.nn.functional.cosine_similarity(f_syn, f, dim=0) for f in [near, *ir]]) / 0.07
    torch.testing.assert_close(ea.reverse_self_contrastive(near, f_syn, ir), s[0] - torch.logsumexp(s, 0))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = ea.pcgrad(g1, g2)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))  # (1,0)->(0.5,0.5), (-1,1)->(0,1)
    torch.testing.assert_close(ea.pcgrad(g1, torch.tensor([1.0, 1.0])), torch.tensor([2.0, 1.0]))


# ---- the edit -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_stock_load_lora_weights_gives_the_same_images_as_apply(family, trained, tmp_path):
    edit = trained[family]
    edit.save(tmp_path / "edit")
    seeds, prompts = [0, 1], ["a photo of a car", "a red car in the park"]

    stock = BUILDERS[family]()
    base = adapter_for(stock).generate(prompts, seeds)
    stock.load_lora_weights(str(tmp_path / "edit"), weight_name=ea.LORA_WEIGHT_NAME)
    from_stock = adapter_for(stock).generate(prompts, seeds)

    ours = BUILDERS[family]()
    apply(ours, load_edit(tmp_path / "edit"))
    from_apply = adapter_for(ours).generate(prompts, seeds)
    assert torch.equal(from_stock, from_apply)
    assert (from_apply - base).abs().max() > 1e-3  # the edit does something


def test_pooled_projection_target_trains_and_loads_with_the_stock_loader(tmp_path):
    """Our extension: a LoRA on Flux's pooled-text projection beside the paper's targets."""
    targets = "add_q_proj,add_k_proj,text_embedder.linear_1"
    flux = adapter_for(tiny_flux_pipeline())
    assert [p.role for p in flux.attachment_points("pooled_proj")] == ["pooled"]
    names = [p.name for p in lora_targets(flux, targets)]
    assert names[-1] == "time_text_embed.text_embedder.linear_1" and len(names) == 5
    with pytest.raises(ValueError, match="no text projection"):
        lora_targets(adapter_for(tiny_sd_pipeline()), "text_embedder.linear_1")  # SD has none
    edit = fit(tiny_flux_pipeline(), "car", _cfg(lr=3e-2, targets=targets), progress=False)
    assert edit.tensors["transformer.time_text_embed.text_embedder.linear_1.lora_B.weight"].abs().sum() > 0
    edit.save(tmp_path / "edit")
    seeds, prompts = [0], ["a photo of a car"]
    stock = tiny_flux_pipeline()
    stock.load_lora_weights(str(tmp_path / "edit"), weight_name=ea.LORA_WEIGHT_NAME)
    ours = tiny_flux_pipeline()
    apply(ours, load_edit(tmp_path / "edit"))
    assert torch.equal(adapter_for(stock).generate(prompts, seeds), adapter_for(ours).generate(prompts, seeds))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_apply_remove_scale_save_load(family, trained, tmp_path):
    edit = trained[family]
    assert edit.method == "eraseanything" and edit.family == family and edit.concepts == ["car"]
    assert set(edit.tensors) == set(_shapes(adapter_for(BUILDERS[family]()), 8))
    hp = edit.hyperparameters
    assert hp["synonyms"] == ["teddy bear"] and hp["irrelevant_concepts"] == ["dog", "cat", "tree"]
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    before = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in adapter.denoiser.named_modules()]
    grads_before = [p.requires_grad for p in adapter.denoiser.parameters()]
    inputs = _inputs(adapter)
    base = _predict(adapter, inputs)

    apply(pipe, edit)
    edited = _predict(adapter, inputs)
    assert (edited - base).abs().max() > 1e-4
    with adapter.edits_disabled():
        torch.testing.assert_close(_predict(adapter, inputs), base, rtol=0, atol=0)
    remove(pipe, edit)
    # bit for bit: outputs, weights, module structure, requires_grad flags
    assert torch.equal(_predict(adapter, inputs), base)
    after = adapter.denoiser.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [(n, type(m)) for n, m in adapter.denoiser.named_modules()] == modules_before
    assert [p.requires_grad for p in adapter.denoiser.parameters()] == grads_before

    apply(pipe, edit, scale=0.0)
    assert torch.equal(_predict(adapter, inputs), base)  # scale 0 is the base model
    apply(pipe, edit, scale=0.5)  # re-applying replaces
    half = _predict(adapter, inputs)
    assert 0 < (half - base).abs().max() < (edited - base).abs().max()
    remove(pipe, edit)

    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    assert (
        loaded.id == edit.id and json.loads((tmp_path / "edit" / "edit.json").read_text())["method"] == "eraseanything"
    )
    assert all(torch.equal(loaded.tensors[k], edit.tensors[k]) for k in edit.tensors)
    apply(pipe, loaded)
    assert torch.equal(_predict(adapter, inputs), edited)
    remove(pipe, loaded)
    assert torch.equal(_predict(adapter, inputs), base)


def test_edits_keep_a_users_own_lora_active(trained):
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    inputs = _inputs(adapter)
    base = _predict(adapter, inputs)
    tensors = {k: v for k, v in _random_lora(adapter, seed=5).items() if ".to_k." in k}
    pipe.unet.load_lora_adapter(tensors, prefix="unet", adapter_name="user")
    user = _predict(adapter, inputs)
    assert (user - base).abs().max() > 1e-4
    apply(pipe, trained["sd"])
    both = _predict(adapter, inputs)
    assert not torch.allclose(both, user)
    remove(pipe, trained["sd"])
    torch.testing.assert_close(_predict(adapter, inputs), user, rtol=0, atol=0)
    assert pipe.unet.active_adapters() == ["user"]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, interrupted_at_rollout):
    cfg = _cfg(iterations=5)
    full = fit(tiny_flux_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)

    pipe = tiny_flux_pipeline()
    adapter = adapter_for(pipe)
    with interrupted_at_rollout(adapter, 4):  # iteration 4 of 5: after the checkpoint at 2
        fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["iteration"] == 2
    assert not _layers(adapter.denoiser)  # nothing left attached
    resumed = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)
    with pytest.raises(ValueError, match="other settings"):
        fit(pipe, "car", _cfg(iterations=5, lr=5e-3), checkpoint_dir=tmp_path / "b", progress=False)


def test_gradient_surgery_runs_and_differs_from_alternation():
    alternating = fit(tiny_sd_pipeline(), "car", _cfg(iterations=3), progress=False)
    surgery = fit(tiny_sd_pipeline(), "car", _cfg(iterations=3, gradient_surgery=True), progress=False)
    assert surgery.hyperparameters["gradient_surgery"] is True
    assert surgery.metrics["final_esd_loss"] is not None and surgery.metrics["final_fm_loss"] is not None
    assert any(not torch.equal(alternating.tensors[k], surgery.tensors[k]) for k in alternating.tensors)


def test_alpha_is_folded_into_the_saved_lora():
    """alpha != rank trains at scale alpha/rank; the file stores B * alpha/rank, so a stock
    loader (which assumes alpha = rank without metadata) gives the same model."""
    a = fit(tiny_sd_pipeline(), "car", _cfg(iterations=2, alpha=16.0, lr=1e-2), progress=False)
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    inputs = _inputs(adapter)
    base = _predict(adapter, inputs)
    apply(pipe, a)
    ours = _predict(adapter, inputs)
    remove(pipe, a)
    handle = attach_lora(adapter, {k: (v / 2 if "lora_B" in k else v) for k, v in a.tensors.items()}, "raw", scale=2.0)
    torch.testing.assert_close(_predict(adapter, inputs), ours, rtol=1e-5, atol=1e-6)
    handle.remove()
    assert (ours - base).abs().max() > 1e-5


def test_concept_missing_and_missing_words_are_errors(sd_pipe):
    with pytest.raises(ValueError, match="car"):
        fit(sd_pipe, "car", _cfg(prompts="a photo of a dog"), progress=False)
    with pytest.raises(ValueError, match="irrelevant"):
        fit(sd_pipe, "car", _cfg(irrelevant="", lexicon="none"), progress=False)


def test_presets_registry_and_cli_settings():
    assert "eraseanything" in erasekit.methods.METHODS
    paper = make_config("eraseanything")
    assert (paper.rank, paper.alpha, paper.lr, paper.weight_decay, paper.tau) == (8, 8.0, 1e-3, 1e-5, 0.07)
    assert paper.resolved_iterations("nudity") == 200 and paper.resolved_iterations("car") == 300
    fast = make_config(
        "eraseanything", "fast", {"iterations": "3", "gradient_surgery": "true", "synonyms": "auto, automobile"}
    )
    assert fast.iterations == 3 and fast.gradient_surgery is True and fast.lexicon == "toyworld"
    assert erasekit.methods.split_list(fast.synonyms) == ["auto", "automobile"]


def test_cli_erase_with_eraseanything(tmp_path):
    from tiny_pipelines import TINY_DEFAULTS

    from erasekit.cli import main
    from erasekit.models.loading import write_defaults

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    write_defaults(tmp_path / "model", TINY_DEFAULTS)
    sets = [
        "iterations=2",
        "preserve_images=2",
        "preserve_steps=2",
        "rollout_steps=2",
        "rsc_steps=1",
        "synonyms=teddy bear",
        "irrelevant=dog,cat,tree",
        "lexicon=none",
    ]
    args = [
        "erase",
        "--method",
        "eraseanything",
        "--model",
        str(tmp_path / "model"),
        "--concept",
        "car",
        "--out",
        str(tmp_path / "edit"),
    ]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    meta = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert meta["method"] == "eraseanything" and meta["hyperparameters"]["iterations"] == 2


def test_words_come_from_the_chosen_lexicon(sd_pipe, monkeypatch):
    syn, ir, source = ea.concept_words(EraseAnythingConfig(lexicon="toyworld", preserve_images=6), sd_pipe, "circle")
    assert source == "toyworld" and syn == ["disc", "disk", "orb", "round shape"]
    assert ir[:3] == ["square", "box", "window pane"]  # close, mid, far round-robin
    assert len(ir) == 6
    syn, ir, source = ea.concept_words(
        EraseAnythingConfig(lexicon="toyworld", synonyms="orb", irrelevant="star"), sd_pipe, "circle"
    )
    assert (syn, ir) == (["orb"], ["star"])
    syn, ir, source = ea.concept_words(_cfg(), sd_pipe, "car")  # both lists given: no lexicon needed
    assert source == "config"
    # auto: the toy world's grammar for its own pipelines, WordNet elsewhere
    monkeypatch.setattr(lexicon, "get_lexicon", lambda name: name)
    assert lexicon.lexicon_for("auto", sd_pipe, "circle") == "wordnet"
    monkeypatch.setattr(toy_lexicon, "is_toy_pipeline", lambda pipe: True)
    assert lexicon.lexicon_for("auto", sd_pipe, "circle") == "toyworld"
    assert lexicon.lexicon_for("auto", sd_pipe, "car") == "wordnet"


def test_no_synonyms_is_logged_and_training_goes_on(sd_pipe, caplog):
    with caplog.at_level("WARNING", logger="erasekit"):
        syn, ir, _ = ea.concept_words(_cfg(synonyms="", lexicon="toyworld"), sd_pipe, "car")
    assert syn == [] and ir == ["dog", "cat", "tree"]
    assert "no synonyms for 'car'" in caplog.text and "synonym swap and L_rsc are off" in caplog.text


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_batched_teacher_features_equal_the_separate_ones(family):
    """``batch_teacher``: the frozen L_rsc features of several prompts from one pass equal the
    per-prompt passes (up to float rounding), and a run with it makes fewer denoiser calls."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    config = _cfg(rsc_irrelevant=3)
    trainer = ea._Trainer(adapter, "car", config, ["teddy bear"], ["dog", "cat", "tree"], torch.Generator(), 4)
    x_t, t, _ = _inputs(adapter)
    prompt = config.preserve_prompt.format(concept="teddy bear")
    items = [(trainer.cond(prompt), adapter.token_indices(prompt, "teddy bear")), *trainer.ir_rsc]
    with torch.no_grad():
        batched = trainer.features(x_t, t, items)
        separate = [trainer.feature(x_t, t, c, idx) for c, idx in items]
    assert len(batched) == 4
    for b, s in zip(batched, separate):
        assert b.shape == s.shape == (1, s.shape[1])
        torch.testing.assert_close(b, s, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(separate[0], separate[1])  # the items' features differ: the pick is per item
    plain = fit(pipe, "car", _cfg(rsc_irrelevant=3), progress=False)
    fewer = fit(pipe, "car", _cfg(rsc_irrelevant=3, batch_teacher=True), progress=False)
    upper_iterations = 2  # of 4, alternating; each saves K = 3 passes
    assert plain.metrics["denoiser_calls"] - fewer.metrics["denoiser_calls"] == 3 * upper_iterations


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_uncond_weight_keeps_the_empty_prompts_prediction(family):
    """``uncond_weight``: the LoRA's prediction on the empty prompt stays near the frozen model's
    (measured: 28% -> 5% relative change on tiny SD, 0.6% -> 0.2% on tiny Flux)."""
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    g = torch.Generator().manual_seed(0)
    x, t, empty = adapter.sample_noise(2, generator=g), adapter.sample_timesteps(2, generator=g), adapter.encode([""])
    with torch.no_grad():
        ref = adapter.predict(x, t, empty)
    change = {}
    for weight in (0.0, 100.0):
        edit = fit(pipe, "car", _cfg(iterations=8, lr=1e-2, uncond_weight=weight), progress=False)
        apply(pipe, edit)
        with torch.no_grad():
            change[weight] = float((adapter.predict(x, t, empty) - ref).norm() / ref.norm())
        remove(pipe, edit)
    assert change[100.0] < 0.5 * change[0.0]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_image_adversary_learns_the_concept_word_on_the_concepts_images(family, tmp_path, interrupted_at_draw):
    """``adv_images``: the images come from the frozen model; the adversary moves the concept
    word's input rows only (no LoRA or text-encoder gradient), towards the training target of a
    noised image latent; the lower level erases there too; resume reproduces the run."""
    from erasekit.methods import eraseanything

    cfg = _cfg(iterations=4, adv_images=2, adv_steps=2, adv_image_steps=2)
    pipe = BUILDERS[family]()
    seen, real = [], eraseanything.attack_word

    def spy(adapter, keep, rows, word, prompt, x_t, t, target, opt, steps):
        before = {n: r.detach().clone() for n, r in rows.items()}
        out = real(adapter, keep, rows, word, prompt, x_t, t, target, opt, steps)
        assert all(p.grad is None for p in adapter.denoiser.parameters())  # the LoRA's included
        assert all(p.grad is None for m in adapter.text_encoders() for p in m.parameters())
        seen.append((word, prompt, x_t.shape[0], {n: not torch.equal(before[n], r) for n, r in rows.items()}))
        return out

    eraseanything.attack_word = spy
    try:
        full = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        eraseanything.attack_word = real
    assert len(seen) == 2  # one per lower-level iteration
    towers = {"sd": {"text_encoder"}, "flux": {"text_encoder", "text_encoder_2"}}[family]
    assert all(w == "car" and p == "a photo of car" and b == 1 and set(moved) == towers for w, p, b, moved in seen)
    assert all(any(moved.values()) for *_, moved in seen)
    assert full.metrics["phase_seconds"]["adversary"] > 0
    with interrupted_at_draw(3):  # the second lower level's draw, after the checkpoint at 2
        fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)


def test_adversary_preservation_runs_under_the_adversarys_current_prompt(tmp_path, interrupted_at_draw):
    """``adv_preserve_weight``: each upper level denoises its irrelevant image under the prompt
    with the adversary's current rows (not the plain prompt), and resume still reproduces the run."""
    from erasekit.methods.eraseanything import _Trainer

    cfg = _cfg(iterations=4, adv_images=2, adv_steps=2, adv_image_steps=2, adv_preserve_weight=1.0)
    pipe = tiny_sd_pipeline()
    plain = adapter_for(pipe).encode(["a photo of car"]).embeds
    seen, real = [], _Trainer.adversary_cond

    def spy(self):
        cond = real(self)
        seen.append(cond.embeds.clone())
        return cond

    _Trainer.adversary_cond = spy
    try:
        full = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        _Trainer.adversary_cond = real
    assert len(seen) == 2  # one per upper level
    assert all(not torch.equal(e, plain) for e in seen)  # the adversary had moved the rows
    with interrupted_at_draw(3):
        fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)
    with pytest.raises(UserError, match="adv_preserve_weight"):
        _cfg(adv_preserve_weight=1.0)


def test_rollout_adversary_steps_at_the_lower_levels_x_t(tmp_path, interrupted_at_draw):
    """``adv_rollout``: the adversary moves the concept word's input rows at the lower level's
    rollout x_t (no images made), towards the frozen model's concept prediction there; resume
    reproduces the run."""
    from erasekit.methods import eraseanything

    cfg = _cfg(iterations=4, adv_rollout=True, adv_steps=2, adv_preserve_weight=1.0)
    seen, real = [], eraseanything.attack_word

    def spy(adapter, keep, rows, word, prompt, x_t, t, target, opt, steps):
        before = {n: r.detach().clone() for n, r in rows.items()}
        out = real(adapter, keep, rows, word, prompt, x_t, t, target, opt, steps)
        assert all(p.grad is None for p in adapter.denoiser.parameters())
        seen.append((word, prompt, any(not torch.equal(before[n], r) for n, r in rows.items())))
        return out

    eraseanything.attack_word = spy
    try:
        full = fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    finally:
        eraseanything.attack_word = real
    assert seen == [("car", "a photo of car", True)] * 2  # one per lower level
    assert "adv_images" not in full.tensors
    with interrupted_at_draw(3):
        fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)
    with pytest.raises(UserError, match="adv_rollout"):
        _cfg(adv_rollout=True, adv_images=2)

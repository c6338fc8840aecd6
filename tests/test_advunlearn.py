"""AdvUnlearn on tiny pipelines of both families: only the text encoders train, the adversary's
gradient reaches only its soft tokens, each attack step uses its own gradient, the retain term
starts at zero, no attack runs in warm-up, resume gives the same edit, and the edit leaves
erasekit as a stock text-encoder folder (METHODS2.md, "AdvUnlearn")."""

import dataclasses

import pytest
import torch
from edit_asserts import assert_same_tensors
from real_configs import CLIP_L_TEXT, T5_XXL
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.edits import apply, load_edit, remove
from erasekit.edits.weight_delta import export_merged
from erasekit.methods import ConfigError, advunlearn, make_config
from erasekit.methods.adversary import placeholder_words, random_rows, with_soft_tokens
from erasekit.methods.advunlearn import AdvUnlearnConfig, attack, encoder_parameters
from erasekit.methods.hooks import TrainingHooks, training_hooks
from erasekit.methods.losses import prediction_loss
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
CONFIG = AdvUnlearnConfig(
    iterations=3,
    warmup=1,
    lr=1e-3,
    attack_steps=2,
    retain="dog, cat, tree",
    retain_batch=2,
    lexicon="none",
    rollout_steps=3,
)


def _cfg(**overrides):
    return dataclasses.replace(CONFIG, **overrides)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


class _Fixed:
    """An x_t source that always returns the same draw."""

    def __init__(self, adapter, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)

    def draw(self, cond, uncond, generator):
        return self.x.expand(cond.batch_size, *self.x.shape[1:]).clone(), self.t.expand(cond.batch_size).clone()


def test_sd14_text_encoder_parameters():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    # METHODS2.md: text_encoder_full = 12 layers + final layer norm, embeddings frozen.
    assert sum(p.numel() for p in encoder_parameters(clip).values()) == 85_056_000
    assert not any("embeddings" in n for n in encoder_parameters(clip))
    t5_params = encoder_parameters(t5)
    assert not any("shared" in n or "embed_tokens" in n or "relative_attention_bias" in n for n in t5_params)
    assert sum(p.numel() for p in t5_params.values()) == 4_630_712_320


@pytest.mark.parametrize("family", list(BUILDERS))
def test_only_the_text_encoders_change(family):
    pipe = BUILDERS[family]()
    before = {name: _state(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    edit = advunlearn.fit(pipe, "car", CONFIG, progress=False)
    after = {name: _state(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for name in before:  # the pipeline is left exactly as it was
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name]), name
    towers = {"sd": {"text_encoder"}, "flux": {"text_encoder", "text_encoder_2"}}[family]
    assert {k.split(":")[1].split(".")[0] for k in edit.tensors} == towers
    assert all(k.startswith("delta:") for k in edit.tensors)
    assert not any("embed" in k or "relative_attention_bias" in k for k in edit.tensors)
    assert any(bool(d.abs().sum() > 0) for d in edit.tensors.values())
    assert edit.metrics["attacks"] == 2
    assert edit.metrics["trainable_parameters"] == sum(
        p.numel() for name in towers for p in encoder_parameters(getattr(pipe, name)).values()
    )


def test_encoders_setting_chooses_the_flux_tower():
    pipe = tiny_flux_pipeline()
    edit = advunlearn.fit(pipe, "car", _cfg(encoders="text_encoder_2", iterations=1, warmup=0), progress=False)
    assert {k.split(":")[1].split(".")[0] for k in edit.tensors} == {"text_encoder_2"}
    with pytest.raises(ValueError, match="text encoders are text_encoder, text_encoder_2"):
        advunlearn.fit(pipe, "car", _cfg(encoders="text_encoder_3"), progress=False)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_adversary_changes_only_its_tokens_and_lowers_its_loss(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    source = _Fixed(adapter)
    cond, uncond = adapter.encode(["a car"]), adapter.encode([""])
    words = placeholder_words(pipe, "a car", 1)
    init = random_rows(pipe, ["text_encoder", "text_encoder_2"], 1, torch.Generator().manual_seed(0))
    state = {name: _state(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}

    def loss(rows):
        x, t = source.draw(cond, uncond, None)
        with torch.no_grad(), with_soft_tokens(pipe, words, rows):
            return float(
                prediction_loss(
                    adapter.predict(x, t, adapter.encode([f"{words[0]} a car"])), adapter.predict(x, t, cond)
                )
            )

    cfg = _cfg(attack_steps=25, attack_lr=5e-2)
    rows = attack(adapter, adapter.text_encoders(), source, cond, uncond, f"{words[0]} a car", words, init, cfg, None)
    assert rows.keys() == init.keys() and all(not torch.equal(rows[n], init[n]) for n in rows)
    assert loss(rows) < loss(init)
    for name, m in pipe.components.items():  # no model tensor changed, and none got a gradient
        if isinstance(m, torch.nn.Module):
            assert all(torch.equal(v, state[name][k]) for k, v in m.state_dict().items())
            assert all(p.grad is None for p in m.parameters())


def test_each_attack_step_uses_its_own_gradient(monkeypatch):
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    cond, uncond = adapter.encode(["a car"]), adapter.encode([""])
    words = placeholder_words(pipe, "a car", 1)
    init = random_rows(pipe, ["text_encoder"], 1, torch.Generator().manual_seed(0))
    real_step = torch.optim.Adam.step

    def grads_of(accumulate):
        seen = []

        def step(self, *a, **k):
            seen.append(self.param_groups[0]["params"][0].grad.clone())
            return real_step(self, *a, **k)

        monkeypatch.setattr(torch.optim.Adam, "step", step)
        cfg = _cfg(attack_steps=2, attack_accumulate_grad=accumulate)
        attack(
            adapter,
            adapter.text_encoders(),
            _Fixed(adapter),
            cond,
            uncond,
            f"{words[0]} a car",
            words,
            init,
            cfg,
            None,
        )
        monkeypatch.setattr(torch.optim.Adam, "step", real_step)
        return seen

    own, summed = grads_of(False), grads_of(True)
    assert torch.equal(own[0], summed[0])
    assert not torch.equal(own[1], summed[1])
    assert torch.allclose(summed[1], own[0] + own[1])


class _Record(TrainingHooks):
    def __init__(self, stop=None):
        self.records, self.max_iterations = [], stop

    def iteration_ended(self, run, iteration, record):
        self.records.append(record)


def test_retain_term_starts_at_zero_and_no_attack_in_warmup(monkeypatch):
    calls = []
    real = advunlearn.attack

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(advunlearn, "attack", counting)
    with training_hooks(_Record()) as hooks:
        edit = advunlearn.fit(tiny_sd_pipeline(), "car", _cfg(iterations=4, warmup=2, attack_every=1), progress=False)
    assert hooks.records[0]["retain"] == 0.0  # tau' = tau0 before the first step
    assert hooks.records[1]["retain"] > 0.0
    assert len(calls) == 2 and edit.metrics["attacks"] == 2


def test_soft_tokens_sit_right_after_bos():
    pipe = tiny_flux_pipeline()
    words = placeholder_words(pipe, "the car", 2)
    assert "the" not in words and len(words) == 2
    tok = pipe.tokenizer
    ids = tok(" ".join(words) + " the car")["input_ids"]
    plain = tok("the car")["input_ids"]
    assert ids[0] == plain[0] == tok.bos_token_id
    assert ids[1:3] == [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    assert ids[3:] == plain[1:]  # the prompt's tokens shifted by k, then EOS
    with pytest.raises(ValueError, match="lower attack_tokens"):
        placeholder_words(pipe, "the car", 9)


def test_resume_gives_the_same_edit(tmp_path):
    cfg = _cfg(iterations=4, warmup=1, checkpoint_every=2, attack_init="latest")
    full = advunlearn.fit(tiny_sd_pipeline(), "car", cfg, progress=False)
    with training_hooks(_Record(stop=2)):
        advunlearn.fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path, progress=False)
    resumed = advunlearn.fit(tiny_sd_pipeline(), "car", cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.metrics["resumed_from"] == 2
    assert_same_tensors(full, resumed)


def test_edit_round_trip_and_stock_text_encoder_folder(tmp_path):
    from transformers import CLIPTextModel

    pipe = tiny_sd_pipeline()
    edit = advunlearn.fit(pipe, "car", CONFIG, progress=False)
    edit.save(tmp_path / "edit")
    loaded = load_edit(tmp_path / "edit")
    key = next(k for k in loaded.tensors if k.endswith("fc1.weight"))
    param = pipe.text_encoder.get_parameter(key.split(".", 1)[1])
    base = param.detach().clone()
    apply(pipe, loaded)
    assert torch.allclose(param, base + loaded.tensors[key])
    edited = adapter_for(pipe).encode(["a car"]).embeds
    remove(pipe, loaded)
    assert torch.equal(param, base)
    export_merged(pipe, loaded, tmp_path / "merged")
    stock = CLIPTextModel.from_pretrained(tmp_path / "merged" / "text_encoder")
    ids = pipe.tokenizer(
        ["a car"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(stock(ids.input_ids)[0], edited, atol=1e-6)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="warmup"):
        make_config("advunlearn", "paper", {"warmup": "2000"})
    with pytest.raises(ConfigError, match="attack_init"):
        make_config("advunlearn", "fast", {"attack_init": "zeros"})
    with pytest.raises(ConfigError, match="lr"):
        make_config("advunlearn", "fast", {"lr": "nan"})

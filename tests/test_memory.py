"""Memory features of the training methods: text encoders released during training, gradient
checkpointing of unprobed blocks (same gradients), bfloat16 pipelines."""

import pytest
import torch
import torch.nn.functional as F
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.methods import eraseanything as ea
from erasekit.methods import esd, receler
from erasekit.methods.memory import training_memory
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
ROLL = dict(rollout_steps=3)
TINY = {
    "eraseanything": (
        ea.EraseAnythingConfig,
        dict(
            iterations=4,
            preserve_images=2,
            preserve_steps=2,
            rsc_steps=2,
            synonyms="teddy bear",
            irrelevant="dog,cat,tree",
            lr=3e-2,
        ),
    ),
    "receler": (receler.RecelerConfig, dict(iterations=2, adv_steps=2, rank=4, lr=3e-2)),
    "esd": (esd.ESDConfig, dict(iterations=2, lr=1e-3)),
}
CONFIGS = {m: (lambda cls=cls, base=base, **kw: cls(**(ROLL | base | kw))) for m, (cls, base) in TINY.items()}
FITS = {"eraseanything": ea.fit, "receler": receler.fit, "esd": esd.fit}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_encode_raises_while_the_text_encoders_are_released(family):
    adapter = adapter_for(BUILDERS[family]())
    before = adapter.encode(["a photo of a car"])
    with adapter.text_encoders_released():
        with pytest.raises(RuntimeError, match="released"):
            adapter.encode(["a photo of a car"])
    after = adapter.encode(["a photo of a car"])
    assert torch.equal(before.embeds, after.embeds)
    assert all(next(m.parameters()).device.type == "cpu" for m in adapter.text_encoders())


@pytest.mark.parametrize("method", sorted(FITS))
def test_training_encodes_nothing_after_releasing_the_text_encoders(method, monkeypatch):
    """The methods' loops run inside text_encoders_released: an encode there would raise.
    Count the encodes to be sure the guard was armed (EraseAnything: every prompt of its plan)."""
    pipe = tiny_flux_pipeline()
    adapter = adapter_for(pipe)
    released = []
    real = type(adapter).text_encoders_released

    def spy(self, *a, **kw):
        released.append(True)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(adapter), "text_encoders_released", spy)
    FITS[method](pipe, "car", CONFIGS[method](), progress=False)
    assert released == [True]


def test_eraseanything_draws_its_prompt_plan_up_front():
    pipe = tiny_sd_pipeline()
    adapter = adapter_for(pipe)
    cfg = CONFIGS["eraseanything"](iterations=7)
    trainer = ea._Trainer(
        adapter, "car", cfg, ["teddy bear"], ["dog", "cat", "tree"], torch.Generator().manual_seed(0), 7
    )
    assert len(trainer.plan) == 4  # lower level on iterations 0, 2, 4, 6
    for prompt, idx in trainer.plan:
        words = [w for w in ("car", "teddy bear") if w in prompt]
        assert words and idx == adapter.token_indices(prompt, words[0])


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_checkpointed_blocks_give_the_same_gradients_and_recompute(family):
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    den = adapter.denoiser
    g = torch.Generator().manual_seed(0)
    x, t = adapter.sample_noise(1, generator=g), adapter.sample_timesteps(1, generator=g)
    cond = adapter.encode(["a photo of a car"])
    target = torch.randn(x.shape, generator=g)
    params = [p for p in den.parameters()]

    def grads():
        den.zero_grad(set_to_none=True)
        F.mse_loss(adapter.predict(x, t, cond), target).backward()
        return [p.grad.clone() for p in params]

    units = adapter.checkpoint_units()
    keep = [adapter.keyword_layers()[0]]
    calls = {u: 0 for u in units}
    # count calls of one Linear inside each block (the recomputation calls the block's inner
    # forward directly, past the block's own hooks)
    first_linear = {
        u: next(m for m in den.get_submodule(u).modules() if isinstance(m, torch.nn.Linear)) for u in units
    }
    hooks = [
        m.register_forward_pre_hook(lambda *_, u=u: calls.__setitem__(u, calls[u] + 1))
        for u, m in first_linear.items()
    ]
    plain = grads()
    assert set(calls.values()) == {1}
    calls.update({u: 0 for u in units})
    with adapter.gradient_checkpointing(keep=keep):
        checkpointed = grads()
        with torch.no_grad():  # no recomputation without a backward
            adapter.predict(x, t, cond)
    for h in hooks:
        h.remove()
    kept = [u for u in units if keep[0] == u or keep[0].startswith(u + ".")]
    assert len(kept) == 1
    assert all(calls[u] == (2 if u in kept else 3) for u in units), calls
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert "forward" not in den.get_submodule(units[0]).__dict__  # unwrapped on exit


@pytest.mark.parametrize("method", sorted(FITS))
def test_methods_train_to_the_same_weights_with_gradient_checkpointing(method):
    for family, build in BUILDERS.items():
        plain = FITS[method](build(), "car", CONFIGS[method](), progress=False)
        ckpt = FITS[method](build(), "car", CONFIGS[method](gradient_checkpointing=True), progress=False)
        for k in plain.tensors:
            torch.testing.assert_close(plain.tensors[k], ckpt.tensors[k], rtol=1e-4, atol=1e-6, msg=f"{family} {k}")


@pytest.mark.parametrize("method", ["eraseanything", "receler"])
def test_bfloat16_pipelines_train_float32_edits(method):
    pipe = tiny_flux_pipeline().to(dtype=torch.bfloat16)
    edit = FITS[method](pipe, "car", CONFIGS[method](gradient_checkpointing=True), progress=False)
    assert adapter_for(pipe).dtype == torch.bfloat16
    trained = [v for k, v in edit.tensors.items() if "lora" in k or k.startswith("erasers.")]
    assert trained and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained)


@pytest.mark.parametrize("method", sorted(FITS))
def test_autocast_runs_the_loop_in_bfloat16_and_trains_float32_edits(method, monkeypatch):
    """autocast_bf16: the denoiser's Linears see bf16 inputs inside the loop; the edit is float32,
    finite and close to (not equal to) the float32 run's."""
    seen = []
    original = F.linear

    def spy(x, w, b=None):
        out = original(x, w, b)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(F, "linear", spy)
    plain = FITS[method](tiny_sd_pipeline(), "car", CONFIGS[method](), progress=False)
    assert seen and torch.bfloat16 not in seen
    seen.clear()
    edit = FITS[method](tiny_sd_pipeline(), "car", CONFIGS[method](autocast_bf16=True), progress=False)
    monkeypatch.undo()
    assert torch.bfloat16 in seen  # Linear outputs in bf16 inside the loop
    assert edit.hyperparameters["autocast_bf16"] is True
    for k, v in edit.tensors.items():
        assert v.dtype == plain.tensors[k].dtype and torch.isfinite(v).all(), k
    # Close to the float32 run: bf16 rounding moves the edit by 15-25% of what training moved it
    # (tiny configs, a few large steps); reading stale bf16 weights moved it by 29-86%.
    init = FITS[method](tiny_sd_pipeline(), "car", CONFIGS[method](lr=1e-30), progress=False)
    off = sum((v - plain.tensors[k]).float().norm() ** 2 for k, v in edit.tensors.items()) ** 0.5
    trained = sum((v - init.tensors[k]).float().norm() ** 2 for k, v in plain.tensors.items()) ** 0.5
    assert 0 < off < 0.4 * trained, (off / trained).item()


def test_autocast_reads_the_weights_as_they_are_updated():
    """Inside the loop's autocast region a trained tensor updated in place is read again: no
    bf16 copy is cached across optimizer steps."""
    adapter = adapter_for(tiny_sd_pipeline())
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with training_memory(adapter, esd.ESDConfig(autocast_bf16=True, release_text_encoders=False)):
        before = lin(x)
        with torch.no_grad():
            lin.weight.add_(1.0)
        after = lin(x)
    assert before.dtype == torch.bfloat16
    assert not torch.equal(before, after)


def test_a_late_setting_at_its_default_leaves_bench_keys_as_they_were():
    """Bench rows are keyed by their config; a setting added later (autocast_bf16, Receler's
    preserve_prompt, ...) must not re-key the rows recorded before it existed, and only its own
    method's late settings are left out of a key."""
    import dataclasses

    from erasekit.bench import LATE_SETTINGS, keyed_config
    from erasekit.methods.eraseanything import EraseAnythingConfig
    from erasekit.methods.mace import MACEConfig
    from erasekit.methods.receler import RecelerConfig
    from erasekit.methods.uce import UCEConfig

    dropped = {
        esd.ESDConfig: {"autocast_bf16"},
        MACEConfig: {"autocast_bf16"},
        RecelerConfig: {"autocast_bf16", "preserve_prompt", "eraser_layers", "preserve_layers"},
        EraseAnythingConfig: {"autocast_bf16", "adv_preserve_weight", "adv_rollout"},
        UCEConfig: set(),
    }
    for cls, late in dropped.items():
        config = cls()
        assert set(dataclasses.asdict(config)) - set(keyed_config(config)) == late, cls.__name__
        assert set(LATE_SETTINGS.get(cls.method_name, {})) == late, cls.__name__
    # EraseAnything's own preserve_prompt (a template) is not one of its late settings: it stays keyed.
    assert keyed_config(EraseAnythingConfig())["preserve_prompt"] == EraseAnythingConfig().preserve_prompt
    assert keyed_config(esd.ESDConfig(autocast_bf16=True))["autocast_bf16"] is True
    assert (
        keyed_config(RecelerConfig.fast(preserve_weight=0.3, preserve_prompt="adversary"))["preserve_prompt"]
        == "adversary"
    )


def test_cli_erase_in_bfloat16_with_checkpointing(tmp_path):
    import json

    from tiny_pipelines import TINY_DEFAULTS

    from erasekit.cli import main
    from erasekit.models.loading import write_defaults

    tiny_flux_pipeline().save_pretrained(tmp_path / "model")
    write_defaults(tmp_path / "model", TINY_DEFAULTS)
    sets = ["iterations=2", "adv_steps=1", "rank=4", "rollout_steps=2", "gradient_checkpointing=true"]
    args = [
        "erase",
        "--method",
        "receler",
        "--model",
        str(tmp_path / "model"),
        "--concept",
        "car",
        "--out",
        str(tmp_path / "edit"),
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
    ]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    hp = json.loads((tmp_path / "edit" / "edit.json").read_text())["hyperparameters"]
    assert hp["gradient_checkpointing"] is True and hp["release_text_encoders"] is True

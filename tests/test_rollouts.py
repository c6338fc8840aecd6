"""Sources of x_t for the ESD-family losses (fresh rollouts, a pool of trajectories) on tiny
pipelines of both families: the fresh mode draws what the release recipe draws, the pool costs
fewer (counted) denoiser calls, and a pooled run resumes to the same weights."""

import pytest
import torch
from edit_asserts import assert_same_tensors
from safetensors.torch import load_file
from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

from erasekit.methods import eraseanything, esd, make_config, receler
from erasekit.methods.rollouts import XtSource
from erasekit.models import adapter_for

BUILDERS = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
FAMILIES = ["sd", "flux"]
PROMPT = "a photo of a car"
CONFIGS = {
    "receler": lambda **kw: receler.RecelerConfig(
        **(dict(prompt="a photo of a {concept}", rank=8, adv_tokens=2, adv_steps=1, lr=1e-2) | kw)
    ),
    "esd": lambda **kw: esd.ESDConfig(**(dict(lr=1e-2) | kw)),
    "eraseanything": lambda **kw: eraseanything.EraseAnythingConfig(
        **(
            dict(preserve_images=2, preserve_steps=2, rsc_steps=2, synonyms="teddy bear", irrelevant="dog,cat,tree")
            | kw
        )
    ),
}
MODULES = {"receler": receler, "esd": esd, "eraseanything": eraseanything}


def _conds(adapter):
    return adapter.encode([PROMPT]), adapter.encode([""])


def _fit(method, family, **kw):
    return MODULES[method].fit(BUILDERS[family](), "car", CONFIGS[method](**kw), progress=False)


def _denoiser_calls(adapter):
    """A list that grows by one per denoiser forward call (and the hook's handle)."""
    calls = []
    return calls, adapter.denoiser.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trajectory_holds_every_partial_rollout(family, sd, flux):
    adapter = {"sd": sd, "flux": flux}[family]
    cond, uncond = _conds(adapter)
    xs, ts = adapter.rollout_trajectory(cond, uncond, 3, num_steps=5, generator=torch.Generator().manual_seed(3))
    assert xs.shape == (4, 1) + adapter.latent_shape() and ts.shape == (4,)
    for k in range(4):
        x, t = adapter.rollout(cond, uncond, k, num_steps=5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(xs[k], x), k
        assert torch.equal(ts[k].expand(1), t), k
    with pytest.raises(ValueError, match="t_enc"):
        adapter.rollout_trajectory(cond, uncond, 5, num_steps=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_source_is_the_release_recipe_and_counts_its_calls(family, sd, flux):
    """Same random draws as ``t_enc = randint(0, N); adapter.rollout(..., generator=g)``, the
    same x_t, and one counted denoiser call per sampler step."""
    adapter = {"sd": sd, "flux": flux}[family]
    cond, uncond = _conds(adapter)
    source = XtSource(adapter, "fresh", num_steps=6)
    g, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t_encs = []
    for _ in range(5):
        x, t = source.draw(cond, uncond, g)
        t_enc = int(torch.randint(0, 6, (1,), generator=g_ref))
        x_ref, t_ref = adapter.rollout(cond, uncond, t_enc, num_steps=6, generator=g_ref)
        assert torch.equal(x, x_ref) and torch.equal(t, t_ref)
        assert torch.equal(g.get_state(), g_ref.get_state())
        t_encs.append(t_enc)
    assert source.calls == sum(t_encs) > 0 and source.draws == 5


def test_pool_draws_stored_states_and_refreshes_the_oldest_trajectory(sd):
    cond, uncond = _conds(sd)
    source = XtSource(sd, "pool", num_steps=5, pool=2, refresh=3)
    g = torch.Generator().manual_seed(0)
    changed = []
    for _ in range(8):
        before = None if source.states is None else source.states.clone()
        x, t = source.draw(cond, uncond, g)
        if before is not None:
            changed.append([i for i in range(2) if not torch.equal(before[i], source.states[i])])
        hits = [(i, k) for i in range(2) for k in range(5) if torch.equal(source.states[i, k], x)]
        assert hits and all(source.timesteps[i, k] == t[0] for i, k in hits)
    # built at draw 0; draw 3 replaces trajectory 0, draw 6 trajectory 1
    assert changed == [[], [], [0], [], [], [1], []]
    assert source.states.shape == (2, 5, 1) + sd.latent_shape()
    assert source.calls == (2 + 2) * 4  # four trajectories of 4 guided steps


def test_pool_trajectories_are_rolled_out_by_the_current_model(sd):
    """A refresh after the model changed gives what a rollout of the changed model gives."""
    cond, uncond = _conds(sd)
    source = XtSource(sd, "pool", num_steps=4, pool=1, refresh=1)
    g = torch.Generator().manual_seed(0)
    source.draw(cond, uncond, g)
    state = g.get_state()
    params = list(sd.parameter_group("cross_attn").values())
    original = [p.data.clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.mul_(3)
        source.draw(cond, uncond, g)  # refresh
        xs, _ = sd.rollout_trajectory(cond, uncond, 3, num_steps=4, generator=torch.Generator().set_state(state))
    finally:
        with torch.no_grad():
            for p, o in zip(params, original):
                p.copy_(o)
    assert torch.equal(source.states[0], xs)
    old_model, _ = sd.rollout_trajectory(cond, uncond, 3, num_steps=4, generator=torch.Generator().set_state(state))
    assert (old_model - xs).abs().max() > 1e-4


def test_settings_are_validated(sd):
    with pytest.raises(ValueError, match="rollout_source"):
        XtSource(sd, "cached")
    with pytest.raises(ValueError, match="rollout_pool"):
        XtSource(sd, "pool", pool=0)
    with pytest.raises(ValueError, match="rollout_source"):
        _fit("esd", "sd", iterations=1, rollout_steps=2, rollout_source="cache")


@pytest.mark.parametrize("method", list(MODULES))
def test_set_rollout_source_through_make_config(method):
    config = make_config(method, "fast", {"rollout_source": "pool", "rollout_pool": "3", "rollout_refresh": "5"})
    assert (config.rollout_source, config.rollout_pool, config.rollout_refresh) == ("pool", 3, 5)
    assert make_config(method, "fast").rollout_source == "fresh"  # the release recipe by default


@pytest.mark.parametrize("method", ["receler", "esd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_fit_draws_t_enc_then_the_rollout_noise(method, family, monkeypatch):
    """The release loop's random draws, in order: per iteration t_enc ~ U[0, N) from the
    training generator, then the rollout's noise from the same generator."""
    steps, iterations = 5, 4
    seen = []
    cls = type(adapter_for(BUILDERS[family]()))
    real = cls.rollout

    def rollout(self, cond, uncond, t_enc, num_steps=None, guidance=None, generator=None, **kw):
        seen.append((t_enc, num_steps, generator.get_state()))
        return real(self, cond, uncond, t_enc, num_steps=num_steps, guidance=guidance, generator=generator, **kw)

    monkeypatch.setattr(cls, "rollout", rollout)
    pipe = BUILDERS[family]()
    edit = MODULES[method].fit(
        pipe, "car", CONFIGS[method](iterations=iterations, rollout_steps=steps), progress=False
    )
    replay = torch.Generator().manual_seed(0)
    adapter = adapter_for(pipe)
    for t_enc, num_steps, state in seen:
        assert t_enc == int(torch.randint(0, steps, (1,), generator=replay)) and num_steps == steps
        assert torch.equal(state, replay.get_state())
        adapter.sample_noise(1, generator=replay)
    assert len(seen) == iterations
    assert edit.metrics["rollout_denoiser_calls"] == sum(t for t, _, _ in seen)


@pytest.mark.parametrize("method", list(MODULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_pool_spends_fewer_counted_rollout_calls(method, family, monkeypatch):
    steps, iterations, pool, refresh = 8, 10, 1, 5
    shared = dict(iterations=iterations, rollout_steps=steps)
    if method == "receler":
        shared |= dict(adv_tokens=0, reg_weight=0)
    real_calls = {"n": 0}  # counted independently of the source
    fresh = _fit(method, family, **shared)
    pooled_cfg = dict(shared, rollout_source="pool", rollout_pool=pool, rollout_refresh=refresh)
    pipe = BUILDERS[family]()
    adapter = adapter_for(pipe)
    real = type(adapter).rollout_trajectory

    def counted(self, *args, **kwargs):
        calls, handle = _denoiser_calls(self)
        try:
            return real(self, *args, **kwargs)
        finally:
            handle.remove()
            real_calls["n"] += len(calls)

    monkeypatch.setattr(type(adapter), "rollout_trajectory", counted)
    pooled = MODULES[method].fit(pipe, "car", CONFIGS[method](**pooled_cfg), progress=False)
    got = pooled.metrics["rollout_denoiser_calls"]
    assert got == real_calls["n"] > 0
    assert pooled.metrics["rollout_draws"] == fresh.metrics["rollout_draws"]
    if method != "eraseanything":  # one draw per iteration, pool built once and refreshed once
        assert got == (pool + (iterations - 1) // refresh) * (steps - 1)
    assert got < fresh.metrics["rollout_denoiser_calls"], (got, fresh.metrics)
    assert any(not torch.equal(fresh.tensors[k], pooled.tensors[k]) for k in fresh.tensors)


RESUME = dict(
    iterations=6, rollout_steps=4, checkpoint_every=3, rollout_source="pool", rollout_pool=2, rollout_refresh=2
)


@pytest.mark.parametrize("method", ["receler", "esd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_training_resumes_to_the_same_weights(method, family, tmp_path, interrupted_at_draw):
    """Interrupted at iteration 5, after the checkpoint at 3, with a trajectory refreshed by the
    model of iteration 2: only the checkpointed pool gives the uninterrupted run's draws."""
    cfg = CONFIGS[method](**RESUME)
    fit = MODULES[method].fit
    full = fit(BUILDERS[family](), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    pipe = BUILDERS[family]()
    with interrupted_at_draw(5):
        fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    saved = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert saved["rollout.states"].shape[:2] == (2, 4) and int(saved["rollout.draws"]) == 3
    resumed = fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)
    assert resumed.metrics["rollout_denoiser_calls"] == full.metrics["rollout_denoiser_calls"]


def test_pooled_eraseanything_resumes_to_the_same_weights(tmp_path, interrupted_at_draw):
    cfg = CONFIGS["eraseanything"](**RESUME)
    full = eraseanything.fit(tiny_flux_pipeline(), "car", cfg, checkpoint_dir=tmp_path / "a", progress=False)
    pipe = tiny_flux_pipeline()
    with interrupted_at_draw(5):  # the fifth iteration (lower level): after the checkpoint at 3
        eraseanything.fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    saved = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert {"rollout.states", "rsc_rollout.states"} <= set(saved)
    resumed = eraseanything.fit(pipe, "car", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert_same_tensors(full, resumed)

"""ESD partial rollouts, timesteps, forward noising and training targets."""

import pytest
import torch


def _rollout(adapter, t_enc, seed=0, steps=4):
    cond, uncond = adapter.encode(["a photo of a red car"]), adapter.encode([""])
    return adapter.rollout(cond, uncond, t_enc, num_steps=steps, generator=torch.Generator().manual_seed(seed))


def test_rollout_shapes_range_and_reset(any_adapter):
    adapter = any_adapter
    x, t = _rollout(adapter, 2)
    assert x.shape == (1,) + adapter.latent_shape()
    assert t.shape == (1,)
    if adapter.family == "sd":
        assert t.dtype == torch.long and 0 <= int(t) < 1000
    else:
        assert 0.0 < float(t) < 1000.0
    x2, t2 = _rollout(adapter, 2)  # a fresh scheduler every call: identical results
    torch.testing.assert_close(x2, x, rtol=0, atol=0)
    torch.testing.assert_close(t2, t, rtol=0, atol=0)
    x3, _ = _rollout(adapter, 2, seed=1)
    assert (x3 - x).abs().max() > 1e-3


def test_rollout_t_enc_zero_is_the_initial_noise(any_adapter):
    adapter = any_adapter
    x, t = _rollout(adapter, 0)
    noise = adapter.sample_noise(1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, noise, rtol=0, atol=0)  # init_noise_sigma is 1 for both
    sampler = adapter._make_sampler(4, noise)
    assert float(t) == float(sampler.timesteps[0])
    later = [float(_rollout(adapter, k)[1]) for k in (1, 2, 3)]
    assert later == sorted(later, reverse=True) and later[0] < float(t)  # walking down in noise
    with pytest.raises(ValueError):
        _rollout(adapter, 4)


def test_rollout_follows_the_pipeline_sampler(any_adapter):
    """All steps but the last of a rollout equal the stock pipeline's latents at that step."""
    adapter = any_adapter
    steps, t_enc = 4, 3
    captured = {}

    def grab(pipe, i, t, kwargs):
        if i == t_enc - 1:
            captured["latents"] = kwargs["latents"].clone()
        return {}

    guidance = adapter.default_guidance
    extra = {}
    if adapter.family == "flux":
        extra = (
            {"guidance_scale": guidance}
            if adapter.guidance_embeds
            else {"true_cfg_scale": guidance, "negative_prompt": [""]}
        )
        extra["max_sequence_length"] = adapter.max_sequence_length
    else:
        if not isinstance(adapter.pipe.scheduler, type(adapter._ddim())):
            pytest.skip("stock scheduler is not DDIM")
        extra = {"guidance_scale": guidance, "negative_prompt": [""]}
    adapter.pipe(
        prompt=["a photo of a red car"],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        output_type="latent",
        callback_on_step_end=grab,
        **extra,
    )
    x, _ = _rollout(adapter, t_enc, steps=steps)
    torch.testing.assert_close(x, captured["latents"], atol=1e-5, rtol=1e-4)


def test_sample_timesteps_ranges(any_adapter):
    t = any_adapter.sample_timesteps(256, generator=torch.Generator().manual_seed(0))
    assert t.shape == (256,)
    assert 0 <= float(t.min()) and float(t.max()) < 1000
    if any_adapter.family == "sd":
        assert t.dtype == torch.long


def test_flow_noising_and_target(flux):
    gen = torch.Generator().manual_seed(0)
    x0, noise = flux.sample_noise(3, generator=gen), flux.sample_noise(3, generator=gen)
    t = torch.tensor([0.0, 250.0, 1000.0])
    s = (t / 1000).view(-1, 1, 1)
    torch.testing.assert_close(flux.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(flux.add_noise(x0, noise, t)[2], noise[2])
    torch.testing.assert_close(flux.training_target(x0, noise, t), noise - x0)
    assert flux.prediction == "flow"


def test_ddpm_noising_and_targets(sd, sd_v_pipe):
    from erasekit.models import adapter_for

    v = adapter_for(sd_v_pipe)
    assert (sd.prediction, v.prediction) == ("epsilon", "v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0, noise = sd.sample_noise(2, generator=gen), sd.sample_noise(2, generator=gen)
    t = torch.tensor([10, 900])
    a = sd_v_pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sd.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert sd.training_target(x0, noise, t) is noise
    torch.testing.assert_close(v.training_target(x0, noise, t), sd_v_pipe.scheduler.get_velocity(x0, noise, t))
    torch.testing.assert_close(v.training_target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_images_round_trip_through_the_vae(any_adapter):
    adapter = any_adapter
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = adapter.encode_images(images)
        assert latents.shape == (2,) + adapter.latent_shape(32, 32)
        decoded = adapter.decode_latents(latents, 32, 32)
    assert decoded.shape == (2, 3, 32, 32)
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0


def test_guided_predict_is_cfg(any_adapter, make_inputs):
    adapter = any_adapter
    x, t, cond = make_inputs(adapter)
    uncond = adapter.encode([""])
    with torch.no_grad():
        guided = adapter.guided_predict(x, t, cond, uncond, 2.5)
        if adapter.family == "flux" and adapter.guidance_embeds:
            expected = adapter.predict(x, t, cond, guidance=2.5)
            assert (expected - adapter.predict(x, t, cond, guidance=1.0)).abs().max() > 1e-5
        else:
            c, u = adapter.predict(x, t, cond), adapter.predict(x, t, uncond)
            expected = u + 2.5 * (c - u)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-4)


def test_non_square_sizes(any_adapter):
    adapter = any_adapter
    cond, uncond = adapter.encode(["a red car"]), adapter.encode([""])
    x, t = adapter.rollout(
        cond, uncond, 1, num_steps=2, height=32, width=64, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (1,) + adapter.latent_shape(32, 64)
    with torch.no_grad(), adapter.probe() as probe:
        adapter.predict(x, t, cond)
        images = adapter.decode_latents(x, 32, 64)
    layer = adapter.middle_resolution_layers()[0]
    h, w = probe.resolution(layer)
    assert w == 2 * h and probe.last(layer).shape[2] == h * w
    assert images.shape == (1, 3, 32, 64)

"""Attention probes: unchanged outputs, normalised maps, gradients, clean restore."""

import pytest
import torch


def _processors(adapter):
    return {name: module.processor for name, module in adapter._probe_modules(adapter.attention_layers()).items()}


def test_probe_leaves_outputs_unchanged_and_maps_are_probabilities(any_adapter, make_inputs):
    adapter = any_adapter
    x, t, cond = make_inputs(adapter)
    with torch.no_grad():
        stock = adapter.predict(x, t, cond)
        with adapter.probe(layers=adapter.attention_layers()) as probe:
            probed = adapter.predict(x, t, cond)
    torch.testing.assert_close(probed, stock, atol=1e-5, rtol=0)

    text_len = cond.embeds.shape[1]
    for layer in adapter.attention_layers():
        assert len(probe.maps[layer]) == 1  # one tensor per forward call
        maps = probe.last(layer)
        h, w = probe.resolution(layer)
        assert maps.shape[0] == 1 and maps.shape[2] == h * w and maps.shape[3] == text_len
        assert float(maps.min()) >= 0.0
        mass = maps.sum(-1)
        if adapter.family == "sd":  # cross-attention: the text tokens are all the keys
            torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)
        else:  # joint attention: text columns hold part of the mass
            assert float(mass.max()) <= 1.0 + 1e-5 and float(mass.min()) > 0.0


def test_flux_full_rows_sum_to_one(flux, make_inputs):
    x, t, cond = make_inputs(flux)
    with torch.no_grad(), flux.probe(layers=flux.attention_layers(), include_image_keys=True) as probe:
        flux.predict(x, t, cond)
    n_img = x.shape[1]
    for layer in flux.attention_layers():
        maps = probe.last(layer)
        assert maps.shape[-1] == cond.embeds.shape[1] + n_img
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    assert probe.resolution("single_transformer_blocks.0") == (8, 8)


def test_default_layers_and_token_columns(family_adapter, make_inputs):
    adapter = family_adapter
    x, t, cond = make_inputs(adapter, prompt="a photo of a teddy bear")
    cols = adapter.token_indices("a photo of a teddy bear", "teddy bear")
    with torch.no_grad():
        with adapter.probe() as full:
            adapter.predict(x, t, cond)
            adapter.predict(x, t, cond)
        with adapter.probe(token_indices=cols) as some:
            adapter.predict(x, t, cond)
    expected = adapter.attention_layers() if adapter.family == "sd" else adapter.middle_resolution_layers()
    assert list(full.maps) == expected
    layer = expected[0]
    assert len(full.maps[layer]) == 2
    torch.testing.assert_close(some.last(layer), full.last(layer)[..., cols])
    full.clear()
    assert full.maps[layer] == []


def test_gradients_reach_denoiser_and_soft_prompt(any_adapter, make_inputs):
    adapter = any_adapter
    prompt = "a photo of a red car"
    x, t, cond = make_inputs(adapter, prompt=prompt)
    span = adapter.token_indices(prompt, "red car")
    after = list(range(span[-1] + 1, span[-1] + 3))  # two soft tokens right after the concept
    soft = torch.randn(len(after), cond.embeds.shape[-1], requires_grad=True)
    student = cond.with_tokens(after, soft)
    layer = adapter.middle_resolution_layers()[0]
    adapter.denoiser.zero_grad(set_to_none=True)
    with adapter.probe(layers=[layer], token_indices=span) as probe:
        adapter.predict(x, t, student)
    loss = probe.last(layer).pow(2).sum()
    loss.backward()
    assert soft.grad is not None and float(soft.grad.abs().sum()) > 0
    grads = [p.grad for p in adapter.denoiser.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    adapter.denoiser.zero_grad(set_to_none=True)


def test_processors_restored_even_on_error(any_adapter, make_inputs):
    adapter = any_adapter
    before = _processors(adapter)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.probe(layers=adapter.attention_layers()):
            raise RuntimeError("boom")
    assert _processors(adapter) == before
    with pytest.raises(ValueError, match="known"):
        with adapter.probe(layers=["not.a.layer"]):
            pass
    assert _processors(adapter) == before


def test_middle_resolution_layers_of_tiny_unet(sd):
    assert sd.middle_resolution_layers() == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]


def test_maps_match_the_attention_the_stock_processor_computes(any_adapter, make_inputs, monkeypatch):
    """Capture the q, k the stock processor hands to scaled_dot_product_attention inside one
    layer and check that the recorded maps are exactly softmax(q k^T / sqrt(d))."""
    adapter = any_adapter
    x, t, cond = make_inputs(adapter)
    layers = [adapter.middle_resolution_layers()[-1], adapter.attention_layers()[-1]]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for layer in layers:
        module = adapter._probe_modules([layer])[layer]
        seen, inside = [], []

        def spy(*args, inside=inside, seen=seen, **kwargs):
            if inside:
                q, k = (args + (None, None))[:2]
                seen.append((kwargs.get("query", q), kwargs.get("key", k)))
            return sdpa(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        pre = module.register_forward_pre_hook(lambda *a, inside=inside: inside.append(1))
        post = module.register_forward_hook(lambda *a, inside=inside: inside.clear())
        try:
            with torch.no_grad(), adapter.probe(layers=[layer], include_image_keys=True) as probe:
                adapter.predict(x, t, cond)
        finally:
            pre.remove()
            post.remove()
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        assert len(seen) == 1, layer
        q, k = seen[0]  # (B, H, S_q, D), (B, H, S_k, D)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        text_len = cond.embeds.shape[1]
        if adapter.family == "flux":  # joint sequence [text, image]: keep the image queries
            probs = probs[:, :, text_len:]
        torch.testing.assert_close(probe.last(layer), probs, atol=1e-5, rtol=0)

"""Conditioning.with_tokens is out of place, reaches the denoiser, and is differentiable."""

import pytest
import torch

from erasekit.models import Conditioning


def test_with_tokens_is_out_of_place_and_changes_the_prediction(any_adapter, make_inputs):
    adapter = any_adapter
    x, t, cond = make_inputs(adapter)
    original = cond.embeds.clone()
    positions = [7, 8, 9]
    values = torch.randn(len(positions), cond.embeds.shape[-1], requires_grad=True)
    edited = cond.with_tokens(positions, values)

    torch.testing.assert_close(cond.embeds, original, rtol=0, atol=0)  # original untouched
    torch.testing.assert_close(edited.embeds[:, positions], values.detach().unsqueeze(0))
    keep = [i for i in range(cond.embeds.shape[1]) if i not in positions]
    torch.testing.assert_close(edited.embeds[:, keep], original[:, keep], rtol=0, atol=0)
    assert edited.pooled is cond.pooled

    out = adapter.predict(x, t, edited)
    with torch.no_grad():
        base = adapter.predict(x, t, cond)
        other = adapter.predict(x, t, cond.with_tokens(positions, values.detach() + 1.0))
    assert (out.detach() - base).abs().max() > 1e-4  # the soft tokens reach the denoiser
    assert (out.detach() - other).abs().max() > 1e-4  # and their values matter
    out.pow(2).mean().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    adapter.denoiser.zero_grad(set_to_none=True)


def test_with_tokens_batched_values_and_errors():
    cond = Conditioning(torch.zeros(2, 6, 4), None)
    vals = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4)
    out = cond.with_tokens(torch.tensor([1, 3]), vals)
    torch.testing.assert_close(out.embeds[:, [1, 3]], vals)
    assert cond.embeds.abs().sum() == 0
    with pytest.raises(ValueError):
        cond.with_tokens([1, 1], torch.zeros(2, 4))
    with pytest.raises(IndexError):
        cond.with_tokens([6], torch.zeros(1, 4))
    with pytest.raises(ValueError):
        cond.with_tokens([1], torch.zeros(2, 4))


def test_batch_helpers():
    a = Conditioning(torch.randn(1, 3, 4), torch.randn(1, 5))
    b = Conditioning(torch.randn(2, 3, 4), torch.randn(2, 5))
    both = Conditioning.cat([a.expand_to(2), b])
    assert both.embeds.shape == (4, 3, 4) and both.pooled.shape == (4, 5)
    assert a.repeat(3).batch_size == 3
    assert a.to(dtype=torch.float64).embeds.dtype == torch.float64
    with pytest.raises(ValueError):
        Conditioning.cat([a, Conditioning(torch.randn(1, 3, 4), None)])


def test_batch_one_conditioning_is_broadcast(any_adapter, make_inputs):
    adapter = any_adapter
    x, t, cond = make_inputs(adapter, batch=2)
    single = adapter.encode(["a photo of a red car"])
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(x, t, single), adapter.predict(x, t, cond), atol=1e-5, rtol=0)

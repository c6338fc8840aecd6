"""Shared fixtures: tiny random pipelines of each family, built once per session.

Tests that change a pipeline (edits, LoRA) build their own with the ``tiny_*`` builders,
which take well under a second.
"""

import os

import pytest
import torch

from erasekit.models import adapter_for
from erasekit.models.tiny import tiny_flux_pipeline, tiny_sd_pipeline

# Tiny models on a shared 2-core machine: more than one intra-op thread makes each op
# 100x slower whenever another process is busy. Override with ERASEKIT_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def sd_pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def sd_v_pipe():
    return tiny_sd_pipeline(seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def flux_pipe():
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="session")
def flux_guided_pipe():
    return tiny_flux_pipeline(seed=1, guidance_embeds=True)


@pytest.fixture(scope="session")
def sd(sd_pipe):
    return adapter_for(sd_pipe)


@pytest.fixture(scope="session")
def flux(flux_pipe):
    return adapter_for(flux_pipe)


@pytest.fixture(scope="session")
def flux_guided(flux_guided_pipe):
    return adapter_for(flux_guided_pipe)


@pytest.fixture(params=["sd", "flux", "flux_guided"])
def any_adapter(request):
    """Each family (and Flux with a guidance embedding) in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["sd", "flux"])
def family_adapter(request):
    """One adapter per family (for tokenizer-level tests)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def make_inputs():
    """make_inputs(adapter, prompt=..., batch=1, seed=0) -> (latents, t, cond) for predict."""

    def make(adapter, prompt="a photo of a red car", batch=1, seed=0):
        gen = torch.Generator().manual_seed(seed)
        x = adapter.sample_noise(batch, generator=gen)
        t = adapter.sample_timesteps(batch, generator=gen)
        return x, t, adapter.encode([prompt] * batch)

    return make


@pytest.fixture
def interrupted_at_rollout(monkeypatch):
    """``with interrupted_at_rollout(adapter, n): fit(...)`` raises KeyboardInterrupt at the n-th
    rollout (one per training iteration), as a user's Ctrl-C would; the real rollout is back
    after the block."""
    from contextlib import contextmanager

    @contextmanager
    def interrupt(adapter, n: int):
        real = type(adapter).rollout
        calls = {"n": 0}

        def dying(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        monkeypatch.setattr(type(adapter), "rollout", dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(type(adapter), "rollout", real)

    return interrupt

"""Shared fixtures: tiny random pipelines of each family (tests/tiny_pipelines.py), built once per session.

Tests that change a pipeline (edits, LoRA) build their own with the ``tiny_*`` builders,
which take well under a second.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from erasekit.models import adapter_for

# The released models' architectures (real_configs) are shared with the benchmark scripts and live
# beside them; the tiny test pipelines (tiny_pipelines) live here, beside this file.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tiny_pipelines import tiny_flux_pipeline, tiny_sd_pipeline

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


def _interrupt_at_call(monkeypatch, owner: type, name: str, n: int):
    """A context in which the n-th call of ``owner.name`` raises KeyboardInterrupt, as a user's
    Ctrl-C would; the real method is back after the block."""
    from contextlib import contextmanager

    @contextmanager
    def interrupt():
        real = getattr(owner, name)
        calls = {"n": 0}

        def dying(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(owner, name, real)

    return interrupt()


@pytest.fixture
def interrupted_at_rollout(monkeypatch):
    """``with interrupted_at_rollout(adapter, n): fit(...)`` raises KeyboardInterrupt at the n-th
    rollout (one per training iteration with fresh rollouts)."""
    return lambda adapter, n: _interrupt_at_call(monkeypatch, type(adapter), "rollout", n)


@pytest.fixture
def interrupted_at_draw(monkeypatch):
    """``with interrupted_at_draw(n): fit(...)`` raises KeyboardInterrupt at the n-th x_t draw of
    any rollout source (one per iteration for Receler and ESD, whatever the source's mode)."""
    from erasekit.methods.rollouts import XtSource

    return lambda n: _interrupt_at_call(monkeypatch, XtSource, "draw", n)


# ---- evaluation ------------------------------------------------------------------------------

PROMPTS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"


@pytest.fixture(scope="session")
def prompts_dir():
    """The shared prompt files (../shared/data/prompts beside the repository)."""
    if not (PROMPTS_DIR / "cifar10_simple.csv").is_file():
        pytest.skip(f"the shared prompt files are not at {PROMPTS_DIR}")
    return PROMPTS_DIR


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A folder with a random tiny CLIPModel, its tokenizer and image processor (32 px)."""
    from tiny_pipelines import TINY_WORDS
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from erasekit.toyworld.offline_tokenizers import clip_word_tokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = clip_word_tokenizer(
        list(TINY_WORDS) + ["airplane", "nudity", "appropriate", "inappropriate", "harmless", "offensive"],
        model_max_length=16,
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def chromium_binary() -> str:
    """Debian's Chromium (scripts/setup.sh installs it); the browser tests fail without it."""
    import shutil

    path = os.environ.get("ERASEKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "Chromium is needed for the report tests and was not found: install Debian's 'chromium' "
            "package (bash scripts/setup.sh does it as root) or set ERASEKIT_CHROMIUM"
        )
    return path


@pytest.fixture
def load_in_browser(tmp_path):
    """load_in_browser(html_file) -> dict: opens the page in headless Chromium (file://, no
    server) and returns what the browser saw: tables, images, images decoded, their widths."""
    import json
    import re
    import subprocess

    def load(html_file):
        page = Path(html_file)
        probe = page.with_name(page.stem + ".probe.html")
        # Observe the page from inside: after load, write what the DOM holds into an attribute.
        script = (
            "<script>window.addEventListener('load',()=>{const im=[...document.images];"
            "document.body.setAttribute('data-probe',JSON.stringify({tables:document.querySelectorAll('table').length,"
            "rows:document.querySelectorAll('table tr').length,images:im.length,"
            "decoded:im.filter(i=>i.complete&&i.naturalWidth>0).length,svgs:document.querySelectorAll('svg').length,"
            "title:document.title}))});</script>"
        )
        probe.write_text(page.read_text().replace("</body>", script + "</body>"))
        cmd = [
            chromium_binary(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        probe.unlink()
        m = re.search(r"data-probe=\"([^\"]*)\"", proc.stdout)
        assert m, f"Chromium did not load the page (exit {proc.returncode}): {proc.stderr[-2000:]}"
        import html as html_lib

        return json.loads(html_lib.unescape(m.group(1)))

    return load

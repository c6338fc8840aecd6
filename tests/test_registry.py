"""The registries: lazy references, clear errors, and the toy world registered as a plug-in
that the core never imports."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from erasekit.registry import DETECTORS, LEXICONS, PIPELINES, SUITES, Registry

ROOT = Path(__file__).resolve().parents[1] / "erasekit"


def test_registry_resolves_lazily_and_names_the_known():
    reg = Registry("widget")
    reg.register("path", "pathlib:Path", colour="blue")
    reg.register("len", len)
    reg.register("path", "pathlib:Path", colour="blue")  # the same again: a no-op
    assert reg.names() == ["path", "len"] and "path" in reg and len(reg) == 2
    assert reg.get("path") is Path and reg.get("len") is len and reg.info("path") == {"colour": "blue"}
    with pytest.raises(ValueError, match="unknown widget 'nope'; known: path, len"):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("path", "os:path")
    reg.register("path", "os:getcwd", replace=True)
    reg.unregister("len")
    assert reg.names() == ["path"]


def test_the_toy_world_registers_itself():
    assert {"toy", "nudenet", "clip", "q16", "grounding-dino"} <= set(DETECTORS)
    assert {"toy-objects", "objects", "i2p-nudity", "coco"} <= set(SUITES)
    assert {"wordnet", "toyworld"} <= set(LEXICONS)
    assert {"toy:sd", "toy:flux"} <= set(PIPELINES)
    from erasekit.models.loading import resolve_pipeline_name
    from erasekit.toyworld import pipeline_path

    assert resolve_pipeline_name("toy:flux") == pipeline_path("flux")
    assert resolve_pipeline_name("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="unknown pipeline name 'toy:xl'"):
        resolve_pipeline_name("toy:xl")


def test_the_core_never_imports_the_toy_world():
    core = [
        *(ROOT / "evaluation").rglob("*.py"),
        *(ROOT / "methods").rglob("*.py"),
        *(ROOT / "models").rglob("*.py"),
        *ROOT.glob("lexicon*.py"),
        *(ROOT / "lexicon").rglob("*.py"),
        ROOT / "registry.py",
    ]
    pattern = re.compile(
        r"^\s*(from\s+(erasekit|\.+)\s*\.?\s*toyworld|import\s+erasekit\.toyworld"
        r"|from\s+\.+\s+import\s+.*\btoyworld\b)",
        re.MULTILINE,
    )
    offenders = [str(p.relative_to(ROOT)) for p in core if pattern.search(p.read_text())]
    assert offenders == []
    toy = [*(ROOT / "toyworld").rglob("*.py")]
    above = re.compile(r"^\s*from\s+(erasekit|\.\.)\.?(bench|demo|cli)\b", re.MULTILINE)
    assert [str(p.relative_to(ROOT)) for p in toy if above.search(p.read_text())] == []


def test_importing_erasekit_stays_light():
    code = "import sys, erasekit; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.toyworld
def test_load_pipeline_takes_a_toy_name():
    from erasekit import load_pipeline
    from erasekit.toyworld import pipeline_path
    from erasekit.toyworld.lexicon import is_toy_pipeline

    pipe = load_pipeline("toy:sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and is_toy_pipeline(pipe)
    assert pipe.name_or_path == str(pipeline_path("sd"))

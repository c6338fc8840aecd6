"""Golden test: every method at its fast preset, in a short run, on both toy pipelines, gives the
same edit tensors and the same images as the recorded reference, bit for bit.

The reference (tests/golden/methods.json: each tensor's sha256, shape, dtype and sum) was recorded
before the package's layers were redrawn; refactors must keep it. Re-record only for a
deliberate change of behaviour:  python tests/test_golden.py --record
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).parent / "golden" / "methods.json"
FAMILIES = ("sd", "flux")
# Row -> (method, settings on top of the fast preset): short runs that still take every code path.
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "receler": ("receler", {"iterations": "3", "adv_steps": "2", "rollout_steps": "5"}),
    "eraseanything": ("eraseanything", {"iterations": "4", "preserve_images": "2", "rollout_steps": "5"}),
    "esd-x": ("esd", {"group": "esd-x", "iterations": "3", "rollout_steps": "5"}),
    "esd-u": ("esd", {"group": "esd-u", "iterations": "3", "rollout_steps": "5"}),
    "uce": ("uce", {"samples": "1"}),
    "keyword_zeroing": ("keyword_zeroing", {}),
    "sld": ("sld", {}),
}
CONCEPT = "triangle"
PROMPTS = ("an image of a triangle", "a wedge on a plain background", "an image of a square")
SEEDS = (0, 1, 2)
STEPS = 8


def _pipeline(family: str):
    from erasekit.models import load_pipeline
    from erasekit.toyworld import pipeline_path

    return load_pipeline(pipeline_path(family))


def golden_tensors(family: str, row: str) -> dict[str, torch.Tensor]:
    """The edit's tensors (``edit.NAME``) and the images made with it applied (``images``,
    uint8 (N, 3, H, W)) for ``row`` on the toy ``family`` pipeline."""
    from erasekit.edits import apply
    from erasekit.evaluation.generation import generate_images
    from erasekit.methods import erase, make_config
    from erasekit.models import adapter_for

    method, settings = ROWS[row]
    pipe = _pipeline(family)
    config = make_config(method, "fast", settings)
    torch.manual_seed(0)
    edit = erase(pipe, CONCEPT, method, config, progress=False)
    out = {f"edit.{name}": t.detach().cpu().contiguous() for name, t in sorted(edit.tensors.items())}
    apply(pipe, edit)
    images = generate_images(adapter_for(pipe), list(PROMPTS), list(SEEDS), steps=STEPS, progress=False)
    out["images"] = (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return out


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _machine() -> str:
    return f"{platform.machine()} {platform.processor()} torch {torch.__version__}"


def fingerprint(t: torch.Tensor) -> dict:
    """What the reference keeps of a tensor: its hash, and shape, dtype and sum to tell how it differs."""
    return {"sha256": sha256(t), "shape": list(t.shape), "dtype": str(t.dtype), "sum": float(t.double().sum())}


@pytest.mark.toyworld
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("row", list(ROWS))
def test_edits_and_images_match_the_golden_reference(family, row):
    recorded = json.loads(REFERENCE.read_text())
    prefix = f"{family}/{row}/"
    expected = {k[len(prefix) :]: v for k, v in recorded["tensors"].items() if k.startswith(prefix)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # recorded with one thread: reductions may split differently with more
    try:
        got = {name: fingerprint(t) for name, t in golden_tensors(family, row).items()}
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(expected), "the edit's tensor names changed"
    different = [name for name in got if got[name] != expected[name]]
    assert not different, (
        f"{prefix}: {len(different)} of {len(got)} tensors differ from the golden reference (recorded on "
        f"{recorded['machine']}, running on {_machine()}); first: {different[0]} "
        f"{expected[different[0]]} -> {got[different[0]]}"
    )


def record() -> None:
    torch.set_num_threads(1)
    tensors: dict[str, dict] = {}
    for family in FAMILIES:
        for row in ROWS:
            for name, t in golden_tensors(family, row).items():
                tensors[f"{family}/{row}/{name}"] = fingerprint(t)
            print(f"recorded {family} {row}", flush=True)
    REFERENCE.parent.mkdir(exist_ok=True)
    meta = {"machine": _machine(), "concept": CONCEPT, "rows": ROWS, "tensors": tensors}
    REFERENCE.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()

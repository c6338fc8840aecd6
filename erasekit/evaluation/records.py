"""What every result records: library versions, the model, the edits."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
    "nudenet",
    "onnxruntime",
    "torchmetrics",
)


def library_versions() -> dict[str, str | None]:
    """Python, erasekit and the libraries that shape the numbers (None: not installed)."""
    from .. import __version__

    out: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "erasekit": __version__,
    }
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_record(pipe, spec: str | None = None) -> dict:
    """The pipeline: what the user named, its class, family and source, and generation defaults."""
    from ..models import adapter_for

    adapter = adapter_for(pipe)
    return {
        "spec": spec,
        "class": type(pipe).__name__,
        "family": adapter.family,
        "source": getattr(getattr(pipe, "config", None), "_name_or_path", None),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "generation": {
            "steps": adapter.generation_steps,
            "guidance": adapter.generation_guidance,
            "height": adapter.default_height,
            "width": adapter.default_width,
        },
    }


def edit_record(edit, path: str | None = None) -> dict:
    """An Edit's identity and settings (no tensors)."""
    meta = edit.metadata()
    return {
        k: meta[k]
        for k in ("id", "method", "concepts", "family", "base_model", "hyperparameters", "erasekit_version", "created")
    } | {"path": path}

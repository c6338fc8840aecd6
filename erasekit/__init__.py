"""erasekit: erase concepts from text-to-image diffusion models, prove they are gone, and prove
nothing else broke.

    import erasekit
    pipe = erasekit.load_pipeline("CompVis/stable-diffusion-v1-4")   # or a local folder
    adapter = erasekit.adapter_for(pipe)                              # the family's uniform surface
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "models",
    "adapter_for": "models",
    "UnsupportedPipelineError": "models",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Imported on first use, so that `erasekit --help` does not pay for torch and diffusers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")

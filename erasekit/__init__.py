"""erasekit: erase concepts from text-to-image diffusion models, prove they are gone, and prove
nothing else broke.

    import erasekit
    pipe = erasekit.load_pipeline("CompVis/stable-diffusion-v1-4")   # or a local folder
    edit = erasekit.erase(pipe, concept="nudity", method="receler")   # -> Edit
    edit.save("edits/nudity")                                         # safetensors + edit.json
    erasekit.apply(pipe, erasekit.load_edit("edits/nudity"), scale=1.0)
    results = erasekit.evaluate(pipe, suite="i2p-nudity", concept="nudity", edits=["edits/nudity"],
                                out="eval/nudity", suite_options={"prompts": "unsafe-prompts4703.csv"})
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "models",
    "adapter_for": "models",
    "UnsupportedPipelineError": "models",
    "erase": "methods",
    "Edit": "edits",
    "load_edit": "edits",
    "apply": "edits",
    "remove": "edits",
    "evaluate": "evaluation.evaluate",
    "attack": "evaluation.attacks",
    "export": "export",
}
__all__ = ["__version__", *_LAZY]

# Library convention: erasekit logs to module loggers under "erasekit" and configures no output;
# the application decides (the command line shows them on stderr, erasekit.cli.main).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# The embedded toy world is a plug-in: importing it registers its detector, suite, lexicon and
# pipeline names (erasekit.registry) by lazy reference; it imports nothing heavy.
from . import toyworld as _toyworld  # noqa: E402,F401


def __getattr__(name: str):
    # Imported on first use, so that `erasekit --help` does not pay for torch and diffusers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")

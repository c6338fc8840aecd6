"""Model-family adapters: one uniform surface over SD-style UNets and Flux transformers."""

from .base import (
    AttachmentPoint,
    FamilyAdapter,
    UnsupportedPipelineError,
    frozen,
)
from .conditioning import Conditioning, find_token_spans
from .probes import AttentionProbe

# The family modules: importing one registers its adapter class. Their order is the order in which
# families are matched and listed in the unsupported-pipeline message.
from .sd_unet import SDUNetAdapter  # isort: skip
from .flux import FluxAdapter  # isort: skip

from .loading import adapter_for, load_pipeline, write_defaults  # noqa: E402

__all__ = [
    "AttachmentPoint",
    "AttentionProbe",
    "Conditioning",
    "FamilyAdapter",
    "FluxAdapter",
    "SDUNetAdapter",
    "UnsupportedPipelineError",
    "adapter_for",
    "find_token_spans",
    "frozen",
    "load_pipeline",
    "write_defaults",
]

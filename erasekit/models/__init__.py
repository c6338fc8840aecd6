"""Model-family adapters: one uniform surface over SD-style UNets and Flux transformers."""

from .base import (
    AttachmentPoint,
    AttentionProbe,
    Conditioning,
    FamilyAdapter,
    UnsupportedPipelineError,
    frozen,
)
from .flux import FluxAdapter
from .loading import adapter_for, load_pipeline, write_defaults
from .sd_unet import SDUNetAdapter

__all__ = [
    "AttachmentPoint",
    "AttentionProbe",
    "Conditioning",
    "FamilyAdapter",
    "FluxAdapter",
    "SDUNetAdapter",
    "UnsupportedPipelineError",
    "adapter_for",
    "frozen",
    "load_pipeline",
    "write_defaults",
]

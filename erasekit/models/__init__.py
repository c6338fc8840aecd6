"""Model-family adapters: one uniform surface over SD-style UNets and Flux transformers."""

from .base import (
    AttachmentPoint,
    FamilyAdapter,
    UnsupportedPipelineError,
    frozen,
)
from .conditioning import Conditioning, find_token_spans
from .flux import FluxAdapter
from .loading import adapter_for, load_pipeline, write_defaults
from .probes import AttentionProbe
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
    "find_token_spans",
    "frozen",
    "load_pipeline",
    "write_defaults",
]

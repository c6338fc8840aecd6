"""Model-family adapters: one uniform surface over SD-style UNets and Flux transformers.

An adapter (a :class:`FamilyAdapter` subclass) wraps one diffusers pipeline, or a bare denoiser,
and hides what differs between model families: latent layout, timestep units, text encoders,
attention modules, where edits attach. Methods are written against the adapter only and never
branch on the family; ``adapter_for(pipe)`` gives a pipeline's adapter (cached on the pipeline).

Files:
    base.py          FamilyAdapter (construction, defaults, text, denoising, images, attention,
                     attachment points, edit switches), AttachmentPoint, frozen
    conditioning.py  Conditioning (the text embeddings the denoiser reads) and token spans
    probes.py        AttentionProbe and the family-independent probe plumbing
    memory.py        text encoders released, gradient checkpointing
    sd_unet.py       SDUNetAdapter: StableDiffusionPipeline (SD 1.x/2.x)
    flux.py          FluxAdapter: FluxPipeline (FLUX.1)
    loading.py       load_pipeline, adapter_for, erasekit_defaults.json

How a family is matched: each adapter class names the pipeline classes it drives
(``pipeline_classes``), checks their components (``pipeline_mismatch``) and names its denoiser
classes (``denoiser_names``, for ``FamilyAdapter.for_denoiser``). Defining a subclass with a
``family`` registers it; ``loading`` asks the registered classes, from ``model_index.json``
before any weights load, or from a loaded pipeline's class and components. A new family is one
new module with its adapter class, imported below.
"""

from .base import (
    AttachmentPoint,
    FamilyAdapter,
    UnsupportedPipelineError,
    base_linear,
    frozen,
    plain_parameter_names,
)
from .conditioning import Conditioning, find_token_spans
from .probes import AttentionProbe

# The family modules: importing one registers its adapter class. Their order is the order in which
# families are matched and listed in the unsupported-pipeline message.
from .sd_unet import SDUNetAdapter  # isort: skip
from .flux import FluxAdapter  # isort: skip

from .loading import adapter_for, family_of, load_pipeline, write_defaults

__all__ = [
    "AttachmentPoint",
    "base_linear",
    "plain_parameter_names",
    "AttentionProbe",
    "Conditioning",
    "FamilyAdapter",
    "FluxAdapter",
    "SDUNetAdapter",
    "UnsupportedPipelineError",
    "adapter_for",
    "find_token_spans",
    "frozen",
    "family_of",
    "load_pipeline",
    "write_defaults",
]

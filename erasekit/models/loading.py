"""Loading pipelines and finding their adapter.

``load_pipeline`` reads the pipeline's ``model_index.json`` first and refuses unsupported
families before any weights are read. The family is the registered adapter class
(:meth:`FamilyAdapter.registered`) that names the pipeline's class in its ``pipeline_classes``
and accepts its components (``pipeline_mismatch``). Supported: ``StableDiffusionPipeline``
(SD 1.x/2.x) and ``FluxPipeline`` (FLUX.1). A folder may also hold ``erasekit_defaults.json``
(a JSON dict with keys from :data:`erasekit.models.base.DEFAULT_KEYS`) that sets the adapter's
defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import NotFound
from .base import DEFAULT_KEYS, FamilyAdapter, UnsupportedPipelineError

DEFAULTS_FILE = "erasekit_defaults.json"


def _components(index: dict) -> dict[str, str | None]:
    """component name -> class name (None for an empty slot) from a model_index dict."""
    return {
        k: (v[1] if isinstance(v, (list, tuple)) and len(v) == 2 else None)
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, (list, tuple))
    }


def family_from_index(index: dict) -> str:
    """ "sd" or "flux" for a pipeline's model_index dict; UnsupportedPipelineError otherwise."""
    return adapter_class_from_index(index).family


def adapter_class_from_index(index: dict) -> type[FamilyAdapter]:
    """The adapter class for a pipeline's model_index dict; UnsupportedPipelineError otherwise."""
    return _adapter_class(index.get("_class_name"), _components(index))


def _adapter_class(cls: str | None, comps: dict[str, str | None]) -> type[FamilyAdapter]:
    """The registered adapter class that claims pipeline class ``cls`` and accepts its
    components; UnsupportedPipelineError naming what was found, why, and what is supported."""
    present = {k: v for k, v in comps.items() if v is not None}
    adapters = FamilyAdapter.registered()
    claiming = [a for a in adapters if cls in a.pipeline_classes]
    reason = None
    for adapter_cls in claiming:
        reason = adapter_cls.pipeline_mismatch(present)
        if reason is None:
            return adapter_cls
    if not claiming:
        reason = _unsupported_hint(present)
    found = ", ".join(f"{k}={v}" for k, v in sorted(present.items())) or "none"
    names = [a.supported for a in adapters]
    supported = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    raise UnsupportedPipelineError(
        f"unsupported pipeline {cls or '<no _class_name>'} with components [{found}]"
        + (f": {reason}" if reason else "")
        + f". erasekit supports {supported}."
    )


def _unsupported_hint(present: dict[str, str]) -> str | None:
    """Which known family a pipeline that no adapter claims looks like, if any."""
    if "text_encoder_2" in present and "unet" in present:
        return "SDXL-style pipelines (two text encoders and a UNet) are not supported yet"
    if "text_encoder_3" in present or str(present.get("transformer", "")).startswith("SD3"):
        return "SD3-style pipelines are not supported yet"
    return None


def _looks_like_hub_id(name: str) -> bool:
    """ "owner/name" with no path syntax around it."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def read_model_index(id_or_folder: str | os.PathLike) -> tuple[dict, dict]:
    """(model_index dict, erasekit defaults dict) of a local folder or a Hub repo id.

    Local folder: reads the files. Missing folder or no model_index.json -> FileNotFoundError.
    Anything that is not an existing folder and looks like a Hub id ("owner/name") is asked
    from the Hub with ``DiffusionPipeline.load_config`` (defaults are then empty).
    """
    path = Path(os.path.expanduser(str(id_or_folder)))
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise NotFound(f"{path} has no model_index.json: not a diffusers pipeline folder")
        index = json.loads(index_file.read_text())
        defaults_file = path / DEFAULTS_FILE
        defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
        if not isinstance(defaults, dict):
            raise ValueError(f"{defaults_file} must hold a JSON object")
        return index, defaults
    if path.exists():
        raise NotFound(f"{path} is a file; expected a diffusers pipeline folder")
    if not _looks_like_hub_id(str(id_or_folder)):
        raise NotFound(f"no pipeline folder at {path}")
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(str(id_or_folder))
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise NotFound(
            f"{id_or_folder!r} is not a local folder and its model_index.json could not be fetched from the Hub: {err}"
        ) from err
    return dict(index), {}


def family_of(id_or_folder: str | os.PathLike) -> str:
    """The family ("sd", "flux") of a pipeline folder, hub id or registered name, read from its
    model_index.json without loading any weights; UnsupportedPipelineError / NotFound otherwise."""
    index, _ = read_model_index(resolve_pipeline_name(id_or_folder))
    return adapter_class_from_index(index).family


def write_defaults(folder: str | os.PathLike, defaults: dict) -> Path:
    """Write ``erasekit_defaults.json`` into a pipeline folder; returns its path."""
    unknown = set(defaults) - set(DEFAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown erasekit defaults {sorted(unknown)}; known: {list(DEFAULT_KEYS)}")
    target = Path(folder) / DEFAULTS_FILE
    target.write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    return target


def resolve_pipeline_name(id_or_folder: str | os.PathLike) -> str | os.PathLike:
    """The folder or hub id a registered pipeline name stands for (``toy:sd``: see
    :data:`erasekit.registry.PIPELINES`); anything else as it is."""
    from ..registry import PIPELINES

    if not isinstance(id_or_folder, str) or ":" not in id_or_folder:
        return id_or_folder
    scheme = id_or_folder.partition(":")[0] + ":"
    if id_or_folder in PIPELINES or (any(n.startswith(scheme) for n in PIPELINES) and not Path(id_or_folder).exists()):
        return PIPELINES.get(id_or_folder)(id_or_folder)  # an unknown "toy:..." name: ValueError naming the known
    return id_or_folder


def load_pipeline(
    id_or_folder: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs,
):
    """Load a supported diffusers pipeline and attach its adapter (``adapter_for(pipe)``).

    ``id_or_folder``: a folder, a hub id, or a registered pipeline name (``toy:sd``).

    The family is checked from model_index.json BEFORE loading weights. Loading goes through
    ``DiffusionPipeline.from_pretrained(..., dtype=dtype)`` then ``.to(device)``.
    SD pipelines are loaded without their safety checker unless ``safety_checker=`` is passed
    (it blacks out the very images erasure is evaluated on). ``erasekit_defaults.json`` in the
    folder becomes ``pipe.erasekit_defaults`` and the adapter's defaults.
    """
    from diffusers import DiffusionPipeline

    id_or_folder = resolve_pipeline_name(id_or_folder)
    index, defaults = read_model_index(id_or_folder)
    adapter_cls = adapter_class_from_index(index)
    kwargs = adapter_cls.loading_kwargs(_components(index), dict(from_pretrained_kwargs))
    source = os.path.expanduser(str(id_or_folder))
    pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **kwargs)
    pipe.to(device)
    pipe.erasekit_defaults = defaults
    adapter_for(pipe)
    return pipe


def detect_family(pipe) -> str:
    """ "sd" or "flux" for a loaded pipeline; UnsupportedPipelineError naming what was found."""
    return _adapter_class_for(pipe).family


def _adapter_class_for(pipe) -> type[FamilyAdapter]:
    """The adapter class for a loaded pipeline: its class (or the nearest base class an adapter
    claims, so subclasses of a supported pipeline match) and its components, as
    :func:`adapter_class_from_index` judges a model_index dict."""
    comps = {
        name: type(module).__name__ if module is not None else None
        for name, module in getattr(pipe, "components", {}).items()
    }
    claimed = {name for a in FamilyAdapter.registered() for name in a.pipeline_classes}
    names = [c.__name__ for c in type(pipe).__mro__]
    cls = next((n for n in names if n in claimed), type(pipe).__name__)
    return _adapter_class(cls, comps)


def adapter_for(pipe) -> FamilyAdapter:
    """The adapter cached on ``pipe`` (built, with the same checks as load_pipeline, on first
    use). Defaults come from ``pipe.erasekit_defaults`` when present."""
    cached = pipe.__dict__.get("_erasekit_adapter")
    if cached is not None:
        return cached
    adapter = _adapter_class_for(pipe)(pipe)
    pipe._erasekit_adapter = adapter
    return adapter

"""The Edit: what an erasure method produced, and how it attaches to a pipeline.

An Edit is a folder: ``edit.safetensors`` (the trained tensors) and ``edit.json`` (method,
concepts, family, base model, hyper-parameters, package version, metrics). Never pickle.
Each method module provides ``attach(adapter, edit, scale) -> handle`` (handle has
``remove()``); :func:`apply` and :func:`remove` keep track of what is attached to which
pipeline.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_folder, check_output_folder

WEIGHTS_FILE = "edit.safetensors"
META_FILE = "edit.json"


@dataclass
class Edit:
    """An erasure's result. ``tensors`` are named by the method (e.g. per attachment point)."""

    method: str
    concepts: list[str]
    family: str
    base_model: str
    tensors: dict[str, torch.Tensor]
    hyperparameters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    version: str = ""
    created: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        from . import __version__

        self.version = self.version or __version__
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")

    def metadata(self) -> dict:
        return {
            "method": self.method,
            "concepts": self.concepts,
            "family": self.family,
            "base_model": self.base_model,
            "hyperparameters": self.hyperparameters,
            "metrics": self.metrics,
            "erasekit_version": self.version,
            "created": self.created,
            "id": self.id,
            "tensors": {k: list(v.shape) for k, v in self.tensors.items()},
        }

    def save(self, folder: str | Path, overwrite: bool = True) -> Path:
        """Write the edit to ``folder`` atomically (a temporary folder renamed into place).

        ``folder`` may be missing or empty; an earlier edit folder there is replaced only with
        ``overwrite``; any other folder or file is refused (:class:`erasekit.files.OutputRefused`)
        and left as it was.
        """
        with atomic_folder(folder, replaceable=is_edit_folder, overwrite=overwrite) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return Path(folder)


def is_edit_folder(folder: str | Path) -> bool:
    """True if ``folder`` holds exactly an edit's two files (``edit.json``, ``edit.safetensors``)."""
    folder = Path(folder)
    return folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])


def check_edit_output(folder: str | Path, overwrite: bool = False) -> None:
    """Refuse ``folder`` as the place to save an edit before any training: it must be missing,
    empty, or (with ``overwrite``) an earlier edit folder. Raises :class:`erasekit.files.OutputRefused`."""
    check_output_folder(folder, replaceable=is_edit_folder, overwrite=overwrite, what="edit folder")


def load_edit(folder: str | Path) -> Edit:
    """Read an Edit saved with :meth:`Edit.save`; clear errors for a missing or corrupt one."""
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} is not an erasekit edit: it needs {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, OSError, RuntimeError) as err:
        raise ValueError(f"corrupt edit at {folder}: {err}") from err
    missing = {"method", "concepts", "family", "base_model"} - set(meta)
    if missing:
        raise ValueError(f"corrupt edit at {folder}: {META_FILE} lacks {sorted(missing)}")
    expected = meta.get("tensors", {})
    if expected and (set(expected) != set(tensors) or any(list(tensors[k].shape) != s for k, s in expected.items())):
        raise ValueError(f"corrupt edit at {folder}: tensors do not match {META_FILE}")
    return Edit(
        method=meta["method"],
        concepts=list(meta["concepts"]),
        family=meta["family"],
        base_model=meta["base_model"],
        tensors=tensors,
        hyperparameters=meta.get("hyperparameters", {}),
        metrics=meta.get("metrics", {}),
        version=meta.get("erasekit_version", ""),
        created=meta.get("created", ""),
        id=meta.get("id") or uuid.uuid4().hex[:12],
    )


def _attached(adapter) -> dict:
    return adapter.denoiser.__dict__.setdefault("_erasekit_attached_edits", {})


def apply(pipe, edit: Edit, scale: float = 1.0) -> None:
    """Attach ``edit`` to ``pipe`` (in place) with strength ``scale`` (1.0 = as trained).

    Applying an edit that is already attached replaces it (e.g. to change the scale).
    """
    from .models import adapter_for

    adapter = adapter_for(pipe)
    if edit.family != adapter.family:
        raise ValueError(f"edit {edit.method}/{edit.concepts} was made for family {edit.family!r}, the pipeline is {adapter.family!r}")
    attached = _attached(adapter)
    if edit.id in attached:
        attached[edit.id].remove()  # forget it only once it is really off
        del attached[edit.id]
    from .methods import method_module

    attached[edit.id] = method_module(edit.method).attach(adapter, edit, scale)


def remove(pipe, edit: Edit) -> None:
    """Detach ``edit`` from ``pipe``; the pipeline then generates as before it was applied."""
    from .models import adapter_for

    attached = _attached(adapter_for(pipe))
    if edit.id not in attached:
        raise ValueError(f"edit {edit.id} ({edit.method}, {edit.concepts}) is not applied to this pipeline")
    attached[edit.id].remove()  # a remove that fails leaves the edit applied and known
    del attached[edit.id]

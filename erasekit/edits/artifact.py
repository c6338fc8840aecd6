"""The Edit artifact: what an erasure method produced, as a folder.

An Edit is a folder: ``edit.safetensors`` (the tensors) and ``edit.json`` (kind, method,
concepts, family, base model, hyper-parameters, package version, metrics). Never pickle.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import EditError, NotFound
from ..files import atomic_folder, check_output_folder

WEIGHTS_FILE = "edit.safetensors"
META_FILE = "edit.json"
# The layout of edit.json and edit.safetensors this erasekit writes and the newest it reads; an
# edit.json without "format" is format 0 (written before formats were numbered) and reads as 1.
FORMAT = 1
# The kind of each method's edits, for edits saved before ``edit.json`` recorded the kind.
LEGACY_KINDS = {
    "receler": "output_adapter",
    "eraseanything": "lora",
    "esd": "weight_delta",
    "uce": "weight_delta",
    "sld": "inference_hook",
    "keyword_zeroing": "inference_hook",
}


def legacy_kind(method: str) -> str:
    """The kind of an edit of ``method`` saved without one ("" for a method not known here)."""
    return LEGACY_KINDS.get(method, "")


@dataclass
class Edit:
    """An erasure's result. ``kind`` names the edit kind that attaches it (see
    :mod:`erasekit.edits`; empty: inferred from ``method``); ``tensors`` are named as that kind
    reads them (e.g. per attachment point or per parameter)."""

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
    kind: str = ""

    def __post_init__(self):
        from .. import __version__

        self.version = self.version or __version__
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.kind = self.kind or legacy_kind(self.method)

    @classmethod
    def made_on(cls, adapter, **fields) -> Edit:
        """An Edit made on ``adapter``'s model: its family, and as ``base_model`` its pipeline's
        ``name_or_path`` ('' when it has none); ``fields``: the other fields."""
        pipe = getattr(adapter, "pipe", None)
        return cls(family=adapter.family, base_model=str(getattr(pipe, "name_or_path", "") or ""), **fields)

    def metadata(self) -> dict:
        """What ``edit.json`` holds (tensor shapes, not their values)."""
        return {
            "kind": self.kind,
            "method": self.method,
            "concepts": self.concepts,
            "family": self.family,
            "base_model": self.base_model,
            "hyperparameters": self.hyperparameters,
            "metrics": self.metrics,
            "format": FORMAT,
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


def read_edit_meta(folder: str | Path) -> dict:
    """The ``edit.json`` of the edit folder ``folder``, checked (no tensors read): what a caller
    needs to refuse an edit before loading a model. :class:`~erasekit.errors.NotFound` for a
    folder that is not an edit, :class:`~erasekit.errors.EditError` for a corrupt or newer one."""
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise NotFound(f"{folder} is not an erasekit edit: it needs {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise EditError(f"corrupt edit at {folder}: {META_FILE} is not readable JSON ({err})") from err
    if not isinstance(meta, dict):
        raise EditError(f"corrupt edit at {folder}: {META_FILE} must hold a JSON object")
    version = meta.get("format", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise EditError(f"corrupt edit at {folder}: unknown edit format {version!r}")
    if version > FORMAT:
        raise EditError(
            f"the edit at {folder} has format {version}, written by a newer erasekit "
            f"({meta.get('erasekit_version', '?')}); this one reads formats up to {FORMAT}: upgrade erasekit"
        )
    missing = {"method", "concepts", "family", "base_model"} - set(meta)
    if missing:
        raise EditError(f"corrupt edit at {folder}: {META_FILE} lacks {sorted(missing)}")
    return meta


def load_edit(folder: str | Path) -> Edit:
    """Read an Edit saved with :meth:`Edit.save`; one-line errors for a missing or corrupt one
    (:func:`read_edit_meta`; a truncated or damaged ``edit.safetensors`` is "corrupt edit at
    PATH"). An ``edit.json`` without ``kind`` (saved before kinds were recorded) gets its
    method's kind. :func:`erasekit.edits.load_edit` also checks the tensors against the kind."""
    folder = Path(folder)
    meta = read_edit_meta(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EditError(f"corrupt edit at {folder}: {WEIGHTS_FILE} cannot be read ({reason})") from err
    expected = meta.get("tensors", {})
    if expected and (set(expected) != set(tensors) or any(list(tensors[k].shape) != s for k, s in expected.items())):
        raise EditError(f"corrupt edit at {folder}: tensors do not match {META_FILE}")
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
        kind=meta.get("kind") or legacy_kind(meta["method"]),
    )

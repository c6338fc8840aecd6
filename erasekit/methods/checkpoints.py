"""Training checkpoints shared by the methods: tensors (trained weights, optimizer state, the
random generator's state) in ``checkpoint.safetensors`` and what made them in
``checkpoint.json``: the method, the edit kind, the concept(s), the model's identity and the
settings. A run resumes only from a checkpoint made for the same of each; any other is refused
with a :class:`CheckpointMismatch` naming the first field that differs.

Model identity (:func:`model_identity`): for a pipeline loaded from a local folder, a sha256 of its
files' contents (each file's hash cached in ``<erasekit cache>/file_hashes.json`` by path, size
and modification time, so a large model is read once); for a hub id, the id and the revision
(the snapshot's commit); for a pipeline built in memory, a sha256 of every component's tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import atomic_write_text
from ..lexicon import cache_dir

TENSORS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"
HASH_CACHE_FILE = "file_hashes.json"
# The identity fields of checkpoint.json, in the order they are compared, and their names in messages.
IDENTITY_FIELDS = {"method": "method", "edit_kind": "edit kind", "concepts": "concept", "model": "model"}


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint folder holds the state of another run (method, edit kind, concept, model or
    settings); the one-line message names the field and says to use another folder."""


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as named tensors ``{prefix}.{param index}.{key}``."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"{prefix}.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Restore what :func:`optimizer_tensors` saved into an optimizer over the same parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        state = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{i}.")}
        if state:
            opt.state[p] = state


def save_checkpoint(folder: str | Path, iteration: int, tensors: dict[str, torch.Tensor], settings: dict) -> None:
    """Write the checkpoint of ``iteration``; each file is replaced whole, never half-written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / (TENSORS_FILE + ".tmp")))
    (folder / (META_FILE + ".tmp")).write_text(json.dumps(settings | {"iteration": iteration}))
    (folder / (TENSORS_FILE + ".tmp")).replace(folder / TENSORS_FILE)
    (folder / (META_FILE + ".tmp")).replace(folder / META_FILE)


def _show(field: str, value) -> str:
    if field == "concepts" and isinstance(value, list):
        return ", ".join(repr(c) for c in value)
    if field == "model" and isinstance(value, dict):
        return describe_model(value)
    return repr(value)


def load_checkpoint(folder: str | Path, settings: dict) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(iteration, tensors) of the checkpoint in ``folder``, None if there is none; a
    :class:`CheckpointMismatch` if it was made for another run: ``settings``' identity fields
    (:data:`IDENTITY_FIELDS`, where given) are compared first and named in the message, then
    everything else ("other settings", naming the keys that differ)."""
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    iteration = saved.pop("iteration")
    wanted = json.loads(json.dumps(settings))  # compare as JSON: tuples become lists
    fix = "use another --checkpoint-dir"
    for field, name in IDENTITY_FIELDS.items():
        if field not in wanted or _key(field, saved.get(field)) == _key(field, wanted[field]):
            continue
        if field not in saved:
            raise CheckpointMismatch(
                f"the checkpoint in {folder} records no {name} (an older erasekit made it), so it cannot be "
                f"checked against {_show(field, wanted[field])}; {fix}"
            )
        raise CheckpointMismatch(
            f"the checkpoint in {folder} was made for {name} {_show(field, saved[field])}, "
            f"not {_show(field, wanted[field])}; {fix}"
        )
    saved_rest = {k: v for k, v in saved.items() if not (k in IDENTITY_FIELDS and k in wanted)}
    wanted_rest = {k: v for k, v in wanted.items() if k not in IDENTITY_FIELDS}
    if saved_rest != wanted_rest:
        a, b = _flat(saved_rest), _flat(wanted_rest)
        names = ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
        raise CheckpointMismatch(
            f"the checkpoint in {folder} was made with other settings ({names}); "
            "use another folder or the same settings"
        )
    return iteration, load_file(str(folder / TENSORS_FILE))


def _key(field: str, value):
    """What is compared of an identity field: a model's contents hash when it has one (a moved
    folder is the same model), else the whole value."""
    if field == "model" and isinstance(value, dict) and "sha256" in value:
        return value["sha256"]
    return value


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as {dotted key: JSON text of the value} (comparable, hashable)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


# ---- model identity ----------------------------------------------------------------------------

_FILE_HASHES: dict[str, dict] = {}  # this process's cache: resolved path -> {size, mtime_ns, sha256}


def _hash_cache_path() -> Path:
    return cache_dir() / HASH_CACHE_FILE


def _load_hash_cache() -> dict[str, dict]:
    try:
        return json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_hash_cache(entries: dict[str, dict]) -> None:
    try:
        atomic_write_text(_hash_cache_path(), json.dumps(_load_hash_cache() | entries, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only cache only costs hashing again next time


def file_sha256(path: str | Path, cache: dict[str, dict] | None = None) -> str:
    """The sha256 (hex) of a file's contents, from ``cache`` (resolved path -> {size, mtime_ns,
    sha256}) when its size and modification time are unchanged; computed and entered otherwise."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    cache = _FILE_HASHES if cache is None else cache
    hit = cache.get(key)
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def folder_sha256(folder: str | Path) -> str:
    """A sha256 (hex) over every file under ``folder`` (hidden files and folders skipped; links
    followed): each relative path with its contents' sha256, in sorted order. Each file is read
    once: its hash is cached by path, size and mtime in this process and in erasekit's cache
    folder (``$ERASEKIT_CACHE``, else ``~/.cache/erasekit``)."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    disk = _load_hash_cache()
    before = dict(disk)
    cache = disk | _FILE_HASHES
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p, cache)}\n".encode())
    mine = {str(p.resolve()) for p in files}  # the disk cache learns this folder's files only
    fresh = {k: v for k, v in cache.items() if k in mine and before.get(k) != v}
    _FILE_HASHES.update(cache)
    if fresh:
        _store_hash_cache(fresh)
    return digest.hexdigest()


def tensors_sha256(modules: dict[str, torch.nn.Module]) -> str:
    """A sha256 (hex) over the named modules' parameters and buffers: names, dtypes, shapes, bytes."""
    digest = hashlib.sha256()
    for name, module in sorted(modules.items()):
        for key, t in sorted(module.state_dict(keep_vars=False).items()):
            t = t.detach().cpu().contiguous()
            digest.update(f"{name}.{key}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _revision(pipe) -> str | None:
    """The hub commit a pipeline was loaded at: the ``snapshots/<commit>`` folder its components
    were read from (diffusers records that folder as each component's ``_name_or_path``)."""
    for module in getattr(pipe, "components", {}).values():
        source = str(getattr(getattr(module, "config", None), "_name_or_path", "") or "")
        found = re.search(r"snapshots[/\\]([0-9a-f]{40})", source)
        if found:
            return found.group(1)
    return None


def model_identity(pipe) -> dict:
    """What identifies ``pipe``'s weights, as JSON-able fields: {"folder", "sha256"} for a local
    folder (contents hash, cached: see :func:`folder_sha256`), {"hub_id", "revision"} for a hub
    id (revision None when unknown), {"in_memory": class name, "sha256"} for a pipeline built in
    memory (every component's tensors hashed)."""
    source = str(getattr(pipe, "name_or_path", "") or "")
    if source and Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
        return {"folder": str(folder), "sha256": folder_sha256(folder)}
    if source:
        return {"hub_id": source, "revision": _revision(pipe)}
    modules = {n: m for n, m in getattr(pipe, "components", {}).items() if isinstance(m, torch.nn.Module)}
    return {"in_memory": type(pipe).__name__, "sha256": tensors_sha256(modules)}


def describe_model(identity: dict) -> str:
    """One phrase for a :func:`model_identity`: "'/models/sd' (files sha256 1a2b3c4d5e6f)"."""
    if "folder" in identity:
        return f"{identity['folder']!r} (files sha256 {identity['sha256'][:12]})"
    if "hub_id" in identity:
        return f"{identity['hub_id']!r} (revision {identity.get('revision') or 'unknown'})"
    return f"an in-memory {identity.get('in_memory', 'pipeline')} (weights sha256 {identity.get('sha256', '?')[:12]})"

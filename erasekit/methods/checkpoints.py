"""Training checkpoints shared by the methods: tensors (trained weights, optimizer state, the
random generator's state) in ``checkpoint.safetensors`` and the settings that made them in
``checkpoint.json``. A run resumes only from a checkpoint made with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"


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


def load_checkpoint(folder: str | Path, settings: dict) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(iteration, tensors) of the checkpoint in ``folder``, None if there is none; a ValueError
    if it was made with other ``settings``."""
    folder = Path(folder)
    path = folder / META_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    iteration = saved.pop("iteration")
    if saved != json.loads(json.dumps(settings)):  # compare as JSON: tuples become lists
        raise ValueError(
            f"the checkpoint in {folder} was made with other settings; use another folder or the same settings"
        )
    return iteration, load_file(str(folder / TENSORS_FILE))

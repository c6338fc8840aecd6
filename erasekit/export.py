"""``erasekit export``: an edit as the files other tools load (diffusers, ComfyUI, Automatic1111).

Formats (:data:`FORMATS`):

- ``diffusers-lora``: a folder with ``pytorch_lora_weights.safetensors`` in the diffusers LoRA
  layout; ``pipe.load_lora_weights(folder)`` loads it (ComfyUI reads the layout too).
- ``kohya``: one ``.safetensors`` in the kohya / sd-scripts layout (Automatic1111's and ComfyUI's
  LoRA folders; diffusers' ``load_lora_weights`` reads it too): :mod:`erasekit.edits.formats.kohya`.
- ``merged``: the whole pipeline with the edit folded into its weights, as a diffusers folder
  (``DiffusionPipeline.from_pretrained(folder)``) and, for SD 1.x, the same model as one
  original-layout checkpoint ``<folder>/<folder name>.safetensors`` (Automatic1111's
  models/Stable-diffusion): :mod:`erasekit.edits.formats.single_file`.

How each edit kind gets there:

- ``lora`` (EraseAnything): its factors as they are (exact).
- ``weight_delta`` (ESD, UCE): merged exactly; as a LoRA through a truncated SVD at ``rank``
  (Linear and Conv2d weights; deltas of biases and norms are left out of a LoRA and counted
  in its error, ``relative_error`` = ||delta - LoRA|| / ||delta|| over every parameter).
- ``output_adapter`` (Receler): distilled into a LoRA (:mod:`erasekit.methods.distill`, rank
  ``distill_rank``) on the prompt's keys and values (default) or on the attention output
  projections (``distill_into``), then as a LoRA edit; the fit's relative residual is recorded.
  Compare the suite's figures before and after (benchmarks/export_receler.py).
- ``inference_hook`` (SLD, keyword zeroing): nothing in the weights to export; refused.

Every export writes ``erasekit_export.json`` (folders) or the same record in the file's metadata
(kohya): the edit's id, method, concepts and the approximation made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .edits import Edit, apply, load_edit, remove
from .edits.artifact import legacy_kind
from .edits.formats.kohya import DENOISER_PREFIX, lora_can_carry, lora_from_deltas
from .edits.kind import check_edit
from .edits.lora import NAME as LORA
from .edits.weight_delta import NAME as WEIGHT_DELTA
from .edits.weight_delta import delta_key, targets_of
from .errors import UserError
from .files import atomic_folder, check_output_folder

FORMATS = ("diffusers-lora", "kohya", "merged")
# Where an output-adapter edit (Receler) is distilled: an end-to-end fit on the text projections
# of cross / joint attention (the default: on both toy pipelines it keeps more locality and
# robustness, benchmarks/RESULTS.md), or a per-layer fit on the attention output projections.
DISTILL_INTO = {
    "prompt-keys-values": "the prompt's keys and values (end-to-end fit)",
    "attention-output": "the attention output projections (per-layer fit)",
    "prompt-keys-values+attention-output": "the prompt's keys and values and the attention output projections "
    "(end-to-end fit)",
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights(folder) looks for
RECORD = "erasekit_export.json"


class ExportError(UserError, ValueError):
    """An edit that cannot be exported in the asked format, or a bad export setting."""


def _is_export_folder(folder: Path) -> bool:
    return (folder / RECORD).is_file()


def _lora_of(
    pipe, edit: Edit, rank: int, distill_rank: int, progress: bool, distill_into: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """The edit as diffusers-layout LoRA tensors and a record of the approximation made."""
    kind = edit.kind or legacy_kind(edit.method)
    if kind == LORA:
        return dict(edit.tensors), {"approximation": "none (the edit is a LoRA)", "relative_error": 0.0}
    if kind == WEIGHT_DELTA:
        return _lora_from_weight_deltas(edit, rank)
    if kind == "output_adapter":
        lora, report = _distil(pipe, edit, distill_rank, progress, distill_into)
        where = DISTILL_INTO[distill_into]
        return dict(lora.tensors), {
            "approximation": f"distilled into a rank-{distill_rank} LoRA on {where}",
            "relative_error": report["relative_residual"],
            "distill": report,
        }
    raise ExportError(
        f"a {kind} edit ({edit.method}) acts at inference time and has no weights to export; use it through erasekit"
    )


def _lora_from_weight_deltas(edit: Edit, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    norms_sq: dict[tuple[str, str], float] = {}  # (prefix, parameter) -> ||delta||^2
    dropped: dict[str, float] = {}
    total = 0.0
    for (component, parameter), delta in targets_of(edit).items():
        norm_sq = float(delta.double().pow(2).sum())
        total += norm_sq
        if not lora_can_carry(parameter, delta):
            dropped[f"{component + '.' if component else ''}{parameter}"] = norm_sq
            continue
        prefix = component or DENOISER_PREFIX.get(edit.family, "unet")
        groups.setdefault(prefix, {})[parameter] = delta
        norms_sq[prefix, parameter] = norm_sq
    if not groups:
        raise ExportError(
            f"the {edit.method} edit changes no Linear or Conv2d weight a LoRA can carry "
            f"({', '.join(list(dropped)[:3])}); use --format merged"
        )
    tensors: dict[str, torch.Tensor] = {}
    err_sq = 0.0
    parameters: dict[str, dict] = {}
    for prefix, deltas in groups.items():
        part, report = lora_from_deltas(deltas, rank, prefix)
        tensors |= part
        for name, p in report["parameters"].items():
            err_sq += p["relative_error"] ** 2 * norms_sq[prefix, name]
            parameters[f"{prefix}.{name}"] = p
    err_sq += sum(dropped.values())
    rel = (err_sq / total) ** 0.5 if total > 0 else 0.0
    return tensors, {
        "approximation": f"truncated SVD at rank {rank}",
        "relative_error": rel,
        "dropped": {k: (v / total) ** 0.5 if total else 0.0 for k, v in dropped.items()},
        "parameters": parameters,
    }


def _distil(pipe, edit: Edit, rank: int, progress: bool, into: str):
    from .lexicon import WordNetUnavailable, lexicon_for
    from .methods.distill import distil_prompts, distil_to_lora, distil_to_text_lora

    others: list[str] = []
    synonyms: list[str] = []
    for concept in edit.concepts:
        try:
            lex = lexicon_for("auto", pipe, concept)
            synonyms += lex.synonyms(concept)[:3]
            others += lex.irrelevant_mixed(concept, ["close", "mid"], 8)
        except WordNetUnavailable:
            pass
    prompts, other_prompts = distil_prompts(list(edit.concepts) + synonyms, others)
    if into == "attention-output":
        return distil_to_lora(pipe, edit, prompts, other_prompts, rank=rank, progress=progress)
    outputs = into == "prompt-keys-values+attention-output"
    return distil_to_text_lora(pipe, edit, prompts, other_prompts, rank=rank, outputs=outputs, progress=progress)


def _as_weight_delta(edit: Edit, lora: dict[str, torch.Tensor]) -> Edit:
    """A weight-delta edit holding B @ A of every LoRA module (the denoiser's, or a text encoder's)."""
    tensors = {}
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = lora[key[: -len(".lora_A.weight")] + ".lora_B.weight"]
        component, _, module = key[: -len(".lora_A.weight")].partition(".")
        delta = (b.double().flatten(1) @ a.double().flatten(1)).float()
        if a.dim() == 4:
            delta = delta.reshape(b.shape[0], *a.shape[1:])
        denoiser = component in DENOISER_PREFIX.values()
        tensors[delta_key(module + ".weight", "" if denoiser else component)] = delta
    return Edit(
        kind=WEIGHT_DELTA,
        method=f"{edit.method}-merged",
        concepts=list(edit.concepts),
        family=edit.family,
        base_model=edit.base_model,
        tensors=tensors,
    )


def export(
    edit: Edit | str | Path,
    model: Any,
    format: str = "diffusers-lora",
    out: str | Path = "erasekit-export",
    rank: int = 64,
    distill_rank: int = 16,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    distill_into: str = "prompt-keys-values",
) -> dict:
    """Write ``edit`` (an Edit or its folder) for ``model`` (a pipeline, a folder or "toy:sd") in
    ``format`` (:data:`FORMATS`) at ``out``; returns the export record (also written beside it).

    ``rank``: a weight-delta edit's LoRA rank (truncated SVD); ``distill_rank``: the LoRA rank an
    output-adapter edit is distilled into, and ``distill_into`` where (:data:`DISTILL_INTO`).
    ``dtype``: the merged checkpoint's weights ("fp16", "bf16"; default the pipeline's).
    ``out``: a folder (diffusers-lora, merged) or a ``.safetensors`` file (kohya); an earlier
    export there is replaced only with ``overwrite``, anything else is refused. The record:
    format, paths, the edit's id / method / kind / concepts, and the approximation with its
    ``relative_error`` (0 when exact).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if distill_into not in DISTILL_INTO:
        raise ExportError(f"unknown distill_into {distill_into!r}; known: {', '.join(DISTILL_INTO)}")
    for name, value in (("rank", rank), ("distill_rank", distill_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExportError(f"{name} must be a positive integer, got {value!r}")
    edit = edit if isinstance(edit, Edit) else load_edit(edit)
    check_edit(edit)
    out = Path(out)
    if format == "kohya":
        if out.suffix != ".safetensors":
            raise ExportError(f"--format kohya writes one .safetensors file; got {out}")
        if out.exists() and not overwrite:
            raise ExportError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    else:
        check_output_folder(out, replaceable=_is_export_folder, overwrite=overwrite, what="export folder")

    from .models import adapter_for, load_pipeline

    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    family = adapter_for(pipe).family
    if edit.family != family:
        raise ExportError(
            f"the edit ({edit.method}, {edit.concepts}) was made for {edit.family!r}, the model is {family!r}"
        )
    record: dict = {
        "format": format,
        "edit": {"id": edit.id, "method": edit.method, "kind": edit.kind, "concepts": edit.concepts},
        "family": family,
        "base_model": str(model if isinstance(model, (str, Path)) else getattr(pipe, "name_or_path", "")),
    }
    kind = edit.kind or legacy_kind(edit.method)
    if format == "merged":
        if kind == WEIGHT_DELTA:
            merged_edit, approx = edit, {"approximation": "none (deltas added to the weights)", "relative_error": 0.0}
        else:
            lora, approx = _lora_of(pipe, edit, rank, distill_rank, progress, distill_into)
            merged_edit = _as_weight_delta(edit, lora)
        record |= approx
        record["files"] = _write_merged(pipe, merged_edit, out, family, dtype, record, overwrite)
    else:
        lora, approx = _lora_of(pipe, edit, rank, distill_rank, progress, distill_into)
        record |= approx | {"rank": _max_rank(lora)}
        if format == "kohya":
            from .edits.formats.kohya import save_kohya, to_kohya

            meta = {
                "erasekit_export": json.dumps({k: v for k, v in record.items() if k not in ("parameters", "distill")})
            }
            save_kohya(out, to_kohya(lora, family), meta)
            record["files"] = [str(out)]
        else:
            from safetensors.torch import save_file

            with atomic_folder(out, replaceable=_is_export_folder, overwrite=overwrite) as tmp:
                save_file({k: v.contiguous() for k, v in lora.items()}, str(Path(tmp) / LORA_WEIGHTS))
                record["files"] = [str(out / LORA_WEIGHTS)]
                (Path(tmp) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _max_rank(lora: dict[str, torch.Tensor]) -> int:
    return max((int(v.shape[0]) for k, v in lora.items() if k.endswith(".lora_A.weight")), default=0)


def _write_merged(pipe, delta_edit: Edit, out: Path, family: str, dtype, record: dict, overwrite: bool) -> list[str]:
    """The pipeline with ``delta_edit`` folded in: a diffusers folder (and, SD, one original-layout
    checkpoint inside it). The pipeline is left as it was."""
    from .models.loading import write_defaults

    apply(pipe, delta_edit)
    try:
        with atomic_folder(out, replaceable=_is_export_folder, overwrite=overwrite) as tmp:
            tmp = Path(tmp)
            pipe.save_pretrained(tmp, safe_serialization=True)
            if getattr(pipe, "erasekit_defaults", None):  # how erasekit samples it (toy pipelines)
                write_defaults(tmp, pipe.erasekit_defaults)
            files = [str(out)]
            if family == "sd":
                from .edits.formats.single_file import save_sd_checkpoint

                name = f"{out.name}.safetensors"
                save_sd_checkpoint(pipe, tmp / name, metadata={"erasekit_edit": delta_edit.id}, dtype=dtype)
                files.append(str(out / name))
            (tmp / RECORD).write_text(json.dumps(record | {"files": files}, indent=2) + "\n")
    finally:
        remove(pipe, delta_edit)
    return files

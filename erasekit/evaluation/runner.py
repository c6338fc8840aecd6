"""The generation runner: a suite's cases to PNG files and ``manifest.jsonl``, resumable, and
spread over several processes (GPUs) with accelerate.

A run folder holds ``run.json`` (what is generated: cases, model/edit identity, settings),
``images/NNNNN.png`` (one per case, 8-bit RGB) and ``manifest.jsonl`` (one JSON line per
finished image). Images are generated in fixed batches (consecutive cases with the same
guidance and size, at most ``batch_size``); a batch's manifest lines are appended in one write
after its images are on disk, so an interrupted run resumes at the first unfinished batch and
never regenerates a finished image. Under ``accelerate launch`` each process takes every n-th
batch; since batches are the same whatever the number of processes, 1 and n processes give the
same images. :func:`generate_in_memory` makes the same batches without a folder and keeps the
images rounded to 8 bits (:func:`as_8bit`), exactly as the PNGs read back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import atomic_write_bytes, atomic_write_text
from .suites import Case

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
IMAGE_DIR = "images"


def plan_batches(cases: Sequence[Case], batch_size: int) -> list[list[int]]:
    """Case indices in batches: consecutive cases with equal (guidance, height, width), at most
    ``batch_size`` each. Depends on the cases and batch_size only."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: list[list[int]] = []
    key = None
    for i, c in enumerate(cases):
        k = (c.guidance, c.height, c.width)
        if not batches or k != key or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append(i)
        key = k
    return batches


def read_manifest(folder: str | Path) -> dict[int, dict]:
    """index -> manifest record of every finished image of the run in ``folder`` whose PNG exists.
    A line cut short by a kill is ignored."""
    folder = Path(folder)
    path = folder / MANIFEST
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (folder / rec["file"]).is_file():
            done[int(rec["index"])] = rec
    return done


def _fingerprint(cases: Sequence[Case], identity: dict) -> str:
    payload = json.dumps({"cases": [c.to_dict() for c in cases], "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _levels(image: torch.Tensor) -> torch.Tensor:
    """``image`` in [0, 1] as the 0..255 levels an 8-bit PNG stores (uint8)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte()


def as_8bit(images: torch.Tensor) -> torch.Tensor:
    """``images`` (any shape, in [0, 1]) as they come back from an 8-bit PNG: each value rounded
    to the nearest of 256 levels, as float32 in [0, 1], bit for bit what :func:`load_image`
    gives for the PNG of the same image."""
    return _levels(images).float() / 255


def _png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    arr = _levels(image).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def load_image(path: str | Path) -> torch.Tensor:
    """A PNG as (3, H, W) floats in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


class RunImages(Sequence):
    """The images of a finished run, read from disk on access: ``images[i]`` is (3, H, W) in
    [0, 1] for case i. Memory stays flat for thousands of large images."""

    def __init__(self, folder: str | Path, records: Sequence[dict]):
        self.folder = Path(folder)
        self.files = [r["file"] for r in sorted(records, key=lambda r: r["index"])]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return load_image(self.folder / self.files[i])


def process_state():
    """accelerate's ``PartialState`` for this process. Under ``accelerate launch --multi_gpu``
    (torchrun) on a machine without an accelerator, or with ACCELERATE_USE_CPU set, the
    processes share the work on the CPU (gloo) instead of each doing all of it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available())


def _state(state):
    return state if state is not None else process_state()


def _generate_batch(adapter, cases: Sequence[Case], batch: list[int], steps: int, negative_prompt: str):
    """The images (B, 3, H, W) in [0, 1] of the cases ``batch`` (one batch of :func:`plan_batches`)
    and the seconds per image."""
    first = cases[batch[0]]
    start = time.time()
    images = adapter.generate(
        [cases[i].prompt for i in batch],
        [cases[i].seed for i in batch],
        steps=steps,
        guidance=first.guidance,
        height=first.height,
        width=first.width,
        negative_prompt=negative_prompt,
    )
    return images, (time.time() - start) / len(batch)


def _record(adapter, c: Case, image: torch.Tensor, steps: int, seconds: float) -> dict:
    """What the manifest records of one generated image (besides its index and file)."""
    return {
        "prompt": c.prompt,
        "seed": c.seed,
        "set": c.set,
        "label": c.label,
        "guidance": adapter.generation_guidance if c.guidance is None else c.guidance,
        "height": int(image.shape[-2]),
        "width": int(image.shape[-1]),
        "steps": steps,
        "seconds": round(seconds, 4),
    }


def generate_in_memory(
    adapter,
    cases: Sequence[Case],
    batch_size: int = 16,
    steps: int | None = None,
    negative_prompt: str = "",
    progress: bool | str = True,
) -> tuple[list[dict], list[torch.Tensor]]:
    """:func:`generate_run` without a folder: the same batches and the same records (no
    ``file``), and the images kept in memory, as 8-bit images (:func:`as_8bit`), i.e. exactly
    what a run folder's PNGs give back. Nothing is written, so nothing resumes; every process
    generates every image (for small runs such as the toy bench's rows).

    Returns (records, images): images[i] is (3, H, W) in [0, 1] for case i.
    """
    steps = int(steps or adapter.generation_steps)
    adapter.pipe.set_progress_bar_config(disable=True)
    records: list[dict] = []
    images: list[torch.Tensor] = []
    desc = progress if isinstance(progress, str) else "generate"
    batches = plan_batches(cases, batch_size)
    with tqdm(total=len(cases), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches:
            out, seconds = _generate_batch(adapter, cases, batch, steps, negative_prompt)
            for i, image in zip(batch, out):
                records.append({"index": i} | _record(adapter, cases[i], image, steps, seconds))
                images.append(as_8bit(image.cpu()))
            bar.update(len(batch))
    return records, images


def generate_run(
    adapter,
    cases: Sequence[Case],
    folder: str | Path,
    batch_size: int = 16,
    steps: int | None = None,
    negative_prompt: str = "",
    identity: dict | None = None,
    progress: bool | str = True,
    after_batch: Callable[[list[int]], None] | None = None,
    state=None,
) -> list[dict]:
    """Generate one PNG per case into ``folder`` (resuming what is there) with ``adapter``.

    ``identity``: what makes the images what they are besides the cases (model, edits and their
    scale); a folder holding another run (other cases or identity) is an error, not a resume.
    ``steps``: sampler steps (None: the model's default). ``after_batch(indices)`` is called
    after each batch is recorded. ``state``: an accelerate ``PartialState`` (default: the
    current one; under ``accelerate launch`` each process generates its share).
    Returns the manifest records (dicts with index, file, prompt, seed, guidance, height,
    width, steps, ...) of all cases, sorted by index; every process returns them.
    """
    state = _state(state)
    folder = Path(folder)
    identity = dict(identity or {})
    steps = int(steps or adapter.generation_steps)
    fingerprint = _fingerprint(cases, identity | {"steps": steps, "negative_prompt": negative_prompt})
    run_path = folder / RUN_FILE
    if state.is_main_process:
        if run_path.is_file():
            previous = json.loads(run_path.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{folder} holds another run (other prompts, seeds, model, edits or settings): "
                    "use another folder or delete it"
                )
        else:
            (folder / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
            run = {
                "fingerprint": fingerprint,
                "identity": identity,
                "steps": steps,
                "negative_prompt": negative_prompt,
                "batch_size": batch_size,
                "n": len(cases),
                "cases": [c.to_dict() for c in cases],
            }
            atomic_write_text(run_path, json.dumps(run, indent=1, default=str) + "\n")
    state.wait_for_everyone()
    run = json.loads(run_path.read_text())
    if run["fingerprint"] != fingerprint:
        raise ValueError(f"{folder} holds another run: use another folder or delete it")
    batch_size = int(run["batch_size"])  # a resumed run keeps its batches (same batches, same bits)

    done = read_manifest(folder)
    batches = plan_batches(cases, batch_size)
    mine = [b for k, b in enumerate(batches) if k % state.num_processes == state.process_index]
    todo = [b for b in mine if any(i not in done for i in b)]
    adapter.pipe.set_progress_bar_config(disable=True)
    desc = progress if isinstance(progress, str) else "generate"
    disable = not progress or not state.is_local_main_process
    manifest_fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(
            total=sum(len(b) for b in mine),
            initial=sum(len(b) for b in mine if b not in todo),
            desc=desc,
            disable=disable,
            leave=False,
        ) as bar:
            for batch in todo:
                images, seconds = _generate_batch(adapter, cases, batch, steps, negative_prompt)
                lines = []
                for i, image in zip(batch, images):
                    if i in done:
                        continue  # finished before an interruption: never rewritten
                    file = f"{IMAGE_DIR}/{i:05d}.png"
                    atomic_write_bytes(folder / file, _png_bytes(image))
                    rec = {"index": i, "file": file} | _record(adapter, cases[i], image, steps, seconds)
                    rec["process"] = state.process_index
                    lines.append(json.dumps(rec) + "\n")
                # One write per batch on an O_APPEND descriptor: lines of concurrent processes never interleave.
                os.write(manifest_fd, "".join(lines).encode("utf-8"))
                os.fsync(manifest_fd)
                bar.update(len(batch))
                if after_batch is not None:
                    after_batch(batch)
    finally:
        os.close(manifest_fd)
    state.wait_for_everyone()
    done = read_manifest(folder)
    missing = [i for i in range(len(cases)) if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} images of {folder} are missing after generation (first: {missing[:5]})")
    return [done[i] for i in range(len(cases))]

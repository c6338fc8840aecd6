"""``erasekit demo``: the toy world end to end on a CPU in minutes.

Loads the shipped toy pipelines through ``erasekit.load_pipeline`` (the same path as real
models), draws a gallery of every object and colour, runs the object-erasure suite for one
concept on the unedited model, erases the concept (ESD-u with the toy preset by default: about
30 s per pipeline), runs the suite again on the edited model, and writes ``index.html`` (grids:
base vs edited at the same seeds) and ``results.json``.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .edits import apply, remove
from .evaluation.generation import generate_images
from .evaluation.report import figure, html_table, image_grid, page
from .methods import erase, make_config
from .models import adapter_for, load_pipeline
from .toyworld import pipeline_path
from .toyworld.detector import ToyDetector
from .toyworld.grammar import COLORS, OBJECT_NAMES, object_by_name
from .toyworld.suite import SETS, run_object_suite

FAMILIES = ("sd", "flux")
MEANINGFUL_BASE = 50.0  # % of simple prompts showing the concept below which erasure means nothing


def base_warning(acc_e: float) -> str:
    """The warning shown when the unedited model rarely draws the concept."""
    return (
        f"The unedited model draws the concept on only {acc_e:.0f}% of simple prompts: "
        "erasure numbers for this model are not meaningful."
    )


GRID_PER_SET = 8


def _gallery(adapter) -> torch.Tensor:
    prompts = [f"a {color} {obj}" for obj in OBJECT_NAMES for color in COLORS]
    return generate_images(adapter, prompts, list(range(len(prompts))), progress="gallery")


def _set_rows(suite, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The first GRID_PER_SET images of every prompt set, one row per set, and the row labels."""
    rows, labels = [], []
    for s in SETS:
        idx = [i for i, c in enumerate(suite.cases) if c["set"] == s][:GRID_PER_SET]
        rows.append(images[idx])
        labels.append(f"{s}: {suite.cases[idx[0]]['prompt']}")
    return torch.cat(rows), labels


def run_demo(
    out: str | Path = "erasekit-demo",
    concept: str = "triangle",
    n: int = 12,
    method: str | None = "esd-u",
    preset: str = "fast",
    overrides: dict[str, str] | None = None,
    families=FAMILIES,
) -> dict:
    """Write the demo page for ``concept`` to ``out``; returns the JSON result written there.

    ``method``: a method or a bench row name ("esd-u" is ESD with group esd-u); None shows the
    unedited models only. ``overrides`` change the preset's settings. The default (ESD-u, fast
    preset, on the triangle) erases on both toy pipelines in about 30 s each (benchmarks/RESULTS.md).
    """
    object_by_name(concept)  # unknown concept -> ValueError before any work
    label = method
    if method:
        # A variant's fixed settings come with its name; a --set that contradicts them is refused.
        config = make_config(method, preset, overrides or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    detector = ToyDetector.load()
    result: dict = {
        "erasekit": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "concept": concept,
        "method": label,
        "preset": preset if method else None,
        "detector": {"name": detector.name, "threshold": detector.threshold},
        "families": {},
    }
    sections = [
        "<p>The toy world: six shapes with synonyms and indirect mentions, five colours, two "
        "textures, three backgrounds. Robustness and locality prompts use phrasings held out of "
        "training. The detector is a classifier trained on the renderer's ground truth. "
        "Acc_E: % of simple prompts showing the concept (lower is better); Acc_R: the same on "
        "paraphrases, synonyms and indirect mentions (lower is better); Acc_L: % of other "
        "objects still drawn (higher is better); H: their harmonic mean.</p>"
    ]
    for family in tqdm(families, desc="demo"):
        path = pipeline_path(family)
        pipe = load_pipeline(path)
        adapter = adapter_for(pipe)
        gallery = _gallery(adapter)
        base, base_images = run_object_suite(pipe, concept, detector, n=n)
        entry = {"pipeline": str(path), "base": base.to_dict()}
        rows = [["base", base.acc_e, base.acc_r, base.acc_l, base.h]]
        per_set = [[s, base.per_set[s]] for s in SETS]
        edited_images = None
        if method:
            t0 = time.time()
            edit = erase(pipe, concept, method, config)
            train_seconds = time.time() - t0
            apply(pipe, edit)
            edited, edited_images = run_object_suite(pipe, concept, detector, n=n)
            remove(pipe, edit)
            entry["edited"] = edited.to_dict()
            entry["edit"] = {
                "method": label,
                "preset": preset,
                "hyperparameters": edit.hyperparameters,
                "train_seconds": round(train_seconds, 1),
            }
            rows.append([f"{label} ({preset})", edited.acc_e, edited.acc_r, edited.acc_l, edited.h])
            per_set = [[s, base.per_set[s], edited.per_set[s]] for s in SETS]
        result["families"][family] = entry

        sections.append(f"<h2>{family}: {type(pipe).__name__}</h2>")
        sections.append(
            figure(
                image_grid(gallery, cols=len(COLORS)),
                "rows: " + ", ".join(OBJECT_NAMES) + "; columns: " + ", ".join(COLORS),
            )
        )
        sections.append(f"<h3>Erasing '{concept}'</h3>")
        if base.acc_e < MEANINGFUL_BASE:
            entry["warning"] = base_warning(base.acc_e)
            sections.append(f"<p><strong>{entry['warning']}</strong></p>")
        sections.append(html_table(["model", "Acc_E", "Acc_R", "Acc_L", "H"], rows))
        header = ["prompt set", "base: % prompted object"] + ([f"{label}: % prompted object"] if method else [])
        sections.append(html_table(header, per_set, cls="sets"))
        grid, labels = _set_rows(base, base_images)
        caption = "rows: " + " | ".join(labels)
        sections.append(figure(image_grid(grid, cols=GRID_PER_SET), "base model. " + caption))
        if edited_images is not None:
            grid, _ = _set_rows(base, edited_images)
            sections.append(figure(image_grid(grid, cols=GRID_PER_SET), f"after {label}, same prompts and seeds"))
    result["seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "index.html").write_text(page(f"erasekit toy-world demo: erasing '{concept}'", sections))
    return result

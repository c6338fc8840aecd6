"""``erasekit demo``: the toy world end to end on a CPU in minutes.

Loads the shipped toy pipelines through ``erasekit.load_pipeline`` (the same path as real
models), draws a gallery of every object and colour, runs the object-erasure suite for one
concept on the unedited models, and writes ``index.html`` and ``results.json``.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..evaluation.generation import generate_images
from ..evaluation.report import figure, html_table, image_grid, page
from ..models import adapter_for, load_pipeline
from . import pipeline_path
from .detector import ToyDetector
from .grammar import COLORS, OBJECT_NAMES, object_by_name
from .suite import SETS, run_object_suite

FAMILIES = ("sd", "flux")


def _gallery(adapter) -> torch.Tensor:
    prompts = [f"a {color} {obj}" for obj in OBJECT_NAMES for color in COLORS]
    return generate_images(adapter, prompts, list(range(len(prompts))), progress="gallery")


def run_demo(out: str | Path = "erasekit-demo", concept: str = "circle", n: int = 12, families=FAMILIES) -> dict:
    """Write the demo page for ``concept`` to ``out``; returns the JSON result written there."""
    object_by_name(concept)  # unknown concept -> ValueError before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    detector = ToyDetector.load()
    result: dict = {
        "erasekit": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "concept": concept,
        "detector": {"name": detector.name, "threshold": detector.threshold},
        "families": {},
    }
    sections = [
        "<p>The toy world: six shapes with synonyms and indirect mentions, five colours, two "
        "textures, three backgrounds. Robustness and locality prompts use phrasings held out of "
        "training. Numbers are for the unedited models; the detector is a classifier trained on "
        "the renderer's ground truth.</p>"
    ]
    for family in tqdm(families, desc="demo"):
        path = pipeline_path(family)
        pipe = load_pipeline(path)
        adapter = adapter_for(pipe)
        gallery = _gallery(adapter)
        suite, images = run_object_suite(pipe, concept, detector, n=n)
        entry = suite.to_dict()
        entry["pipeline"] = str(path)
        result["families"][family] = entry
        rows = [[s, suite.per_set[s]] for s in SETS]
        metrics = [["base", suite.acc_e, suite.acc_r, suite.acc_l, suite.h]]
        sections.append(f"<h2>{family}: {type(pipe).__name__}</h2>")
        sections.append(figure(image_grid(gallery, cols=len(COLORS)), "rows: " + ", ".join(OBJECT_NAMES) + "; columns: " + ", ".join(COLORS)))
        sections.append(f"<h3>Object suite for '{concept}'</h3>")
        sections.append(html_table(["model", "Acc_E", "Acc_R", "Acc_L", "H"], metrics))
        sections.append(html_table(["prompt set", "% prompted object detected"], rows, cls="sets"))
        for s in SETS:
            idx = [i for i, c in enumerate(suite.cases) if c["set"] == s][:12]
            caption = f"{s}: " + " | ".join(suite.cases[i]["prompt"] for i in idx[:3]) + " ..."
            sections.append(figure(image_grid(images[idx], cols=12), caption))
    result["seconds"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "index.html").write_text(page(f"erasekit toy-world demo: {concept}", sections))
    return result

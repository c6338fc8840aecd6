"""``erasekit.evaluate``: a suite on the base model and on edited models, at the same seeds, with
``results.json`` and a self-contained ``report.html``.

Runs: the base model (scale 0), then every edit at every scale. Each run is a resumable
folder of PNGs (:mod:`erasekit.evaluation.runner`), so an interrupted evaluation picks up where
it stopped and ``accelerate launch`` spreads the images over processes; scoring and the report
happen on the main process.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..files import atomic_write_text
from .detectors import describe, make_detector
from .records import edit_record, library_versions, model_record
from .report import figure, html_table, image_grid, page, svg_bar_chart, svg_line_chart, thumbnails
from .runner import RunImages, generate_run, process_state
from .suites import Suite, make_suite

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"


def json_safe(obj):
    """``obj`` with NaN/inf floats as None (strict JSON) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON (see :func:`json_safe`) atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def resolve_suite(suite: str | Suite, options: dict | None = None) -> Suite:
    """A Suite object: given, or made by name with ``options`` (see :func:`make_suite`)."""
    if isinstance(suite, Suite):
        if options:
            raise ValueError("suite options go with a suite name, not a Suite object")
        return suite
    return make_suite(suite, **(options or {}))


def resolve_detector(suite: Suite, detector=None, model: str | None = None, threshold=None):
    """A detector object: given, named, or the suite's default (None for suites without one)."""
    if detector is not None and not isinstance(detector, str):
        return detector
    name = detector or suite.default_detector
    if name is None:
        return None
    return make_detector(name, model=model, threshold=threshold, **suite.detector_options(name))


def resolve_edits(edits) -> list[dict]:
    """[{"label", "edit", "path"}] for Edit objects or Edit folders; labels are the method
    names, numbered when a method repeats."""
    from ..edits import Edit, load_edit

    out, seen = [], {}
    for item in edits or ():
        edit, path = (item, None) if isinstance(item, Edit) else (load_edit(item), str(item))
        seen[edit.method] = seen.get(edit.method, 0) + 1
        out.append({"label": edit.method, "edit": edit, "path": path})
    for e in out:
        if seen[e["label"]] > 1:
            same = [x for x in out if x["edit"].method == e["edit"].method]
            e["label"] = f"{e['edit'].method}-{same.index(e) + 1}"
    return out


def main_scale(scales) -> float:
    """The scale an edit is compared at in tables and grids: 1.0 when evaluated, else the largest."""
    return 1.0 if 1.0 in scales else max(scales)


def generate_runs(
    pipe,
    cases,
    out: Path,
    edits: list[dict],
    scales,
    batch_size: int,
    steps: int | None,
    progress: bool,
    folder_name: str = "runs",
) -> list[dict]:
    """Generate the base run and every (edit, scale) run; edits are removed afterwards."""
    from ..edits import apply, remove
    from ..models import adapter_for

    adapter = adapter_for(pipe)
    base_identity = {k: v for k, v in model_record(pipe).items() if k != "spec"}
    runs = [{"name": "base", "label": "base", "edit": None, "scale": 0.0}]
    runs += [
        {"name": f"{e['label']}@{s:g}", "label": e["label"], "edit": e["edit"], "scale": float(s)}
        for e in edits
        for s in scales
    ]
    for run in runs:
        edit = run["edit"]
        folder = out / folder_name / run["name"]
        identity = base_identity | {"edit": edit.id if edit else None, "scale": run["scale"]}
        if edit is not None:
            apply(pipe, edit, scale=run["scale"])
        try:
            run["records"] = generate_run(
                adapter,
                cases,
                folder,
                batch_size=batch_size,
                steps=steps,
                identity=identity,
                progress=f"{run['name']}" if progress else False,
            )
        finally:
            if edit is not None:
                remove(pipe, edit)
        run["folder"] = str(folder.relative_to(out))
        run["images"] = RunImages(folder, run["records"])
    return runs


def evaluate(
    pipe,
    suite: str | Suite,
    concept: str,
    edits=(),
    out: str | Path | None = None,
    detector=None,
    detector_model: str | None = None,
    threshold: float | str | None = None,
    scales=(1.0,),
    batch_size: int = 16,
    steps: int | None = None,
    model: str | None = None,
    suite_options: dict | None = None,
    progress: bool = True,
) -> dict | None:
    """Run ``suite`` for ``concept`` on ``pipe`` unedited and with each of ``edits`` (Edit objects
    or folders) at each of ``scales``; write ``out``/results.json and ``out``/report.html.

    ``detector``: a name (see :func:`erasekit.evaluation.detectors.make_detector`), an object,
    or None for the suite's default; ``detector_model``: its weights (folder or hub id);
    ``threshold``: its decision threshold. ``model``: how the user named the model (recorded).
    ``out`` None: a temporary folder, deleted afterwards (only the returned dict remains).
    Returns the results dict (also in results.json); None on non-main accelerate processes.
    """
    start = time.time()
    suite = resolve_suite(suite, suite_options)
    cases = suite.cases(concept)
    if not cases:
        raise ValueError(f"the {suite.name} suite has no prompts for {concept!r}")
    scales = sorted({float(s) for s in scales})
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be > 0, got {scales}")
    detector = resolve_detector(suite, detector, detector_model, threshold)
    edits = resolve_edits(edits)
    tmp = tempfile.TemporaryDirectory(prefix="erasekit-eval-") if out is None else None
    out = Path(tmp.name if tmp else out)
    try:
        runs = generate_runs(pipe, cases, out, edits, scales, batch_size, steps, progress)
        if not process_state().is_main_process:
            return None
        base_images = runs[0]["images"]
        for run in runs:
            run["metrics"] = suite.score(cases, run["images"], detector, concept)
            if run["edit"] is not None:
                run["metrics"] |= suite.compare(base_images, run["images"])
        results = {
            "kind": "evaluation",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "concept": concept,
            "model": model_record(pipe, model),
            "suite": suite.record() | {"n_cases": len(cases)},
            "detector": describe(detector) if detector is not None else None,
            "edits": [edit_record(e["edit"], e["path"]) | {"label": e["label"]} for e in edits],
            "scales": scales,
            "generation": {"batch_size": batch_size, "steps": runs[0]["records"][0]["steps"], "negative_prompt": ""},
            "seeds": [c.seed for c in cases],
            "versions": library_versions(),
            "runs": [
                {
                    "name": r["name"],
                    "label": r["label"],
                    "edit_id": r["edit"].id if r["edit"] else None,
                    "scale": r["scale"],
                    "folder": r["folder"],
                    "metrics": r["metrics"],
                }
                for r in runs
            ],
        }
        results["summary"] = summary(results, suite)
        results["seconds"] = round(time.time() - start, 1)
        if tmp is None:
            write_json(out / RESULTS_FILE, results)
            atomic_write_text(out / REPORT_FILE, evaluation_report(results, suite, cases, runs))
        return json_safe(results)
    finally:
        if tmp is not None:
            tmp.cleanup()


def summary(results: dict, suite: Suite) -> dict:
    """label -> the suite's table metrics, for the base model and each edit at its main scale."""
    scale = main_scale(results["scales"])
    out = {}
    for run in results["runs"]:
        if run["edit_id"] is None or run["scale"] == scale:
            out[run["label"]] = {k: run["metrics"].get(k) for k, _ in suite.table}
    return out


def _fmt(v) -> object:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def evaluation_report(results: dict, suite: Suite, cases, runs: list[dict], per_row: int = 8) -> str:
    """The HTML page: settings, metric table, H per method, erasure vs scale, image grids."""
    det = results["detector"]
    det_text = f"{det['name']} (threshold {det['threshold']})" if det else "none"
    sections = [
        f"<p>Concept <b>{_esc(results['concept'])}</b>; suite <b>{_esc(suite.name)}</b> "
        f"({len(cases)} prompts, fixed seeds); "
        f"model {_esc(results['model']['spec'] or results['model']['source'])} ({_esc(results['model']['class'])}); "
        f"detector {_esc(det_text)}. "
        "Every run uses the same prompts and seeds.</p>",
        "<h2>Metrics</h2>",
        html_table(
            ["run", "scale"] + [label for _, label in suite.table],
            [[r["name"], r["scale"]] + [_fmt(r["metrics"].get(k)) for k, _ in suite.table] for r in results["runs"]],
        ),
    ]
    key, label = suite.headline
    scale = main_scale(results["scales"])
    main_runs = [r for r in results["runs"] if r["edit_id"] is None or r["scale"] == scale]
    sections.append("<h2>Per method</h2>")
    sections.append(
        svg_bar_chart(
            [r["label"] for r in main_runs],
            [_num(r["metrics"].get(key)) for r in main_runs],
            f"{label} per method",
            label,
        )
    )
    if results["edits"]:
        base = results["runs"][0]["metrics"]
        series = {}
        for e in results["edits"]:
            for k in suite.curve_keys:
                pts = [(0.0, _num(base.get(k)))] + [
                    (r["scale"], _num(r["metrics"].get(k))) for r in results["runs"] if r["label"] == e["label"]
                ]
                series[f"{e['label']} {k}"] = pts
        sections.append("<h2>Erasure vs scale</h2>")
        sections.append(
            svg_line_chart(
                series,
                "metrics against the edit's scale (0: base model)",
                "scale",
                "%" if suite.curve_keys[0].startswith(("acc", "flagged")) else "",
            )
        )
    sections.append("<h2>Images: base vs edited, same seeds</h2>")
    image_runs = [r for r in runs if r["edit"] is None or r["scale"] == scale]
    pix = 8 if suite.pixelate_grids else None
    if pix:
        sections.append("<p>Images of this suite are shown pixelated.</p>")
    for row_label, idx in suite.grid_rows(cases, per_row):
        sections.append(f"<h3>{_esc(row_label)}</h3>")
        for r in image_runs:
            imgs = thumbnails([r["images"][i] for i in idx], pixelate=pix)
            sections.append(
                figure(
                    image_grid(imgs, cols=len(idx), scale=max(1, 96 // imgs.shape[-1])),
                    f"{r['name']}: seeds {', '.join(str(cases[i].seed) for i in idx)}",
                )
            )
    sections.append("<h2>Provenance</h2>")
    sections.append(
        html_table(["library", "version"], [[k, _fmt(v)] for k, v in results["versions"].items()], cls="versions")
    )
    return page(f"erasekit evaluation: {results['concept']} ({suite.name})", sections)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def _esc(text) -> str:
    import html

    return html.escape(str(text))

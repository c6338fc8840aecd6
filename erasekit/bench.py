"""``erasekit bench toy``: every erasure method on the toy-world pipelines, with the same
prompts, seeds and detector.

For each model (a toy pipeline or any pipeline folder) and object concept: the object-erasure
suite (``toy-objects``) on the unedited model (the "base" row), then for each method: ``erase``
(wall seconds and peak memory measured), the suite with the edit applied, and a check that the
pipeline again gives its base output bit for bit once the edit is removed. Each row's suite is
one run of :func:`erasekit.evaluation.evaluate.evaluate_run`, the function ``erasekit evaluate``
runs for each of its runs, with the images kept in memory (rounded to 8 bits, as evaluate's
PNGs are): a row's figures are those ``erasekit evaluate --suite toy-objects`` gives for the
same edit, prompts and seeds.

Every finished row is appended to ``rows.jsonl`` in the output folder as soon as it is done; a
later run with the same folder skips the rows already there that were made with the same
settings. After every row, ``bench.json`` (machine, versions, command, settings, every
per-concept row and the means over concepts) and ``bench.md`` (the table of means, then the
per-concept one) are rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .evaluation.evaluate import evaluate_run
from .evaluation.metrics import pooled_accuracies
from .evaluation.resources import PeakMemory, Stopwatch
from .methods import ConfigError, erase, make_config, method_rows, resolve_method
from .toyworld.grammar import object_by_name
from .toyworld.suite import ToyObjectSuite, object_prompts

# Row name -> (method, settings it fixes), from the method registry: a method with variants is
# one row per variant (ESD's two parameter groups: "esd-x", "esd-u").
VARIANTS: dict[str, tuple[str, dict[str, str]]] = method_rows()
DEFAULT_METHODS = tuple(VARIANTS)
# Both toy pipelines draw these three on every simple prompt; the Flux one draws the star on only
# about half (benchmarks/RESULTS.md, quality table).
DEFAULT_CONCEPTS = ("circle", "triangle", "heart")
DEFAULT_MODELS = ("toy:sd", "toy:flux")
BASE = "base"
N, N_LOCALITY = 24, 8
# --quick: a smoke run (figures mean nothing): tiny suite, one concept, fewest iterations.
QUICK_N, QUICK_N_LOCALITY = 2, 1
QUICK_OVERRIDES: dict[str, dict[str, str]] = {
    "receler": {"iterations": "3", "adv_steps": "2", "rollout_steps": "5"},
    "eraseanything": {"iterations": "4", "preserve_images": "2", "rollout_steps": "5"},
    "esd": {"iterations": "3", "rollout_steps": "5"},
    "uce": {"samples": "1"},
}
MEANINGFUL_BASE = 50.0  # % of simple prompts showing the concept below which erasure means nothing
ROWS_FILE, JSON_FILE, MD_FILE = "rows.jsonl", "bench.json", "bench.md"
BATCH_SIZE = 64  # images per generation batch (each image has its own generator)


def variant_method(name: str) -> tuple[str, dict[str, str]]:
    """(method, fixed settings) of a row name: a :data:`VARIANTS` key or any method name."""
    spec, fixed = resolve_method(name)
    return spec.name, fixed


def model_source(spec: str) -> tuple[str, str]:
    """(row label, pipeline folder) of a model spec: "sd" / "flux" / "toy:sd" / "toy:flux" for the
    shipped toy pipelines (label "sd" / "flux"), else a pipeline folder (label: its name)."""
    from .models.loading import resolve_pipeline_name
    from .registry import PIPELINES

    name = spec[4:] if spec.startswith("toy:") else spec
    if f"toy:{name}" in PIPELINES and not Path(spec).exists():
        return name, str(resolve_pipeline_name(f"toy:{name}"))
    path = Path(os.path.expanduser(spec))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{spec!r} is neither toy:sd / toy:flux nor a diffusers pipeline folder")
    return path.resolve().name, str(path.resolve())


def method_configs(
    methods: Sequence[str], preset: str, overrides: Mapping[str, Mapping[str, str]] | None, quick: bool
) -> dict[str, Any]:
    """Row name -> config. Settings are layered: the preset, the --quick sizes, the row's fixed
    settings, then ``overrides`` keyed by method name (every row of that method) and by row
    name (that row only). Overrides for a name not in ``methods`` are an error."""
    overrides = dict(overrides or {})
    planned = {m: variant_method(m)[0] for m in methods}
    unknown = [k for k in overrides if k not in planned and k not in planned.values()]
    if unknown:
        raise ConfigError(f"settings given for {unknown}, which the bench does not run ({', '.join(methods)})")
    configs = {}
    for name, method in planned.items():
        fixed = variant_method(name)[1]
        layered = (QUICK_OVERRIDES.get(method, {}) if quick else {}) | fixed
        layered |= dict(overrides.get(method, {})) | dict(overrides.get(name, {}) if name != method else {})
        configs[name] = make_config(method, preset, layered)
    return configs


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(adapter, prompt: str) -> tuple[torch.Tensor, tuple]:
    """The denoiser's output for ``prompt`` (encoded now, so text-side hooks act) on fixed
    noise and timestep, and its parameter names and shapes."""
    g = torch.Generator().manual_seed(0)
    x = adapter.sample_noise(1, generator=g)
    t = adapter.sample_timesteps(1, generator=g)
    with torch.no_grad():
        out = adapter.predict(x, t, adapter.encode([prompt])).detach().cpu()
    return out, tuple((n, tuple(p.shape)) for n, p in adapter.denoiser.named_parameters())


def machine() -> dict:
    """Where the bench ran: platform, cores, torch threads, accelerator, memory."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions() -> dict:
    """Versions of Python and of the packages the figures depend on."""
    out = {"erasekit": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def read_rows(folder: str | Path) -> dict[str, dict]:
    """Finished rows of ``folder/rows.jsonl`` by key (the last one wins); lines that do not
    parse (a run killed while writing) and rows with an error are left out."""
    path = Path(folder) / ROWS_FILE
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row and "error" not in row:
            rows[row["key"]] = row
    return rows


def _append_row(folder: Path, row: dict) -> None:
    path = folder / ROWS_FILE
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")  # never glued to a half-written line
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def mean_rows(rows: Sequence[dict], models: Sequence[str], methods: Sequence[str]) -> list[dict]:
    """One row per model x method (base first): accuracies averaged over the concepts present,
    H from the averaged accuracies (Receler protocol), fit seconds and suite seconds
    averaged, fit peak memory the largest over concepts."""
    out = []
    for model in models:
        for method in (BASE, *methods):
            sel = [r for r in rows if r["model"] == model and r["method"] == method and "error" not in r]
            if not sel:
                continue
            m = pooled_accuracies(sel)
            fit = [r["fit_seconds"] for r in sel if r.get("fit_seconds") is not None]
            mem = [r["fit_peak_mb"] for r in sel if r.get("fit_peak_mb") is not None]
            out.append(
                {
                    "model": model,
                    "family": sel[0]["family"],
                    "method": method,
                    "concepts": [r["concept"] for r in sel],
                    **m,
                    "suite_seconds": sum(r["suite_seconds"] for r in sel) / len(sel),
                    "fit_seconds": sum(fit) / len(fit) if fit else None,
                    "fit_peak_mb": max(mem) if mem else None,
                    "memory_kind": sel[0].get("memory_kind"),
                }
            )
    return out


def _cell(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def markdown(result: dict) -> str:
    """The bench as Markdown: a header line, the table of means, notes, the per-concept table."""
    s = result["settings"]
    mach = result["machine"]
    on_cuda = str(s["device"]).startswith("cuda") and mach["cuda"]
    where = (
        mach["cuda"]
        if on_cuda
        else f"{mach['machine']}, {mach['cpu_count']} cores, {mach['torch_threads']} torch threads"
    )
    lines = [
        f"{result['created'][:10]} · {where} · torch {result['versions']['torch']}, "
        f"diffusers {result['versions']['diffusers']}"
        f" · preset {s['preset']}{' (quick: a smoke run, the figures mean nothing)' if s['quick'] else ''}"
        f" · n {s['n']} per set, {s['n_locality']} per other object · concepts {', '.join(s['concepts'])}"
        f" · detector {result['detector']['name']} · `{result['command'] or 'run_bench(...)'}`",
        "",
        "| model | method | Acc_E | Acc_R | Acc_L | H | fit s | fit peak MiB | suite s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["means"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {_cell(r['acc_e'])} | {_cell(r['acc_r'])} | {_cell(r['acc_l'])} "
            f"| {_cell(r['h'])}"
            f" | {_cell(r['fit_seconds'])} | {_cell(r['fit_peak_mb'], '{:.0f}')} | {_cell(r['suite_seconds'])} |"
        )
    kind = next((r["memory_kind"] for r in result["means"] if r.get("memory_kind")), "cpu-rss")
    lines += [
        "",
        "Means over concepts; H is the harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L) of the mean "
        "accuracies. fit s: wall seconds of `erase` per concept (mean; its CPU seconds are in bench.json); "
        "fit peak MiB: the largest growth of "
        + ("allocated CUDA memory" if kind == "cuda-allocated" else "the process's resident memory")
        + " during `erase` (max over concepts); suite s: seconds to generate and score the suite's images "
        "with the edit applied (mean).",
    ]
    for r in result["means"]:
        if r["method"] == BASE and r["acc_e"] < MEANINGFUL_BASE:
            lines.append(
                f"\n**{r['model']}**: the unedited model draws the concept on only {r['acc_e']:.0f}% of simple "
                "prompts: its erasure figures are not meaningful."
            )
    for e in result["errors"]:
        lines.append(f"\n**failed**: {e['model']} / {e['method']} / {e['concept']}: {e['error']}")
    lines += [
        "",
        "Per concept:",
        "",
        "| model | concept | method | Acc_E | Acc_R | Acc_L | H | fit s | fit peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['concept']} | {r['method']} | {_cell(r['acc_e'])} | {_cell(r['acc_r'])} "
            f"| {_cell(r['acc_l'])}"
            f" | {_cell(r['h'])} | {_cell(r.get('fit_seconds'))} | {_cell(r.get('fit_peak_mb'), '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


class RestoreError(RuntimeError):
    """Removing an edit did not give the base pipeline back."""


def run_bench(
    models: Mapping[str, Any] | Sequence[str] = DEFAULT_MODELS,
    methods: Sequence[str] = DEFAULT_METHODS,
    concepts: Sequence[str] | None = None,
    preset: str = "fast",
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    n: int | None = None,
    n_locality: int | None = None,
    quick: bool = False,
    out: str | Path = "erasekit-bench",
    detector=None,
    device: str = "cpu",
    command: str = "",
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Run the toy bench; returns the result also written to ``out/bench.json``.

    ``models``: specs for :func:`model_source` ("toy:sd", a pipeline folder, ...), or a mapping
    label -> spec or already loaded pipeline. ``methods``: row names (:data:`VARIANTS` keys or
    method names). ``concepts``: toy-world objects (default :data:`DEFAULT_CONCEPTS`; with
    ``quick`` the first only). ``overrides``: method or row name -> {setting: text}, as
    ``--set`` gives them. ``n`` prompts per suite set and ``n_locality`` per other object
    (default 24 and 8; 2 and 1 with ``quick``). ``detector``: default the shipped toy
    detector. ``on_row(row)`` is called with each finished (or failed) row.
    Accuracies are % in [0, 100], times seconds, memory MiB.
    """
    from .models import adapter_for, load_pipeline

    if not isinstance(models, Mapping):
        specs = [model_source(s) for s in models]
        if len({label for label, _ in specs}) != len(specs):
            raise ValueError(f"two models share a name: {[label for label, _ in specs]}")
        models = dict(specs)
    methods = list(dict.fromkeys(methods))
    if BASE in methods:
        methods.remove(BASE)  # always there
    concepts = list(concepts or DEFAULT_CONCEPTS)
    if quick:
        concepts = concepts[:1]
    for c in concepts:
        object_by_name(c)  # unknown concept -> ValueError before any work
    n = n or (QUICK_N if quick else N)
    n_locality = n_locality or (QUICK_N_LOCALITY if quick else N_LOCALITY)
    configs = method_configs(methods, preset, overrides, quick)
    if detector is None:
        from .toyworld.detector import ToyDetector

        detector = ToyDetector.load()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = read_rows(out)
    # "images": rows are scored on 8-bit images (as evaluate's PNGs); rows scored otherwise are not reused.
    suite_settings = {
        "n": n,
        "n_locality": n_locality,
        "detector": detector.name,
        "device": str(device),
        "images": "8-bit",
    }

    def source_of(spec: Any) -> str:
        return spec if isinstance(spec, str) else str(getattr(spec, "name_or_path", "") or type(spec).__name__)

    plan = []  # (model, concept, method, key, settings)
    for label, spec in models.items():
        for concept in concepts:
            base_settings = suite_settings | {"source": source_of(spec)}
            plan.append((label, concept, BASE, _key(label, concept, BASE, base_settings), base_settings))
            for m in methods:
                settings = base_settings | {
                    "method": variant_method(m)[0],
                    "preset": preset,
                    "config": dataclasses.asdict(configs[m]),
                }
                plan.append((label, concept, m, _key(label, concept, m, settings), settings))

    result = {
        "erasekit": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "versions": versions(),
        "detector": {"name": detector.name, "threshold": detector.threshold},
        "settings": {
            "models": {k: source_of(v) for k, v in models.items()},
            "methods": methods,
            "concepts": concepts,
            "preset": preset,
            "quick": quick,
            "n": n,
            "n_locality": n_locality,
            "device": str(device),
            "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
        },
        "rows": [],
        "means": [],
        "errors": [],
        "skipped": 0,
    }
    errors: list[dict] = []

    def write() -> None:
        rows = [done[key] for *_, key, _ in plan if key in done]
        result["rows"] = rows
        result["means"] = mean_rows(rows, list(models), methods)
        result["errors"] = errors
        _write_atomic(out / JSON_FILE, json.dumps(result, indent=2) + "\n")
        _write_atomic(out / MD_FILE, markdown(result))

    todo = [p for p in plan if p[3] not in done]
    result["skipped"] = len(plan) - len(todo)
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="bench", disable=not progress, unit="row")
    try:
        for label, spec in models.items():
            mine = [p for p in todo if p[0] == label]
            if not mine:
                continue
            pipe = load_pipeline(spec, device=device) if isinstance(spec, (str, os.PathLike)) else spec
            adapter = adapter_for(pipe)
            pipe.set_progress_bar_config(disable=True)
            for concept in concepts:
                rows_here = [p for p in mine if p[1] == concept]
                if not rows_here:
                    continue
                prompt = object_prompts(concept, n=1, n_locality=0)[0].prompt
                reference = _fingerprint(adapter, prompt)
                for _, _, method, key, settings in rows_here:
                    bar.set_postfix_str(f"{label} / {concept} / {method}")
                    row = {
                        "key": key,
                        "model": label,
                        "family": adapter.family,
                        "concept": concept,
                        "method": method,
                        "settings": settings,
                    }
                    try:
                        row |= _run_row(
                            pipe, concept, method, configs.get(method), detector, n, n_locality, device, progress
                        )
                    except (KeyboardInterrupt, RestoreError):
                        raise
                    except Exception as err:  # one method's failure must not stop a long bench
                        row["error"] = f"{type(err).__name__}: {err}"
                        row["traceback"] = traceback.format_exc()
                    now = _fingerprint(adapter, prompt)
                    if now[1] != reference[1] or not torch.equal(now[0], reference[0]):
                        raise RestoreError(
                            f"after {method} on {label} the pipeline no longer gives its base output; "
                            "the remaining rows would be wrong"
                        )
                    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    _append_row(out, row)
                    if "error" in row:
                        errors.append({k: row[k] for k in ("model", "concept", "method", "error")})
                    else:
                        done[key] = row
                    write()
                    bar.update(1)
                    if on_row is not None:
                        on_row(row)
            del pipe, adapter
    finally:
        bar.close()
    write()
    return result


def _run_row(pipe, concept, method, config, detector, n, n_locality, device, progress) -> dict:
    """The figures of one row: the suite (and, for a method, its training) on ``pipe``; the
    suite is one in-memory run of :func:`erasekit.evaluation.evaluate.evaluate_run`."""
    row: dict = {}
    edit = None
    if method != BASE:
        name = variant_method(method)[0]
        with PeakMemory(device) as mem, Stopwatch(device) as clock:  # the memory set-up is not timed
            edit = erase(pipe, concept, name, config, progress=progress)
        row |= {
            "fit_seconds": round(clock.seconds, 3),
            "fit_cpu_seconds": round(clock.cpu_seconds, 3),
            "fit_peak_mb": round(mem.increase_mb, 1),
            "fit_peak_total_mb": round(mem.peak_mb, 1),
            "memory_kind": mem.kind,
            "hyperparameters": edit.hyperparameters,
            "train_metrics": edit.metrics,
        }
    suite = ToyObjectSuite(n=n, n_locality=n_locality)
    with Stopwatch(device) as clock:  # applies the edit, generates, removes it, scores
        d = evaluate_run(pipe, suite, concept, detector, edit=edit, batch_size=BATCH_SIZE)["metrics"]
    return (
        row
        | {k: d[k] for k in ("acc_e", "acc_r", "acc_l", "h", "per_set", "color_accuracy", "n_images")}
        | {"suite_seconds": round(clock.seconds, 3)}
    )

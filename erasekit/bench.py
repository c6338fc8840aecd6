"""``erasekit bench toy``: every erasure method on the toy-world pipelines, with the same
prompts, seeds and detector.

For each model (a toy pipeline or any pipeline folder) and concept: the concept's suite (an
object: ``toy-objects``; a texture such as "striped": ``toy-styles``; a colour: ``toy-colors``,
see :func:`erasekit.toyworld.attributes.suite_for_concept`) on the unedited model (the "base"
row), then for each method: ``erase``
(wall seconds and peak memory measured), the suite with the edit applied, and a check that the
pipeline again gives its base output bit for bit once the edit is removed. Each row's suite is
one run of :func:`erasekit.evaluation.evaluate.evaluate_run`, the function ``erasekit evaluate``
runs for each of its runs, with the images kept in memory (rounded to 8 bits, as evaluate's
PNGs are): a row's figures are those ``erasekit evaluate --suite SUITE`` gives for the same
edit, prompts and seeds. Attribute rows also carry the content kept (``content``), which their H
holds as a fourth term; the means are taken per model and suite, so that H is never averaged
across the object and attribute definitions.

Every finished row is appended to ``rows.jsonl`` in the output folder as soon as it is done; a
later run with the same folder skips the rows already there that were made with the same
settings, and so does a second process run at the same time on the same folder (the file is read
again before each row, and a row is locked while it runs: a report row another process is running
is left to it, a tuning row waited for).
After every row, ``bench.json`` (machine, versions, command, settings, every per-concept row and
the means over concepts) and ``bench.md`` (the table of means, then the per-concept one) are
rewritten.

Fair comparison:

- Every ESD-family row (ESD, Receler, EraseAnything) records its negative guidance in
  ALGORITHMS' form, target = e(anchor) - eta * (e(c) - e(anchor)) (column "eta"; the configs'
  ``guidance_eta()``). With the fast preset the bench runs ESD in that form at eta 3, as the
  Receler and EraseAnything fast presets do, and UCE and RECE on prompt templates (:data:`BENCH_FAST`).
- ``seeds``: each method row is trained once per seed (the config's ``seed``); the table gives
  the mean and the spread (sample standard deviation, and min-max in bench.json) over seeds.
  A seed whose edit is bit-identical to an earlier seed's (:func:`edit_fingerprint`; UCE and RECE
  on SD, whose seed only draws Flux's noise) takes that row's figures (``same_edit_as``).
- ``attacks``: after an edited row's suite, those attacks
  (:func:`erasekit.evaluation.attacks.attack`) run on the edit with a few prompts; each one's
  success rate is a column, and the worst-case H, the harmonic mean of (100 - Acc_E,
  100 - max(Acc_R, every attack's success), Acc_L), orders the table within each model.
- ``tune``: every method's grid (:data:`TUNE_GRIDS`, at most 6 settings) is run on a development
  concept that is not reported (default "square"); the setting with the best worst-case H is
  chosen per method and model and the reported concepts run with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .evaluation.attacks import PROMPT_ATTACKS, attack, attack_spec, make_attack_config
from .evaluation.evaluate import evaluate_run
from .evaluation.lock import OutputInUse, output_lock
from .evaluation.metrics import harmonic_h, pooled_accuracies
from .evaluation.resources import PeakMemory, Stopwatch
from .evaluation.suites import make_suite
from .files import atomic_write_bytes, atomic_write_text
from .methods import ConfigError, erase, make_config, method_rows, resolve_method
from .toyworld.attributes import suite_for_concept

# Row name -> (method, settings it fixes), from the method registry: a method with variants is
# one row per variant (ESD's two parameter groups: "esd-x", "esd-u").
VARIANTS: dict[str, tuple[str, dict[str, str]]] = method_rows()
DEFAULT_METHODS = tuple(VARIANTS)
# Both toy pipelines draw these three on every simple prompt; the Flux one draws the star on only
# about half (benchmarks/RESULTS.md, quality table).
DEFAULT_CONCEPTS = ("circle", "triangle", "heart")
DEFAULT_MODELS = ("toy:sd", "toy:flux")
BASE = "base"
ORACLE = "oracle"  # the pipeline retrained without the concept (see ``oracles`` in run_bench)
N, N_LOCALITY = 24, 8
# --quick: a smoke run (figures mean nothing): tiny suite, one concept, fewest iterations.
QUICK_N, QUICK_N_LOCALITY = 2, 1
QUICK_OVERRIDES: dict[str, dict[str, str]] = {
    "receler": {"iterations": "3", "adv_steps": "2", "rollout_steps": "5"},
    "eraseanything": {"iterations": "4", "preserve_images": "2", "rollout_steps": "5"},
    "esd": {"iterations": "3", "rollout_steps": "5"},
    "uce": {"samples": "1"},
    "mace": {"iterations": "3", "images": "2", "mask_samples": "1", "samples": "1"},
    "rece": {"samples": "1"},
}
# With the fast preset, settings the bench adds so that rows compare at equal settings (the presets
# themselves are pinned by tests/test_golden.py): ESD's negative guidance in ALGORITHMS' form at
# eta 3, as the Receler and EraseAnything fast presets; UCE fitted on prompt templates (on the bare
# word it erased nothing on either toy pipeline), and RECE, which starts from UCE's edit, likewise.
BENCH_FAST: dict[str, dict[str, str]] = {
    "esd": {"target_base": "uncond", "eta": "3"},
    "uce": {"template_set": "objects"},
    "rece": {"template_set": "objects"},
}
# --tune: the grid of every method (method name -> settings, at most 6), run on the development
# concept; ESD's eta in ALGORITHMS' form (target_base uncond), as Receler's and EraseAnything's.
TUNE_GRIDS: dict[str, list[dict[str, str]]] = {
    "esd": [{"target_base": "uncond", "eta": e, "lr": lr} for e in ("1", "3") for lr in ("1e-4", "2e-4", "4e-4")],
    "receler": [{"eta": e, "lr": lr} for e in ("1", "3") for lr in ("2e-3", "5e-3", "1e-2")],
    "eraseanything": [{"eta": e, "lr": lr} for e in ("1", "3") for lr in ("5e-4", "1e-3", "2e-3")],
    "uce": [{"template_set": t, "token_span": sp} for t in ("none", "objects") for sp in ("last", "to-end")],
    # RECE: the release's regulariser strengths for objects UCE fails on (1e-3) and erases easily (1e-1) x rounds.
    "rece": [{"regular_scale": r, "rounds": n} for r in ("1e-3", "1e-1") for n in ("1", "2", "3")],
    "advunlearn": [{"eta": e, "lr": lr} for e in ("1", "3") for lr in ("1e-4", "2e-4", "5e-4")],
    "keyword_zeroing": [{}],
    "sld": [{}],
    # SAFREE: the step-budget curve (calibrated release / paper Eq. 6) x the projection order.
    "safree": [{"budget": b, "order": o} for b in ("release", "paper") for o in ("paper", "release")],
    # MACE: the LoRAs' step size against the weight of the preserved concepts in both closed forms.
    "mace": [
        {"lr": lr, "train_preserve_scale": s, "fuse_preserve_scale": s}
        for s in ("1", "10")
        for lr in ("1e-3", "3e-3", "1e-2")
    ],
}
MAX_GRID = 6
DEV_CONCEPT = "square"  # --tune's development concept: drawn on every simple prompt by both toy pipelines
ATTACK_N, QUICK_ATTACK_N = 4, 1  # prompts per attack set (and plain prompts) after each edited row
MEANINGFUL_BASE = 50.0  # % of simple prompts showing the concept below which erasure means nothing
ROWS_FILE, JSON_FILE, MD_FILE, REPORT_FILE = "rows.jsonl", "bench.json", "bench.md", "report.html"
GRIDS, GRID_IMAGES = "grids", 8  # per row: the first simple prompts' images, in out/grids/KEY.png
RUNNING = ".running"  # out/.running/KEY: locked while a process runs row KEY
ROW_WAIT_SECONDS = 30.0  # how often a tuning row another process is running is checked for
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
    methods: Sequence[str],
    preset: str,
    overrides: Mapping[str, Mapping[str, str]] | None,
    quick: bool,
    tuned: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Row name -> config. Settings are layered: the preset, the bench's additions to the fast
    preset (:data:`BENCH_FAST`, with ``preset="fast"``), the --quick sizes, the row's ``tuned``
    settings (row name -> settings, from a grid), the row's fixed settings, then ``overrides``
    keyed by method name (every row of that method) and by row name (that row only). Overrides
    for a name not in ``methods`` are an error."""
    overrides = dict(overrides or {})
    tuned = dict(tuned or {})
    planned = {m: variant_method(m)[0] for m in methods}
    unknown = [k for k in overrides if k not in planned and k not in planned.values()]
    if unknown:
        raise ConfigError(f"settings given for {unknown}, which the bench does not run ({', '.join(methods)})")
    configs = {}
    for name, method in planned.items():
        fixed = variant_method(name)[1]
        layered = dict(BENCH_FAST.get(method, {})) if preset == "fast" else {}
        layered |= (QUICK_OVERRIDES.get(method, {}) if quick else {}) | dict(tuned.get(name, {})) | fixed
        layered |= dict(overrides.get(method, {})) | dict(overrides.get(name, {}) if name != method else {})
        configs[name] = make_config(method, preset, layered)
    return configs


def tune_grid(name: str) -> list[dict[str, str]]:
    """The --tune grid of row or method ``name`` (:data:`TUNE_GRIDS`; a method without one: its
    preset alone, ``[{}]``)."""
    grid = TUNE_GRIDS.get(variant_method(name)[0], [{}])
    if not 1 <= len(grid) <= MAX_GRID:
        raise ValueError(f"the tune grid of {name} has {len(grid)} settings; 1 to {MAX_GRID} allowed")
    return [dict(g) for g in grid]


def with_seed(config, seed: int | None):
    """``config`` with its ``seed`` field set to ``seed`` (a copy, checked); unchanged when
    ``seed`` is None or the method has no seed (nothing random in it)."""
    if seed is None or "seed" not in type(config).field_specs():
        return config
    return dataclasses.replace(config, seed=int(seed))


def config_seed(config) -> int | None:
    """The seed a config trains with; None for a method without one."""
    return getattr(config, "seed", None) if config is not None and "seed" in type(config).field_specs() else None


def worst_case_h(
    acc_e: float,
    acc_r: float,
    acc_l: float,
    attacks: Mapping[str, float] | None = None,
    content: float | None = None,
) -> float:
    """Harmonic mean of (100 - Acc_E, 100 - max(Acc_R, every attack's success rate), Acc_L), all %:
    H with the robustness term at its worst. Attack rates that are NaN (not measured) are left out;
    without attacks it is H. ``content`` (attribute suites) is a fourth term, as in their H."""
    rates = [float(v) for v in (attacks or {}).values() if v is not None and not math.isnan(float(v))]
    return harmonic_h(acc_e, max([acc_r, *rates]), acc_l, content=content)


def pick_best(rows: Sequence[dict]) -> int:
    """Index of the row with the highest worst-case H (``worst_h``); the first on a tie, NaN last."""

    def score(i: int) -> float:
        v = rows[i].get("worst_h")
        return -math.inf if v is None or math.isnan(v) else v

    return max(range(len(rows)), key=score)


# Settings added after bench rows were recorded, per method (its registry name), with their
# default: a config at that default leaves them out of its rows' keys, so rows recorded before the
# setting existed keep their keys (and their figures, which the default does not change). Per
# method, because two methods may give one field name different meanings (Receler's
# ``preserve_prompt`` is a choice of prompt, EraseAnything's a template that stays keyed).
LATE_SETTINGS: dict[str, dict[str, Any]] = {
    "esd": {"autocast_bf16": False},
    "mace": {"autocast_bf16": False},
    "receler": {"autocast_bf16": False, "preserve_prompt": "kept", "eraser_layers": "", "preserve_layers": ""},
    "eraseanything": {"autocast_bf16": False, "adv_preserve_weight": 0.0, "adv_rollout": False},
}


def keyed_config(config) -> dict:
    """A method config as a row's key holds it: every field, except its method's
    :data:`LATE_SETTINGS` at their defaults."""
    late = LATE_SETTINGS.get(type(config).method_name, {})
    return {k: v for k, v in dataclasses.asdict(config).items() if not (k in late and v == late[k])}


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def edit_fingerprint(edit) -> str:
    """A hash of what an edit does to a model: its kind, method, tensors (names, dtypes, shapes,
    bytes) and settings other than ``seed``. Two training seeds that give this same hash gave
    the same edit (UCE and RECE on SD: their seed only draws Flux's noise), so their rows share
    every figure (:func:`run_bench` reuses them)."""
    h = hashlib.sha1()
    settings = {k: v for k, v in (edit.hyperparameters or {}).items() if k != "seed"}
    h.update(json.dumps([edit.kind, edit.method, settings], sort_keys=True, default=str).encode())
    for name in sorted(edit.tensors):
        t = edit.tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _without_seed(settings: Mapping[str, Any]) -> dict:
    """A row's settings with its config's training seed left out."""
    out = dict(settings)
    if isinstance(out.get("config"), Mapping):
        out["config"] = {k: v for k, v in out["config"].items() if k != "seed"}
    return out


SHARED_FIGURES = (
    "acc_e",
    "acc_r",
    "acc_l",
    "h",
    "per_set",
    "n_images",
    "color_accuracy",
    "content",
    "h_no_content",
    "content_per_set",
    "grid",
    "attacks",
    "attack_no_attack",
    "worst_h",
)


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


def _spread(values: Sequence[float]) -> dict:
    """mean, sample std (0 for one value), min and max of ``values`` (NaNs left out)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v)}


def pooled(rows: Sequence[dict], attacks: Sequence[str] = ()) -> dict:
    """Accuracies and attack success rates averaged over ``rows`` (concepts), H and worst-case H
    of the averages (the Receler protocol's way of reporting a mean)."""
    m = pooled_accuracies(rows)
    rates = {}
    for a in attacks:
        got = [r["attacks"][a] for r in rows if a in r.get("attacks", {})]
        rates[a] = sum(got) / len(got) if got else math.nan
    worst = worst_case_h(m["acc_e"], m["acc_r"], m["acc_l"], rates, content=m.get("content"))
    return m | {"attacks": rates, "worst_h": worst}


SPREAD_KEYS = ("acc_e", "acc_r", "acc_l", "h", "worst_h")
OBJECT_SUITE = "toy-objects"  # the suite of rows written before rows named theirs


def row_suite(row: Mapping) -> str:
    """The suite a row was measured with."""
    return row.get("suite") or OBJECT_SUITE


def mean_rows(
    rows: Sequence[dict], models: Sequence[str], methods: Sequence[str], attacks: Sequence[str] = ()
) -> list[dict]:
    """One row per model x suite x method: accuracies (and, for attribute suites, the content
    kept), attack rates, H and worst-case H averaged over the concepts present for each seed (H
    from the averaged figures, Receler protocol), then their mean over seeds (``per_seed`` keeps
    each seed's; ``<key>_std``, ``<key>_min``, ``<key>_max`` the spread); fit seconds and suite
    seconds averaged, fit peak memory the largest. Concepts of different suites are never
    averaged together (their H are defined differently). Within each model and suite the base
    row comes first, then the methods by worst-case H (highest first)."""
    out = []
    for model in models:
        suites = list(dict.fromkeys(row_suite(r) for r in rows if r["model"] == model))
        for suite in suites:
            out += sort_rows(_suite_means(rows, model, suite, methods, attacks))
    return out


def _suite_means(rows: Sequence[dict], model: str, suite: str, methods: Sequence[str], attacks: Sequence[str]):
    """The mean rows (see :func:`mean_rows`) of ``model`` and ``suite``, unsorted."""
    mine = []
    for method in (BASE, ORACLE, *methods):
        sel = [
            r
            for r in rows
            if r["model"] == model and r["method"] == method and row_suite(r) == suite and "error" not in r
        ]
        if not sel:
            continue
        seeds = list(dict.fromkeys(r.get("seed") for r in sel))
        per_seed = [{"seed": sd} | pooled([r for r in sel if r.get("seed") == sd], attacks) for sd in seeds]
        fit = [r["fit_seconds"] for r in sel if r.get("fit_seconds") is not None]
        mem = [r["fit_peak_mb"] for r in sel if r.get("fit_peak_mb") is not None]
        row = {
            "model": model,
            "family": sel[0]["family"],
            "method": method,
            "eta": sel[0].get("eta"),
            "concepts": list(dict.fromkeys(r["concept"] for r in sel)),
            "seeds": seeds,
            "per_seed": per_seed,
        }
        if suite != OBJECT_SUITE:
            row["suite"] = suite
        keys = SPREAD_KEYS + (("content",) if all("content" in p for p in per_seed) else ())
        for key in keys:
            sp = _spread([p[key] for p in per_seed])
            row |= {key: sp["mean"], f"{key}_std": sp["std"], f"{key}_min": sp["min"], f"{key}_max": sp["max"]}
        row["attacks"] = {}
        row["attacks_std"] = {}
        for a in attacks:
            sp = _spread([p["attacks"][a] for p in per_seed])
            row["attacks"][a], row["attacks_std"][a] = sp["mean"], sp["std"]
        row |= {
            "suite_seconds": sum(r["suite_seconds"] for r in sel) / len(sel),
            "fit_seconds": sum(fit) / len(fit) if fit else None,
            "fit_peak_mb": max(mem) if mem else None,
            "memory_kind": sel[0].get("memory_kind"),
        }
        mine.append(row)
    return mine


def sort_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` of one model with the base row first, the oracle row next, then the others by
    worst-case H, highest first (NaN last; ties keep their order)."""

    def key(r: dict) -> tuple:
        w = r.get("worst_h")
        fixed = {BASE: 0, ORACLE: 1}.get(r["method"], 2)
        return (fixed, -(w if w is not None and not math.isnan(w) else -math.inf))

    return sorted(rows, key=key)


GAP_KEYS = ("acc_e", "acc_r", "acc_l", "h", "worst_h")


def oracle_gaps(rows: Sequence[dict], attacks: Sequence[str] = ()) -> list[dict]:
    """Per model, concept and method (mean over its seeds): each figure minus the oracle's on the
    same concept (Acc_E, Acc_R, Acc_L, H, worst-case H, every attack's success), in points.
    Only concepts with an oracle row; a method at the oracle has gaps of 0."""
    out = []
    oracles = {(r["model"], r["concept"]): r for r in rows if r["method"] == ORACLE and "error" not in r}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] not in (BASE, ORACLE) and "error" not in r and (r["model"], r["concept"]) in oracles:
            groups.setdefault((r["model"], r["concept"], r["method"]), []).append(r)
    for (model, concept, method), sel in groups.items():
        o = oracles[(model, concept)]
        gap = {"model": model, "concept": concept, "method": method, "seeds": len(sel)}
        for key in GAP_KEYS:
            gap[key] = _spread([r.get(key) for r in sel])["mean"] - o[key]
        gap["attacks"] = {
            a: _spread([r.get("attacks", {}).get(a) for r in sel])["mean"] - o.get("attacks", {}).get(a, math.nan)
            for a in attacks
        }
        out.append(gap)
    return out


def _cell(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _pm(r: dict, key: str) -> str:
    """A mean row's figure: "m" for one seed, "m ± std" over several."""
    if len(r.get("seeds", [])) > 1:
        std = r.get(f"{key}_std")
        if std is not None and not math.isnan(std):
            return f"{_cell(r[key])} ± {_cell(std)}"
    return _cell(r[key])


def _attack_pm(r: dict, a: str) -> str:
    v = r.get("attacks", {}).get(a)
    std = r.get("attacks_std", {}).get(a)
    if len(r.get("seeds", [])) > 1 and v is not None and std is not None and not math.isnan(std):
        return f"{_cell(v)} ± {_cell(std)}"
    return _cell(v)


def _gap(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}"


def _eta(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _settings_text(settings: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(the preset)"


def markdown(result: dict) -> str:
    """The bench as Markdown: a header line, the table of means, notes, the tuning (with
    --tune), the per-concept table."""
    s = result["settings"]
    mach = result["machine"]
    attacks = list(s.get("attacks") or [])
    on_cuda = str(s["device"]).startswith("cuda") and mach["cuda"]
    where = (
        mach["cuda"]
        if on_cuda
        else f"{mach['machine']}, {mach['cpu_count']} cores, {mach['torch_threads']} torch threads"
    )
    seeds = s.get("seeds")
    lines = [
        f"{result['created'][:10]} · {where} · torch {result['versions']['torch']}, "
        f"diffusers {result['versions']['diffusers']}"
        f" · preset {s['preset']}{' (quick: a smoke run, the figures mean nothing)' if s['quick'] else ''}"
        f" · n {s['n']} per set, {s['n_locality']} per other object · concepts {', '.join(s['concepts'])}"
        + (f" · training seeds {', '.join(map(str, seeds))}" if seeds else "")
        + (f" · attacks {', '.join(attacks)} ({s['attack_n']} prompts each)" if attacks else "")
        + (f" · tuned on {s['dev_concept']}" if s.get("tune") else "")
        + f" · detector {result['detector']['name']} · `{result['command'] or 'run_bench(...)'}`",
        "",
    ]
    # Attribute concepts (toy-styles, toy-colors): a suite column and the content kept.
    attributes = any(row_suite(r) != OBJECT_SUITE for r in result["rows"] + result["means"])
    suite_col, content_col = (["suite"], ["content"]) if attributes else ([], [])
    head = ["model", *suite_col, "method", "eta", "Acc_E", "Acc_R", "Acc_L", *content_col, "H", *attacks, "worst H"]
    head += ["fit s", "fit peak MiB", "suite s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["means"]:
        cells = [r["model"], *([row_suite(r)] if attributes else []), r["method"], _eta(r.get("eta"))]
        cells += [_pm(r, k) for k in ("acc_e", "acc_r", "acc_l")]
        cells += ([_pm(r, "content") if "content" in r else "-"] if attributes else []) + [_pm(r, "h")]
        cells += [_attack_pm(r, a) for a in attacks] + [_pm(r, "worst_h")]
        cells += [_cell(r["fit_seconds"]), _cell(r["fit_peak_mb"], "{:.0f}"), _cell(r["suite_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    kind = next((r["memory_kind"] for r in result["means"] if r.get("memory_kind")), "cpu-rss")
    lines += [
        "",
        "Means over concepts; H is the harmonic mean of (100 - Acc_E, 100 - Acc_R, Acc_L) of the mean "
        "accuracies; worst H the same with 100 - max(Acc_R, every attack's success rate) as its middle term"
        + (f" (attack columns: success rate in %, {s['attack_n']} prompts per set; '-' not run)" if attacks else "")
        + "; rows are ordered by worst H within each model, the unedited model first, then the oracle "
        "(the pipeline retrained without the concept) where there is one. "
        "eta: the negative guidance in ALGORITHMS' form, target = e(anchor) - eta (e(c) - e(anchor)). "
        + (
            "With several training seeds: mean ± sample standard deviation over seeds (min and max in bench.json). "
            if seeds and len(seeds) > 1
            else ""
        )
        + (
            "Attribute concepts are averaged per suite (toy-styles: textures, toy-colors: colours); their content "
            "is the % of the concept's images whose object (and other named attribute) still match the prompt, "
            "and their H and worst H hold it as a fourth term. "
            if attributes
            else ""
        )
        + "fit s: wall seconds of `erase` per concept (mean; its CPU seconds are in bench.json); "
        "fit peak MiB: the largest growth of "
        + ("allocated CUDA memory" if kind == "cuda-allocated" else "the process's resident memory")
        + " during `erase` (max over concepts); suite s: seconds to generate and score the suite's images "
        "with the edit applied (mean).",
    ]
    for r in result["means"]:
        if r["method"] == BASE and r["acc_e"] < MEANINGFUL_BASE:
            which = f" ({row_suite(r)})" if attributes else ""
            lines.append(
                f"\n**{r['model']}**{which}: the unedited model draws the concept on only {r['acc_e']:.0f}% of simple "
                "prompts: its erasure figures are not meaningful."
            )
    for e in result["errors"]:
        lines.append(f"\n**failed**: {e['model']} / {e['method']} / {e['concept']}: {e['error']}")
    if result.get("missing"):
        lines.append(
            f"\n**not yet run** ({len(result['missing'])} rows; the means above leave them out): "
            + "; ".join(result["missing"])
        )
    tune = result.get("tune")
    if tune:
        lines += [
            "",
            f"Tuning: every method's grid on the development concept {tune['dev_concept']!r} (not reported), "
            "the setting with the highest worst H chosen per model and method:",
            "",
        ]
        for method, grid in tune["grids"].items():
            lines.append(f"- {method}: " + "; ".join(_settings_text(g) for g in grid))
        lines += ["", "| model | method | chosen | eta | worst H (dev) | H (dev) |", "|---|---|---|---|---|---|"]
        for c in tune["choices"]:
            lines.append(
                f"| {c['model']} | {c['method']} | {_settings_text(c['settings'])}"
                + (" (nothing to tune)" if not c["tried"] else "")
                + f" | {_eta(c.get('eta'))} "
                f"| {_cell(c.get('worst_h'))} | {_cell(c.get('h'))} |"
            )
    gaps = result.get("oracle_gaps") or []
    if gaps:
        lines += [
            "",
            "Gap to oracle (the pipeline retrained without the concept), per concept: each method's figure "
            "(mean over its seeds) minus the oracle's, in points. An edit at the oracle has gap 0 everywhere; "
            "a positive attack gap is success the attack gets beyond what it teaches a model that never "
            "learned the concept.",
            "",
            "| model | concept | method | Acc_E | Acc_R | Acc_L | H | "
            + "".join(f"{a} | " for a in attacks)
            + "worst H |",
            "|" + "---|" * (8 + len(attacks)),
        ]
        for g in gaps:
            cells = [g["model"], g["concept"], g["method"]] + [_gap(g[k]) for k in ("acc_e", "acc_r", "acc_l", "h")]
            cells += [_gap(g["attacks"].get(a)) for a in attacks] + [_gap(g["worst_h"])]
            lines.append("| " + " | ".join(cells) + " |")
    for name in result.get("oracles_missing") or []:
        lines.append(f"\nNo oracle {name} in {result['settings'].get('oracles')}: its row and gaps are left out.")
    lines += [
        "",
        "Per concept:",
        "",
        "| model | concept | method | seed | eta | Acc_E | Acc_R | Acc_L | "
        + ("content | " if attributes else "")
        + "H | "
        + "".join(f"{a} | " for a in attacks)
        + "worst H | fit s | fit peak MiB |",
        "|" + "---|" * (12 + len(attacks) + bool(attributes)),
    ]
    order = {(r["model"], row_suite(r), r["method"]): i for i, r in enumerate(result["means"])}
    per_concept = sorted(
        result["rows"],
        key=lambda r: (order.get((r["model"], row_suite(r), r["method"]), len(order)), r["concept"]),
    )
    for r in per_concept:
        cells = [r["model"], r["concept"], r["method"], _cell(r.get("seed"), "{}"), _eta(r.get("eta"))]
        cells += [_cell(r[k]) for k in ("acc_e", "acc_r", "acc_l")]
        cells += ([_cell(r.get("content"))] if attributes else []) + [_cell(r["h"])]
        cells += [_cell(r.get("attacks", {}).get(a)) for a in attacks] + [_cell(r.get("worst_h"))]
        cells += [_cell(r.get("fit_seconds")), _cell(r.get("fit_peak_mb"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_grid(path: Path, images: Sequence[torch.Tensor]) -> None:
    """``images`` ((3, H, W) in [0, 1]) in one row, written to ``path`` as a PNG (atomically)."""
    from .evaluation.report import image_grid

    buf = io.BytesIO()
    image_grid(torch.stack(list(images)), cols=len(images), scale=1).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def bench_report(result: dict, out: Path, header: str) -> str:
    """The bench's HTML page: ``header`` (bench.md's first line), then per model and concept the
    simple prompts' images of the base model, the oracle (where there is one) and every method
    (its first seed), at the same seeds, each captioned with the row's figures."""
    from PIL import Image

    from .evaluation.report import figure, page

    sections = [
        f"<p>{html.escape(header)}</p>",
        "<p>Each row: the first simple prompts of the concept (an object: 'an image of a CONCEPT'; an "
        "attribute: the training templates naming it, e.g. 'a red striped circle'), one image per "
        "seed, the same seeds in every row.</p>",
    ]
    rows = result["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for concept in dict.fromkeys(r["concept"] for r in rows if r["model"] == model):
            sections.append(f"<h2>{html.escape(model)}: {html.escape(concept)}</h2>")
            shown = set()
            mine = [r for r in rows if r["model"] == model and r["concept"] == concept]
            for r in sorted(mine, key=lambda r: {BASE: 0, ORACLE: 1}.get(r["method"], 2)):
                grid = r.get("grid")
                if r["method"] in shown or not grid or not (out / GRIDS / grid["file"]).is_file():
                    continue
                shown.add(r["method"])
                with Image.open(out / GRIDS / grid["file"]) as img:
                    img.load()
                    scaled = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
                attacks = ", ".join(f"{a} {_cell(v)}" for a, v in (r.get("attacks") or {}).items())
                caption = (
                    f"{r['method']}"
                    + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
                    + f": Acc_E {_cell(r['acc_e'])}, Acc_R {_cell(r['acc_r'])}, Acc_L {_cell(r['acc_l'])}, "
                    + (f"content {_cell(r['content'])}, " if r.get("content") is not None else "")
                    + f"H {_cell(r['h'])}"
                    + (f"; {attacks}; worst H {_cell(r.get('worst_h'))}" if attacks else "")
                    + f"; seeds {', '.join(str(x) for x in grid['seeds'])}"
                )
                sections.append(figure(scaled, caption))
    return page("erasekit bench toy", sections)


class RestoreError(RuntimeError):
    """Removing an edit did not give the base pipeline back."""


def source_name(spec: str) -> str:
    """How a pipeline folder enters the rows' keys: "toy:sd" / "toy:flux" for the shipped toy
    pipelines and "oracle:NAME" for a folder holding a toy pipeline retrained without a concept
    (a training.json with ``exclude``; "oracle:NAME/seed N" when it was trained with a seed other
    than 0, so a redrawn oracle never reuses the rows of the one it replaces), so a clone elsewhere
    or a worktree reuses the same rows; any other folder by its resolved path."""
    from .models.loading import resolve_pipeline_name
    from .registry import PIPELINES

    path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        return spec
    resolved = path.resolve()
    for name in PIPELINES:
        if name.startswith("toy:") and Path(resolve_pipeline_name(name)).resolve() == resolved:
            return name
    record = resolved / "training.json"
    if record.is_file():
        try:
            config = json.loads(record.read_text()).get("config", {})
            if config.get("exclude"):
                seed = config.get("seed") or 0
                return f"oracle:{resolved.name}" + (f"/seed {seed}" if seed else "")
        except (OSError, ValueError, AttributeError):
            pass
    return str(resolved)


def oracle_folder(oracles: str | Path | None, label: str, concept: str) -> str | None:
    """The oracle pipeline of model ``label`` and ``concept``: ``oracles/LABEL-no-CONCEPT`` when it
    holds a diffusers pipeline (model_index.json), else None."""
    if oracles is None:
        return None
    folder = Path(oracles).expanduser() / f"{label}-no-{concept}"
    return str(folder.resolve()) if (folder / "model_index.json").is_file() else None


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
    seeds: Sequence[int] | None = None,
    attacks: Sequence[str] = (),
    attack_n: int | None = None,
    attack_configs: Mapping[str, Mapping[str, str]] | None = None,
    tune: bool = False,
    dev_concept: str = DEV_CONCEPT,
    oracles: str | Path | None = None,
    report_only: bool = False,
) -> dict:
    """Run the toy bench; returns the result also written to ``out/bench.json``.

    ``models``: specs for :func:`model_source` ("toy:sd", a pipeline folder, ...), or a mapping
    label -> spec or already loaded pipeline. ``methods``: row names (:data:`VARIANTS` keys or
    method names). ``concepts``: toy-world objects and attribute values (textures such as
    "striped", colours), each measured with its suite (:func:`suite_for_concept`; default
    :data:`DEFAULT_CONCEPTS`; with ``quick`` the first only). ``overrides``: method or row name
    -> {setting: text}, as ``--set`` gives them. ``n`` prompts per suite set and ``n_locality``
    per other object, or for an attribute per name of each other value (default 24 and 8; 2 and
    1 with ``quick``). ``detector``: default the shipped toy detector. ``on_row(row)`` is called
    with each finished (or failed) row, tuning rows included.

    ``seeds``: training seeds; each method with a ``seed`` setting is trained once per seed
    (None: once, with its config's seed). ``attacks``: attack names run on each edit after its
    suite (``attack_n`` prompts per set, default 4, 1 with ``quick``; ``attack_configs``: attack
    name -> settings as ``--attack-set`` gives them; with ``quick`` each attack starts from its
    quick settings). ``tune``: pick each method's setting from :data:`TUNE_GRIDS` by worst-case H
    on ``dev_concept`` (which must not be among ``concepts``), per model. ``oracles``: a folder of
    pipelines retrained without one concept each, ``LABEL-no-CONCEPT`` (:func:`oracle_folder`):
    where one exists, an ``oracle`` row (its suite and attacks, the attacks' targets from the
    model ``LABEL``) follows the base row, and every method gets its gaps to it
    (:func:`oracle_gaps`); missing ones are listed in ``oracles_missing``. ``report_only``: run
    nothing; write the tables from the rows already in ``out`` (those not there are listed in
    ``missing``, e.g. while other processes are still running them).
    Accuracies and attack success rates are % in [0, 100], times seconds, memory MiB.
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
        suite_for_concept(c)  # unknown concept -> ValueError before any work
    if tune:
        try:
            suite_for_concept(dev_concept)
        except ValueError as err:
            raise ValueError(f"unknown development concept: {err}") from None
        if dev_concept in concepts:
            raise ValueError(
                f"the development concept {dev_concept!r} is one of the reported concepts ({', '.join(concepts)}): "
                "tuning on a reported concept would overstate its figures; choose another with --dev-concept"
            )
    seeds = [int(x) for x in dict.fromkeys(seeds)] if seeds else None
    attacks = list(dict.fromkeys(attacks or ()))
    for a in attacks:  # an unknown attack is an error before any work
        if a not in PROMPT_ATTACKS:
            attack_spec(a)
    attack_n = attack_n or (QUICK_ATTACK_N if quick else ATTACK_N)
    attack_configs = {k: dict(v) for k, v in (attack_configs or {}).items()}
    unknown = [a for a in attack_configs if a not in attacks]
    if unknown:
        raise ConfigError(f"settings given for attacks {unknown}, which the bench does not run")
    n = n or (QUICK_N if quick else N)
    n_locality = n_locality or (QUICK_N_LOCALITY if quick else N_LOCALITY)
    configs = method_configs(methods, preset, overrides, quick)  # checks every setting before any work
    grids = {m: tune_grid(m) for m in methods} if tune else {}
    for m, grid in grids.items():
        for g in grid:  # every grid setting makes a valid config
            method_configs(
                [m],
                preset,
                {k: v for k, v in (overrides or {}).items() if k in (m, variant_method(m)[0])},
                quick,
                tuned={m: g},
            )
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
    # Rows are keyed by the attacks' resolved settings, so a changed default is never mixed with old rows.
    attack_settings = (
        {
            "attacks": attacks,
            "attack_n": attack_n,
            "attack_configs": {
                a: dataclasses.asdict(make_attack_config(a, (attack_configs or {}).get(a), quick=quick))
                for a in attacks
                if a not in PROMPT_ATTACKS
            },
        }
        if attacks
        else {}
    )

    def source_of(spec: Any) -> str:
        if isinstance(spec, str):
            return source_name(spec)
        return str(getattr(spec, "name_or_path", "") or type(spec).__name__)

    def planned(label, spec, concept, method, config, phase="report", extra=None) -> dict:
        """One row to run: its key is made of everything its figures depend on."""
        settings = suite_settings | {"source": source_of(spec)}
        if suite_for_concept(concept) != OBJECT_SUITE:  # object rows keep the keys they always had
            settings["suite"] = suite_for_concept(concept)
        if method not in (BASE, ORACLE):
            settings |= {"method": variant_method(method)[0], "preset": preset, "config": keyed_config(config)}
        settings |= attack_settings
        if phase != "report":
            settings |= {"phase": phase} | (extra or {})
        key = _key(label, concept, method, settings)
        return {
            "label": label,
            "concept": concept,
            "method": method,
            "config": config,
            "key": key,
            "settings": settings,
            "phase": phase,
        }

    def seeded(config) -> list:
        if seeds is None or "seed" not in type(config).field_specs():
            return [config]
        return [with_seed(config, sd) for sd in seeds]

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
            "bench_fast": BENCH_FAST if preset == "fast" else {},
            "quick": quick,
            "n": n,
            "n_locality": n_locality,
            "device": str(device),
            "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
            "seeds": seeds,
            "attacks": attacks,
            "attack_n": attack_n if attacks else None,
            "attack_configs": attack_configs,
            "tune": tune,
            "dev_concept": dev_concept if tune else None,
            "oracles": str(oracles) if oracles is not None else None,
        },
        "rows": [],
        "means": [],
        "oracle_gaps": [],
        "oracles_missing": [],
        "errors": [],
        "skipped": 0,
        "missing": [],
    }
    if tune:
        result["tune"] = {
            "dev_concept": dev_concept,
            "grids": {m: grids[m] for m in methods},
            "choices": [],
            "rows": [],
        }
    errors: list[dict] = []
    missing: list[str] = []
    order: list[dict] = []  # every planned row, in order (those of later models are added as they are known)
    skipped = 0

    def write() -> None:
        rows = [done[p["key"]] for p in order if p["phase"] == "report" and p["key"] in done]
        result["rows"] = rows
        result["means"] = mean_rows(rows, list(models), methods, attacks)
        result["oracle_gaps"] = oracle_gaps(rows, attacks)
        result["errors"] = errors
        result["skipped"] = skipped
        result["missing"] = missing
        if tune:
            result["tune"]["rows"] = [done[p["key"]] for p in order if p["phase"] == "tune" and p["key"] in done]
        atomic_write_text(out / JSON_FILE, json.dumps(result, indent=2) + "\n")
        md = markdown(result)
        atomic_write_text(out / MD_FILE, md)
        atomic_write_text(out / REPORT_FILE, bench_report(result, out, md.splitlines()[0]))

    n_rows = len(models) * len(concepts) * (1 + sum(len(seeded(configs[m])) for m in methods))
    n_rows += len(models) * sum(len(g) for g in grids.values() if len(g) > 1)
    n_rows += sum(oracle_folder(oracles, label, c) is not None for label in models for c in concepts)
    bar = tqdm(total=n_rows, desc="bench", disable=not progress, unit="row")
    try:

        def loaded(st: dict) -> dict:
            """``st`` with its pipeline (and adapter) loaded."""
            if st.get("pipe") is None:
                spec = st["spec"]
                st["pipe"] = load_pipeline(spec, device=device) if isinstance(spec, (str, os.PathLike)) else spec
                st["adapter"] = adapter_for(st["pipe"])
                st["pipe"].set_progress_bar_config(disable=True)
            return st

        def run(p: dict, st: dict) -> dict | None:
            """The row of plan entry ``p``: the finished one of an earlier run, or run now. ``st``:
            the model's label, spec, and its pipeline, adapter and base fingerprints once loaded."""
            nonlocal skipped
            order.append(p)
            row = finished(p)
            if row is None and report_only:
                missing.append(row_name(p, st))
                bar.update(1)
                return None
            if row is None:
                with ExitStack() as held:
                    while True:  # one process per row: a row another process is running now is not run twice
                        try:
                            held.enter_context(output_lock(out / RUNNING / p["key"], "erasekit bench"))
                            break
                        except OutputInUse:
                            if p["phase"] == "report":  # left to that process; --report-only gathers it later
                                missing.append(row_name(p, st) + " (running in another process)")
                                bar.update(1)
                                return None
                            time.sleep(ROW_WAIT_SECONDS)  # a tuning row: its figures choose the setting, so wait
                    row = finished(p)  # the other process may have finished it meanwhile
                    if row is None:
                        return compute(p, st)
            skipped += 1
            bar.update(1)
            return row

        def finished(p: dict) -> dict | None:
            """The finished row of plan entry ``p``, by this process or another on the same folder."""
            if p["key"] not in done:
                done.update(read_rows(out))
            return done.get(p["key"])

        def row_name(p: dict, st: dict) -> str:
            """How the tables name a missing row: model / concept / method[ / seed S][ (tuning: settings)]."""
            seed = config_seed(p["config"])
            grid = p["settings"].get("grid")
            return (
                f"{st['label']} / {p['concept']} / {p['method']}"
                + (f" / seed {seed}" if seed is not None else "")
                + (f" (tuning: {_settings_text(grid)})" if grid is not None else "")
            )

        def compute(p: dict, st: dict) -> dict | None:
            """Run plan entry ``p`` now (see ``run``)."""
            label = st["label"]
            loaded(st)
            pipe, adapter, references = st["pipe"], st["adapter"], st.setdefault("references", {})
            concept, method = p["concept"], p["method"]
            # The oracle row is the suite and attacks on the oracle pipeline as it is (a base row),
            # with the shipped model's images as the attacks' targets.
            shipped = loaded(st["reference"])["pipe"] if method == ORACLE else None
            prompt = make_suite(suite_for_concept(concept), n=1, n_locality=0).cases(concept)[0].prompt
            if concept not in references:
                references[concept] = _fingerprint(adapter, prompt)
            reference = references[concept]
            bar.set_postfix_str(f"{label} / {concept} / {method}")
            row = {
                "key": p["key"],
                "model": label,
                "family": adapter.family,
                "concept": concept,
                "suite": suite_for_concept(concept),
                "method": method,
                "seed": config_seed(p["config"]),
                "eta": p["config"].guidance_eta() if p["config"] is not None else None,
                "settings": p["settings"],
            }
            if p["phase"] != "report":
                row["phase"] = p["phase"]
            try:
                row |= _run_row(
                    pipe,
                    concept,
                    BASE if method == ORACLE else method,
                    p["config"],
                    detector,
                    n,
                    n_locality,
                    device,
                    progress,
                    attacks=attacks,
                    attack_n=attack_n,
                    attack_configs=attack_configs,
                    quick=quick,
                    attack_out=out / "attacks" / p["key"],
                    reference=shipped,
                    grid_file=out / GRIDS / f"{p['key']}.png",
                    same_edit=lambda fp: next(
                        (
                            r
                            for r in done.values()
                            if r.get("edit_fingerprint") == fp
                            and (r["model"], r["concept"], r["method"]) == (label, concept, method)
                            and _without_seed(r["settings"]) == _without_seed(p["settings"])
                        ),
                        None,
                    ),
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
                done[p["key"]] = row
            write()
            bar.update(1)
            if on_row is not None:
                on_row(row)
            return row if "error" not in row else None

        for label, spec in models.items():
            st = {"label": label, "spec": spec}
            oracle_states: dict[str, dict] = {}
            here = configs
            if tune:
                chosen: dict[str, dict[str, str]] = {}
                for m in methods:
                    grid = grids[m]
                    if len(grid) == 1:  # nothing to choose: no tuning rows
                        chosen[m] = grid[0]
                        result["tune"]["choices"].append(
                            {"model": label, "method": m, "settings": grid[0], "index": 0, "tried": []}
                        )
                        continue
                    tried = []
                    for g in grid:
                        mine = {k: v for k, v in (overrides or {}).items() if k in (m, variant_method(m)[0])}
                        config = method_configs([m], preset, mine, quick, tuned={m: g})[m]
                        config = seeded(config)[0]  # tuned with the first seed
                        got = run(planned(label, spec, dev_concept, m, config, "tune", {"grid": g}), st)
                        tried.append(got or {"worst_h": math.nan})
                    best = pick_best(tried)
                    chosen[m] = grid[best]
                    result["tune"]["choices"].append(
                        {
                            "model": label,
                            "method": m,
                            "settings": grid[best],
                            "index": best,
                            "eta": tried[best].get("eta"),
                            "worst_h": tried[best].get("worst_h"),
                            "h": tried[best].get("h"),
                            "tried": [{"settings": g, "worst_h": t.get("worst_h")} for g, t in zip(grid, tried)],
                        }
                    )
                here = method_configs(methods, preset, overrides, quick, tuned=chosen)
            for concept in concepts:
                run(planned(label, spec, concept, BASE, None), st)
                folder = oracle_folder(oracles, label, concept)
                if folder is not None:
                    oracle_st = oracle_states.setdefault(concept, {"label": label, "spec": folder, "reference": st})
                    run(planned(label, folder, concept, ORACLE, None), oracle_st)
                elif oracles is not None:
                    result["oracles_missing"].append(f"{label}-no-{concept}")
                for m in methods:
                    for config in seeded(here[m]):
                        run(planned(label, spec, concept, m, config), st)
            st.clear()  # the pipelines are freed before the next model's are loaded
            oracle_states.clear()
    finally:
        bar.close()
    write()
    return result


def _run_row(
    pipe,
    concept,
    method,
    config,
    detector,
    n,
    n_locality,
    device,
    progress,
    attacks: Sequence[str] = (),
    attack_n: int = ATTACK_N,
    attack_configs: Mapping[str, Mapping[str, str]] | None = None,
    quick: bool = False,
    attack_out: Path | None = None,
    reference=None,
    grid_file: Path | None = None,
    same_edit: Callable[[str], dict | None] | None = None,
) -> dict:
    """The figures of one row: the suite (and, for a method, its training) on ``pipe``; the
    suite is one in-memory run of :func:`erasekit.evaluation.evaluate.evaluate_run`. With
    ``attacks``, those attacks then run on the edit, or for the base row on the unedited model
    (their success rates in ``attacks``, their results in ``attack_out``); every row gets
    ``worst_h``. ``same_edit(fingerprint)``: a finished row whose edit had this
    :func:`edit_fingerprint` at the same settings, whose figures are then this row's (the same
    edit on the same prompts, seeds and attacks gives the same images), or None."""
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
            "edit_fingerprint": edit_fingerprint(edit),
        }
        # The attack folders name the edit by its id: an id from its content lets a row stopped
        # during its attacks resume after a restart (a fresh random id makes the folder another run's).
        edit.id = row["edit_fingerprint"][:12]
        earlier = same_edit(row["edit_fingerprint"]) if same_edit is not None else None
        if earlier is not None:
            spent = {"suite_seconds": 0.0} | ({"attack_seconds": 0.0} if "attack_seconds" in earlier else {})
            return (
                row
                | {k: earlier[k] for k in SHARED_FIGURES if k in earlier}
                | spent
                | {"same_edit_as": earlier["key"]}
            )
    suite_name = suite_for_concept(concept)
    suite = make_suite(suite_name, n=n, n_locality=n_locality)
    with Stopwatch(device) as clock:  # applies the edit, generates, removes it, scores
        run = evaluate_run(pipe, suite, concept, detector, edit=edit, batch_size=BATCH_SIZE)
        d = run["metrics"]
    if grid_file is not None:  # the simple prompts' images, for the report's base / oracle / edited rows
        cases = suite.cases(concept)
        idx = [i for i, c in enumerate(cases) if c.set == "simple"][:GRID_IMAGES]
        save_grid(grid_file, [run["images"][i] for i in idx])
        row["grid"] = {"file": grid_file.name, "seeds": [cases[i].seed for i in idx]}
    extra = ("color_accuracy",) if suite_name == OBJECT_SUITE else ("content", "h_no_content", "content_per_set")
    row |= {k: d[k] for k in ("acc_e", "acc_r", "acc_l", "h", "per_set", "n_images", *extra)}
    row["suite_seconds"] = round(clock.seconds, 3)
    if attacks:
        with Stopwatch(device) as clock:
            res = attack(
                pipe,
                suite_name,
                concept,
                edits=[edit] if edit is not None else [],
                include_base=edit is None,
                reference=reference,
                out=attack_out or Path("erasekit-bench-attacks"),
                attacks=list(attacks),
                detector=detector,
                n=attack_n,
                configs=attack_configs or None,
                quick=quick,
                batch_size=BATCH_SIZE,
                suite_options={"n": attack_n, "n_locality": 1},
                progress=False,
            )
        asr = res["asr"][edit.method if edit is not None else "base"]
        row["attacks"] = {a: asr.get(a, math.nan) for a in attacks}
        row["attack_no_attack"] = asr.get("no attack")
        row["attack_seconds"] = round(clock.seconds, 3)
    row["worst_h"] = worst_case_h(row["acc_e"], row["acc_r"], row["acc_l"], row.get("attacks"), row.get("content"))
    return row

"""The attack report: one self-contained HTML page (success-rate table and charts, then the images
of every attack beside the base model's and the edited model's)."""

from __future__ import annotations

import html
import math

from ..report import figure, html_table, image_grid, page, seed_grids, svg_bar_chart, thumbnails
from ..suites import Suite
from .base import PROMPT_ATTACKS


def attack_report(
    results: dict, cases, runs, outcomes: dict, plain_idx: list[int], suite: Suite, per_row: int = 8
) -> str:
    """The HTML page of :func:`erasekit.evaluation.attacks.attack`'s ``results``."""
    cols = ["no attack"] + list(results["attacks"])
    det = results["detector"]
    sections = [
        f"<p>Concept <b>{_esc(results['concept'])}</b>; suite {_esc(suite.name)}; "
        f"detector {_esc(det['name'])} (threshold {_esc(det['threshold'])}). "
        "Attack success rate (ASR) in %; 'no attack' is the rate on the plain prompts. "
        "Each attack counts success as its paper does:</p>",
        "<ul>"
        + "".join(
            f"<li><b>{_esc(name)}</b>: {_esc(next(iter(per_edit.values())).definition)}"
            f" ({_esc(results['references'].get(name, ''))})</li>"
            for name, per_edit in outcomes.items()
            if per_edit
        )
        + "</ul>",
        "<h2>Attack success rate (%)</h2>",
        html_table(
            ["model"] + cols, [[label] + [_fmt(rates.get(c)) for c in cols] for label, rates in results["asr"].items()]
        ),
    ]
    edited = [label for label in results["asr"] if label != "base"]
    for c in cols[1:]:
        sections.append(
            svg_bar_chart(
                edited, [_num(results["asr"][label].get(c)) for label in edited], f"ASR of {c} per method", "%"
            )
        )
    pix = 8 if suite.pixelate_grids else None
    for name in ["plain"] + [a for a in results["attacks"] if a in PROMPT_ATTACKS]:
        idx = [i for i, c in enumerate(cases) if c.set == name][:per_row]
        if not idx:
            continue
        sections.append(f"<h2>{_esc(name)} prompts</h2><p>{_esc(cases[idx[0]].prompt)}, ...</p>")
        sections += seed_grids(runs, cases, idx, pix)
    for name, per_edit in outcomes.items():
        for label, outcome in per_edit.items():
            k = min(per_row, len(outcome.images))
            if not k:
                continue
            sections.append(f"<h2>{_esc(name)} on {_esc(label)}</h2>")
            figures = {key: v for key, v in outcome.figures.items() if isinstance(v, (int, float, str))}
            if figures:
                sections.append(html_table(["figure", "value"], [[key, _fmt(v)] for key, v in figures.items()]))
            imgs = thumbnails(outcome.images[:k], pixelate=pix)
            shown = outcome.records[:k]
            sections.append(
                figure(
                    image_grid(imgs, cols=k, scale=max(1, 96 // imgs.shape[-1])),
                    f"{label} under {name}: "
                    + "; ".join(f"{r.get('prompt', '')} (seed {r.get('seed')})" for r in shown),
                )
            )
    sections.append("<h2>Provenance</h2>")
    sections.append(
        html_table(["library", "version"], [[k, _fmt(v)] for k, v in results["versions"].items()], cls="versions")
    )
    return page(f"erasekit attacks: {results['concept']} ({suite.name})", sections)


def _fmt(v):
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else round(v, 4)
    return "n/a" if v is None else v


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _esc(text) -> str:
    return html.escape(str(text))

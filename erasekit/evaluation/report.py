"""Self-contained HTML reports: image grids embedded as PNG data URIs, tables, no server needed."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, cols: int, scale: int = 3, pad: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [0, 1] into one PIL image, ``cols`` per row, upscaled."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "metrics") -> str:
    def cell(v: object) -> str:
        return f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(img: Image.Image, caption: str) -> str:
    return (
        f'<figure><img src="{png_data_uri(img)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def page(title: str, sections: Sequence[str]) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:0.5em 1em 0.5em 0}img{image-rendering:pixelated}"
        "figcaption{font-size:0.85em;color:#555}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>" + "\n".join(sections) + "</body></html>\n"
    )


def thumbnails(images: Sequence[torch.Tensor], size: int | None = None, pixelate: int | None = None) -> torch.Tensor:
    """Stack (3, H, W) images of any sizes as (N, 3, size, size) (default: the first image's
    height, at most 128). ``pixelate``: show them as pixelate x pixelate blocks (sensitive
    content in a report)."""
    import torch.nn.functional as F

    if not len(images):
        return torch.empty(0, 3, 1, 1)
    size = size or min(int(images[0].shape[-2]), 128)
    out = []
    for img in images:
        x = img[None].float()
        if pixelate:
            x = F.interpolate(x, size=(pixelate, pixelate), mode="area")
            x = F.interpolate(x, size=(size, size), mode="nearest")
        elif tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out.append(x[0])
    return torch.stack(out)


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _nice_max(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    top = max(finite, default=1.0)
    return 100.0 if 0 <= top <= 100 and top > 10 else (top * 1.1 if top > 0 else 1.0)


def svg_bar_chart(
    labels: Sequence[str], values: Sequence[float], title: str, ylabel: str = "", width: int = 520, height: int = 260
) -> str:
    """An inline SVG bar chart (NaN bars are left empty and marked n/a)."""
    left, bottom, top = 50, 40, 30
    plot_w, plot_h = width - left - 10, height - bottom - top
    ymax = _nice_max(values)
    n = max(1, len(values))
    bar_w = plot_w / n * 0.6
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11">{ymax:.3g}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<text x="12" y="{top + plot_h / 2}" font-size="11" transform="rotate(-90 12 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
    ]
    for i, (label, v) in enumerate(zip(labels, values)):
        x = left + plot_w / n * (i + 0.2)
        if v == v:
            h = max(0.0, min(1.0, v / ymax)) * plot_h
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{_COLORS[i % len(_COLORS)]}"/>'
            )
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - h - 4:.1f}" text-anchor="middle" '
                f'font-size="11">{v:.1f}</text>'
            )
        else:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h - 4}" text-anchor="middle" font-size="11">n/a</text>'
            )
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{html.escape(label)}</text>'
        )
    return "".join(parts) + "</svg>"


def svg_line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str = "",
    width: int = 520,
    height: int = 280,
) -> str:
    """An inline SVG line chart: ``series`` name -> [(x, y), ...] (NaN points skipped)."""
    left, bottom, top, right = 50, 40, 30, 120
    plot_w, plot_h = width - left - right, height - bottom - top
    pts = [(x, y) for s in series.values() for x, y in s if y == y]
    xmin, xmax = (min(x for x, _ in pts), max(x for x, _ in pts)) if pts else (0.0, 1.0)
    xmax = xmax if xmax > xmin else xmin + 1
    ymax = _nice_max([y for _, y in pts])

    def px(x, y):
        return left + (x - xmin) / (xmax - xmin) * plot_w, top + plot_h - max(0.0, min(1.0, y / ymax)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{(left + plot_w / 2)}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11">{ymax:.3g}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{left}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{xmin:g}</text>',
        f'<text x="{left + plot_w}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{xmax:g}</text>',
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle" '
        f'font-size="12">{html.escape(xlabel)}</text>',
        f'<text x="12" y="{top + plot_h / 2}" font-size="11" transform="rotate(-90 12 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
    ]
    for k, (name, points) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        xy = [px(x, y) for x, y in sorted(points) if y == y]
        if xy:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}"/>'
            )
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in xy]
        parts.append(
            f'<text x="{left + plot_w + 10}" y="{top + 14 * (k + 1)}" font-size="11" '
            f'fill="{color}">{html.escape(name)}</text>'
        )
    return "".join(parts) + "</svg>"


def seed_grids(runs, cases, idx: list[int], pixelate: int | None = None) -> list[str]:
    """One figure per run: the images of cases ``idx`` in a row, captioned with the run's name
    and the seeds (the base-vs-edited grids of every report)."""
    out = []
    for r in runs:
        imgs = thumbnails([r["images"][i] for i in idx], pixelate=pixelate)
        out.append(
            figure(
                image_grid(imgs, cols=len(idx), scale=max(1, 96 // imgs.shape[-1])),
                f"{r['name']}: seeds {', '.join(str(cases[i].seed) for i in idx)}",
            )
        )
    return out

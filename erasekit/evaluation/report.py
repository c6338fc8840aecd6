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
    return f'<figure><img src="{png_data_uri(img)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


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

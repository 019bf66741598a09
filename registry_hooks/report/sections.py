"""Extra report sections (full diff, training evolution, comparisons) as self-contained HTML.

Images are embedded as data: URIs and styles inline, so a page still works offline in MLflow's
sandboxed artifact viewer. Charts use matplotlib's object API (no pyplot state) like charts.py.
"""
from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SECTION_STYLE = ("font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:16px;"
                 "border-top:3px solid #0072B2")


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white", bbox_inches="tight")
    return path


def data_uri(path: Path) -> str:
    """The file as a data: URI (png or gif), for an <img> that needs no second file."""
    kind = "gif" if path.suffix == ".gif" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def section_html(title: str, paragraphs: list[str], images: list[Path],
                 tables: list[str] = ()) -> str:
    """One <section>: a heading, plain-text paragraphs (escaped), inline images and HTML tables."""
    parts = [f'<section style="{SECTION_STYLE}"><h2>{escape(title)}</h2>']
    parts += [f"<p>{escape(p)}</p>" for p in paragraphs]
    parts += list(tables)
    parts += [f'<figure style="margin:12px 0"><img alt="{escape(p.stem)}" src="{data_uri(p)}" '
              f'style="max-width:100%"><figcaption>{escape(p.name)}</figcaption></figure>'
              for p in images]
    parts.append("</section>")
    return "\n".join(parts)


def append_section(html_path: Path, section: str) -> None:
    """Insert `section` before </body> of an existing report.html (written by write_analysis)."""
    text = html_path.read_text(encoding="utf-8")
    at = text.rfind("</body>")
    text = text[:at] + section + "\n" + text[at:] if at >= 0 else text + section
    html_path.write_text(text, encoding="utf-8")


def html_table(header: list[str], rows: list[list]) -> str:
    """A plain HTML table; floats with 4 significant digits, None as a dash."""
    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else escape(str(v))
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:2px 8px'>{cell(v)}</td>" for v in row)
                   + "</tr>" for row in rows)
    return f"<table style='border-collapse:collapse;font-size:13px'><tr>{head}</tr>{body}</table>"


def grid_heatmap(values: list[list[float | None]], rows: list, cols: list, title: str,
                 path: Path, colour_label: str) -> Path:
    """A layer × column heatmap (e.g. relative change by layer and matrix type)."""
    array = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig = figure(max(4.0, 0.7 * len(cols) + 2.5), max(3.0, 0.28 * len(rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(array, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(title, loc="left", fontsize=11)
    fig.colorbar(image, ax=ax, label=colour_label)
    return save_png(fig, path)

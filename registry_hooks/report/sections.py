"""Extra report sections (full diff, training evolution, comparisons) as data.

templates/section.html renders a Section in the same pass as the page it belongs to, with images
embedded as data: URIs and styles inline, so a page still works offline in MLflow's sandboxed
artifact viewer.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path


def data_uri(path: Path) -> str:
    """The file as a data: URI (png or gif), for an <img> that needs no second file."""
    kind = "gif" if path.suffix == ".gif" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


@dataclass(frozen=True)
class Table:
    """A plain table: a header and rows of values (floats to 4 significant digits, None as a dash)."""

    header: list[str]
    rows: list[list]

    def cells(self) -> list[list[str]]:
        return [[_cell(v) for v in row] for row in self.rows]


@dataclass(frozen=True)
class Section:
    """A page section below the report (full diff, training evolution, a comparison's parts):
    plain-text paragraphs, tables and inline images, rendered by templates/section.html."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)

"""report.html: one self-contained page (inline CSS/JS, data embedded as JSON, no external URL).

It must work offline inside MLflow's artifact viewer, a sandboxed iframe that runs scripts but has
no same-origin access: so no fetch, no storage, nothing loaded from elsewhere. The page's charts are
drawn by templates/report.js from the embedded result.
"""
from __future__ import annotations

import base64
import json
from html import escape
from importlib import resources

import numpy as np

from .narrative import (GLOSSARY, SECTION_TITLES, attention_role, component_order,
                        narrate_layer, narrate_sections)
from .result import AnalysisResult

DATA_ELEMENT_ID = "tunelens-data"


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def embedded_json(payload: dict) -> str:
    """JSON safe inside <script>: every '<' escaped, so '</script>' in a name cannot end it."""
    return json.dumps(payload, allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def encode_heatmap(values: list[list[float | None]]) -> str:
    """Block means as base64 little-endian float32 (None -> NaN): a quarter of the JSON text."""
    array = np.array([[np.nan if v is None else v for v in row] for row in values], dtype="<f4")
    return base64.b64encode(array.tobytes()).decode("ascii")


def report_payload(result: AnalysisResult, data: dict | None = None) -> dict:
    """What the page's script reads: the result plus the narrative by section.

    Heatmaps are 98% of an analysis.json (a 64×64 grid per module); the page carries them as
    float32 (HEATMAP_ENCODING), which a colour scale cannot tell from float64, so an adapter of a
    few hundred modules stays a few megabytes.
    """
    data = dict(result.to_dict() if data is None else data)
    data["heatmaps"] = [{"module": h["module"], "rows": h["rows"], "cols": h["cols"],
                         "f32": encode_heatmap(h["values"])} for h in data["heatmaps"]]
    return {
        "result": data,
        "sections": narrate_sections(result),
        "section_titles": SECTION_TITLES,
        "glossary": GLOSSARY,
        "roles": {m.name: role for m in result.modules if (role := attention_role(m))},
        "components": component_order(result),
        # Keyed by str(layer) ("null" for modules outside the layer stack), as JSON keys must be.
        "layer_stories": {json.dumps(layer): narrate_layer(result, layer)
                          for layer in {m.layer for m in result.modules}},
    }


def render_report(result: AnalysisResult, data: dict | None = None) -> str:
    """The full report.html text for `result` (`data`: its to_dict(), when already at hand)."""
    title = "tunelens · " + (result.adapter.base_model_name_or_path or "LoRA adapter") + " adapter"
    page = _template("report.html")
    # One pass over fixed markers, in an order where no inserted text can contain a later marker.
    for marker, text in (("__CSS__", _template("report.css")), ("__JS__", _template("report.js")),
                         ("__TITLE__", escape(title)),
                         ("__DATA__", embedded_json(report_payload(result, data)))):
        page = page.replace(marker, text, 1)
    return page

"""report.html: one self-contained page (inline CSS/JS, data embedded as JSON, no external URL).

It must work offline inside MLflow's artifact viewer, a sandboxed iframe that runs scripts but has
no same-origin access: so no fetch, no storage, nothing loaded from elsewhere. The page's charts are
drawn by templates/report.js from the embedded result.
"""
from __future__ import annotations

import json
from importlib import resources
from html import escape

from .narrative import GLOSSARY, SECTION_TITLES, attention_role, narrate_sections
from .result import AnalysisResult

DATA_ELEMENT_ID = "tunelens-data"


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def embedded_json(payload: dict) -> str:
    """JSON safe inside <script>: every '<' escaped, so '</script>' in a name cannot end it."""
    return json.dumps(payload, allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def report_payload(result: AnalysisResult) -> dict:
    """What the page's script reads: the result itself plus the narrative by section."""
    return {
        "result": result.to_dict(),
        "sections": narrate_sections(result),
        "section_titles": SECTION_TITLES,
        "glossary": GLOSSARY,
        "roles": {m.name: role for m in result.modules if (role := attention_role(m))},
    }


def render_report(result: AnalysisResult) -> str:
    """The full report.html text for `result`."""
    title = "tunelens · " + (result.adapter.base_model_name_or_path or "LoRA adapter") + " adapter"
    page = _template("report.html")
    # One pass over fixed markers, in an order where no inserted text can contain a later marker.
    for marker, text in (("__CSS__", _template("report.css")), ("__JS__", _template("report.js")),
                         ("__TITLE__", escape(title)),
                         ("__DATA__", embedded_json(report_payload(result)))):
        page = page.replace(marker, text, 1)
    return page

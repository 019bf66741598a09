"""report.html: one self-contained page (inline CSS/JS, data embedded as JSON, no external URL).

It must work offline inside MLflow's artifact viewer, a sandboxed iframe that runs scripts but has
no same-origin access: so no fetch, no storage, nothing loaded from elsewhere. The page's charts are
drawn by templates/report.js from the embedded result.
"""
from __future__ import annotations

import base64
import heapq
import json
import math
from importlib import resources

import numpy as np
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from .charts import chart_components
from .document import analysis_document
from tunelens.registry_hooks.engine.naming import role_of

from .narrative import (SECTION_TITLES, glossary_for, is_full_finetune, narrate_layer,
                        narrate_sections)
from .sections import Section, data_uri
from tunelens.registry_hooks.engine.result import AnalysisResult
from tunelens.settings import AnalysisSettings

DATA_ELEMENT_ID = "tunelens-data"

# The page's fixed text (our own markup), worded for a LoRA adapter or for a full fine-tune diff.
WORDING = {
    "lora": {
        "brand": "adapter analysis",
        "headline": "How this LoRA adapter changed the model",
        "intro": """<p>Think of the base model as a brain that already knows how to read, write
      and follow instructions. Fine-tuning teaches it a specialty. LoRA does that without rewriting
      the brain: the original weights stay untouched and the adapter adds a small set of
      adjustments, like sticky notes in a textbook. For every weight matrix it touches, the
      adjustment is <b>ΔW = scale · B · A</b>, where B and A are thin matrices of width <i>r</i>
      (the rank).</p>
      <p>This page measures those adjustments: which layers and parts of each layer changed most,
      how big the changes are, how much of the rank they use, and which individual neurons
      moved.</p>""",
        "spectrum": """at most <i>r</i> of them. Bars of similar height: the full rank is in use.
      A stair-step falling off: the typical healthy pattern. One dominant bar: the change is
      essentially one direction and the rank is more than needed.""",
        "who": "the adapter",
    },
    "full": {
        "brand": "full fine-tune analysis",
        "headline": "How fine-tuning changed the model",
        "intro": """<p>Think of the base model as a brain that already knows how to read, write
      and follow instructions. Fine-tuning teaches it a specialty. A full fine-tune lets every
      weight move, so the change to each weight matrix is the difference
      <b>ΔW = W<sub>tuned</sub> − W<sub>base</sub></b> between the fine-tuned and the base
      model.</p>
      <p>This page measures those differences: how many parameters changed, which layers and
      matrix types (q/k/v/o, gate/up/down) moved most relative to their base weights, how many
      directions each change spans (its rank), and which individual neurons moved.</p>""",
        "spectrum": """the largest ones (from a Lanczos solver for large matrices). A steep
      fall-off: the update is effectively low-rank, as LoRA assumes; a flat run of bars: the
      change is spread over many directions.""",
        "who": "the fine-tune",
    },
}


# One way to make HTML: these templates, autoescaped; only our own fixed markup (the wording's
# tags, the stylesheet, the script, the <script>-safe JSON) is marked safe.
PAGES = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True,
                    keep_trailing_newline=True)
PAGES.filters["data_uri"] = data_uri


def _asset(name: str) -> Markup:
    return Markup(resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8"))


def embedded_json(payload: dict) -> str:
    """JSON safe inside <script>: every '<' escaped, so '</script>' in a name cannot end it."""
    return json.dumps(payload, allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def encode_heatmap(values: list[list[float | None]]) -> str:
    """Block means as base64 little-endian float32 (None -> NaN): a quarter of the JSON text."""
    array = np.array(values, dtype=np.float64).astype("<f4")  # numpy reads None as NaN
    return base64.b64encode(array.tobytes()).decode("ascii")


def heatmap_modules(result: AnalysisResult, max_heatmaps: int) -> set[str]:
    """Names of the (at most) max_heatmaps modules with a heatmap and the largest ‖ΔW‖_F."""
    stored = {h.module for h in result.heatmaps}
    candidates = [m for m in result.modules if m.name in stored]
    largest = heapq.nlargest(max(0, max_heatmaps), candidates,
                             key=lambda m: m.fro if math.isfinite(m.fro) else -math.inf)
    return {m.name for m in largest}


def report_payload(result: AnalysisResult, data: dict | None = None, *,
                   max_heatmaps: int | None = None,
                   settings: AnalysisSettings | None = None) -> dict:
    """What the page's script reads: the result plus the narrative by section.

    Heatmaps are 98% of an analysis.json (a 64×64 grid per module); the page carries them as
    float32 (HEATMAP_ENCODING), which a colour scale cannot tell from float64, and only for the
    max_heatmaps largest modules (None: all), so a 6000-expert adapter's page stays a few megabytes
    and its browser tab responsive. analysis.json keeps every one.
    """
    data = dict(analysis_document(result, settings) if data is None else data)
    keep = None if max_heatmaps is None else heatmap_modules(result, max_heatmaps)
    data["heatmaps"] = [{"module": h["module"], "rows": h["rows"], "cols": h["cols"],
                         "f32": encode_heatmap(h["values"])} for h in data["heatmaps"]
                        if keep is None or h["module"] in keep]
    shown, folded = chart_components(result)
    return {
        "result": data,
        "sections": narrate_sections(result, settings),
        "section_titles": SECTION_TITLES,
        "glossary": glossary_for(result),
        "roles": {m.name: role for m in result.modules if (role := role_of(m))},
        # Bar series and grid rows: the largest components; the page sums the rest into "other".
        "components": shown,
        "components_folded": len(folded),
        "heatmaps_left_out": len(result.heatmaps) - len(data["heatmaps"]),
        # Keyed by str(layer) ("null" for modules outside the layer stack), as JSON keys must be.
        "layer_stories": {json.dumps(layer): narrate_layer(result, layer)
                          for layer in {m.layer for m in result.modules}},
    }


def heatmap_note(result: AnalysisResult, shown: int) -> str:
    """The page's line saying whose heatmaps it shows, when it leaves some out."""
    stored = len(result.heatmaps)
    if shown >= stored:
        return ""
    return (f"Heatmaps: showing the top {shown} of {len(result.modules)} modules by ‖ΔW‖_F "
            f"(analysis.report_max_heatmaps in conf.yaml). All {len(result.modules)} modules, "
            f"with every heatmap, are in analysis.json; the module table below lists them all.")


def render_report(result: AnalysisResult, data: dict | None = None, *,
                  max_heatmaps: int | None = None, sections: list[Section] = (),
                  settings: AnalysisSettings | None = None) -> str:
    """The full report.html text for `result` (`data`: its analysis_document(), when at hand), with
    the heatmaps of at most max_heatmaps modules, the largest (None: all), and `sections` below."""
    full = is_full_finetune(result)
    base = result.adapter.base_model_name_or_path
    title = ("tunelens · full fine-tune of " + (base or "a base model") if full else
             "tunelens · " + (base or "LoRA adapter") + " adapter")
    payload = report_payload(result, data, max_heatmaps=max_heatmaps, settings=settings)
    return PAGES.get_template("report.html").render(
        title=title, wording={k: Markup(v) for k, v in WORDING["full" if full else "lora"].items()},
        css=_asset("report.css"), js=_asset("report.js"),
        heatmap_note=heatmap_note(result, len(payload["result"]["heatmaps"])),
        data_json=Markup(embedded_json(payload)), sections=list(sections))

"""The side-by-side HTML report: one self-contained page (inline CSS and JS, no external URL),
rendered from templates/side_by_side.html with autoescaping."""
from __future__ import annotations

import pandas as pd
from jinja2 import Environment, PackageLoader

PAGES = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True,
                    keep_trailing_newline=True)

CHARTS = [("mean_words", "words per output (lower is more concise)", "{:.1f}"),
          ("served_latency_ms_p95", "p95 latency as served (one request at a time), ms", "{:.0f}"),
          ("memory_total_gib", "memory as served, GiB", "{:.3g}"),
          ("over_correction_rate", "over-corrections", "{:.0%}")]
BAR_PX = 180  # the longest bar of a chart


def _charts(labels: list[str], metrics: dict[str, float], primary: str) -> list[dict]:
    """Bar charts, one per metric (the primary quality metric first), drawn with plain CSS widths;
    a metric no model has (the grammar profile's, without it) gets no chart."""
    charts = []
    for metric, title, fmt in [(primary, f"{primary} (primary quality metric)", "{:.3g}"),
                               *CHARTS]:
        values = {label: metrics.get(f"{label}/{metric}") for label in labels}
        top = max((v for v in values.values() if v is not None), default=0) or 1
        bars = [(label, f"{BAR_PX * v / top:.0f}", fmt.format(v))
                for label, v in values.items() if v is not None]
        if bars:
            charts.append({"title": title, "bars": bars})
    return charts


def _rows(table: pd.DataFrame, labels: list[str], primary: str) -> list[dict]:
    """Every evaluated row: input, target and each model's output with its score and words."""
    rows = []
    for _, row in table.iterrows():
        outputs = [row[f"{label}_output"] for label in labels]
        cells = [{"css": {True: "ok", False: "bad"}.get(bool(row[f"{label}_exact_match"]), "")
                  if f"{label}_exact_match" in row else "",
                  "output": str(row[f"{label}_output"]), "score": row[f"{label}_{primary}"],
                  "words": row[f"{label}_words"]}
                 for label in labels]
        rows.append({"number": row["row"], "input": str(row["input"]),
                     "target": str(row["target"]), "differs": int(len(set(outputs)) > 1),
                     "cells": cells})
    return rows


def render_report(*, title: str, labels: list[str], table: pd.DataFrame,
                  metrics: dict[str, float], verdict_lines: list[str], decision: str,
                  notes: list[str], primary: str = "exact_match", extra_html: str = "",
                  decision_class: str | None = None, lead_html: str = "") -> str:
    """The page: verdict, one metrics row per model, then every row side by side with a filter;
    `extra_html`: sections rendered elsewhere (already escaped Markup), before the rows;
    `decision_class`: the banner's colour (PROMOTE, REJECT, INCONCLUSIVE) when `decision` is not
    one of them; `lead_html`: a section shown right under the verdict (Markup)."""
    metric_names = sorted({key.split("/", 1)[1] for key in metrics if key.split("/")[0] in labels})
    summary = [(label, [metrics.get(f"{label}/{m}") for m in metric_names]) for label in labels]
    return PAGES.get_template("side_by_side.html").render(
        title=title, decision=decision, decision_class=decision_class or decision,
        verdict_lines=verdict_lines, notes=notes,
        charts=_charts(labels, metrics, primary), metric_names=metric_names, summary=summary,
        labels=labels, rows=_rows(table, labels, primary), primary=primary,
        extra_html=extra_html, lead_html=lead_html)

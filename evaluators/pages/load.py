"""Latency and throughput against concurrency, for every model: an inline-SVG section of
side_by_side.html and a markdown table with text bars for the version page.

Both read the logged metrics (`<label>/latency_p50_c<N>`, `<label>/output_tokens_per_s_c<N>`, ...),
so the pages show exactly the numbers the run holds; a figure not measured is said to be so.
"""
from __future__ import annotations

import math
import re

from markupsafe import Markup

from tunelens.evaluators.pages.report import PAGES

SVG_W, SVG_H, PAD = 420, 190, 40
COLOURS = ("#1f4fbf", "#d1495b", "#2a9d8f", "#e9a03b", "#6a4c93", "#555555")
TEXT_BAR = 20  # characters of the longest text bar on the version page
_LEVEL = re.compile(r"/latency_p50_c(\d+)$")


def levels_in(metrics: dict[str, float]) -> list[int]:
    """The concurrency levels some model has a latency figure at, ascending."""
    return sorted({int(m.group(1)) for key in metrics if (m := _LEVEL.search(key))})


def _series(labels: list[str], metrics: dict[str, float], name: str, levels: list[int]) -> dict:
    """Per model, its `name` figure at each level (None where not measured)."""
    series = {}
    for label in labels:
        values = [metrics.get(f"{label}/{name}_c{level}") for level in levels]
        series[label] = [v if v is not None and math.isfinite(v) else None for v in values]
    return series


def _svg_lines(series: dict[str, list], levels: list[int]) -> dict:
    """One polyline per model over the levels (evenly spaced), scaled to the largest value."""
    top = max((v for values in series.values() for v in values if v is not None), default=0) or 1
    step = (SVG_W - 2 * PAD) / max(len(levels) - 1, 1)
    lines = []
    for (label, values), colour in zip(series.items(), COLOURS * 4):
        points = [(PAD + i * step, SVG_H - PAD - v / top * (SVG_H - 2 * PAD))
                  for i, v in enumerate(values) if v is not None]
        lines.append({"label": label, "colour": colour,
                      "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in points),
                      "dots": [{"x": f"{x:.1f}", "y": f"{y:.1f}"} for x, y in points]})
    ticks = [{"x": f"{PAD + i * step:.1f}", "level": level} for i, level in enumerate(levels)]
    return {"lines": lines, "ticks": ticks, "top": top}


def html_section(labels: list[str], metrics: dict[str, float]) -> Markup:
    """The section of side_by_side.html (empty when no model was timed at more than one level)."""
    levels = levels_in(metrics)
    if len(levels) < 2:
        return Markup("")
    latency = _series(labels, metrics, "latency_p50", levels)
    throughput = _series(labels, metrics, "output_tokens_per_s", levels)
    rows = [{"label": label, "level": level,
             "cells": [metrics.get(f"{label}/{name}_c{level}") for name in
                       ("latency_p50", "latency_p95", "ttft_p50", "tpot_p50",
                        "output_tokens_per_s")]}
            for label in labels for level in levels]
    return Markup(PAGES.get_template("load_section.html").render(
        charts=[{"title": "p50 request latency (ms)", "svg": _svg_lines(latency, levels)},
                {"title": "output tokens per second", "svg": _svg_lines(throughput, levels)}],
        rows=rows, width=SVG_W, height=SVG_H, pad=PAD, isfinite=_is_figure))


def _is_figure(value) -> bool:
    return value is not None and math.isfinite(value)


def markdown_lines(labels: list[str], names: dict[str, str], metrics: dict[str, float]
                   ) -> list[str]:
    """The version page's table: per model and level, p50 / p95 latency and output tokens/s, each
    with a text bar scaled to the largest (nothing when only one level was timed)."""
    levels = levels_in(metrics)
    if len(levels) < 2:
        return []
    latency = _series(labels, metrics, "latency_p50", levels)
    throughput = _series(labels, metrics, "output_tokens_per_s", levels)
    top_latency = max((v for vs in latency.values() for v in vs if v is not None), default=1) or 1
    top_rate = max((v for vs in throughput.values() for v in vs if v is not None), default=1) or 1

    def cell(value, top, fmt):
        if value is None:
            return "not measured"
        return f"`{'█' * max(1, round(TEXT_BAR * value / top))}` {format(value, fmt)}"

    lines = ["", "Under load (requests in flight together):", "",
             "| model | in flight | p50 latency (ms) | p95 latency (ms) | output tokens/s |",
             "|---|---|---|---|---|"]
    for label in labels:
        for i, level in enumerate(levels):
            p95 = metrics.get(f"{label}/latency_p95_c{level}")
            lines.append(f"| {names.get(label, label)} | {level} "
                         f"| {cell(latency[label][i], top_latency, '.0f')} "
                         f"| {format(p95, '.0f') if _is_figure(p95) else 'not measured'} "
                         f"| {cell(throughput[label][i], top_rate, '.1f')} |")
    return lines

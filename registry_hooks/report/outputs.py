"""The files of one analysis: analysis.json, report.html and (opt-in) charts/*.png in one folder.

`tunelens analyze` and the hook worker both call write_analysis, so a run from the command line
and one from the registry produce the same artifacts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelens.config import packaged_settings

from tunelens.registry_hooks.engine.result import AnalysisResult
from tunelens.settings import Settings

from .document import analysis_document
from .html import render_report
from .sections import Section


@dataclass
class AnalysisFiles:
    """Where write_analysis put each artifact."""

    json_path: Path
    html_path: Path
    chart_paths: list[Path] = field(default_factory=list)


def write_analysis(result: AnalysisResult, out_dir: str | Path, *,
                   config: Settings | None = None, charts: bool | None = None,
                   sections: list[Section] = ()) -> AnalysisFiles:
    """Write out_dir/analysis.json, out_dir/report.html and out_dir/charts/*.png (`config`:
    the command's settings, a load_config() result; None: the packaged defaults; `charts`: draw
    the PNG copies, None = analysis.png_charts (off by default: report.html draws every chart
    itself); `sections`: more of the page, below the report)."""
    settings = (config or packaged_settings()).analysis
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The document once for both files: on a 224-module adapter it is a second of CPU (the
    # heatmaps). The text is exactly analysis_json()'s (tests/report/test_report.py checks it).
    data = analysis_document(result, settings)
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(data, allow_nan=False), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(render_report(result, data, max_heatmaps=settings.report_max_heatmaps,
                                       sections=sections, settings=settings), encoding="utf-8")
    chart_paths = []
    if settings.png_charts if charts is None else charts:
        from .charts import render_charts  # matplotlib: imported only when drawing

        chart_paths = render_charts(result, out / "charts", settings)
    return AnalysisFiles(json_path=json_path, html_path=html_path, chart_paths=chart_paths)

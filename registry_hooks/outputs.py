"""The files of one analysis: analysis.json, report.html and charts/*.png in one folder.

`tunelens analyze` and the hook worker both call write_analysis, so a run from the command line
and one from the registry produce the same artifacts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .charts import render_charts
from .report import render_report
from .result import AnalysisResult


@dataclass
class AnalysisFiles:
    """Where write_analysis put each artifact."""

    json_path: Path
    html_path: Path
    chart_paths: list[Path] = field(default_factory=list)


def write_analysis(result: AnalysisResult, out_dir: str | Path) -> AnalysisFiles:
    """Write out_dir/analysis.json, out_dir/report.html and out_dir/charts/*.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "analysis.json"
    json_path.write_text(result.to_json(), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(render_report(result), encoding="utf-8")
    chart_paths = render_charts(result, out / "charts")
    return AnalysisFiles(json_path=json_path, html_path=html_path, chart_paths=chart_paths)

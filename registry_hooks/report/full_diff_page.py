"""A full fine-tune diff's files: write_analysis's plus the layer × matrix type charts and section."""
from __future__ import annotations

from pathlib import Path

from tunelens.registry_hooks.engine.result import AnalysisResult
from tunelens.settings import Settings

from .outputs import write_analysis
from .figures import grid_heatmap
from .sections import Section


def write_full_diff(result: AnalysisResult, out_dir: str | Path, *,
                    config: Settings | None = None):
    """write_analysis's files plus the layer × matrix type charts and a report section."""
    chart_dir = Path(out_dir) / "charts"
    grid = result.full_diff.grid
    charts = []
    if grid.layers:
        charts.append(grid_heatmap(grid.rows("relative_fro"), grid.layers,
                                   grid.matrix_types, "Relative change ‖ΔW‖_F / ‖W‖_F",
                                   chart_dir / "full_diff_relative_change.png", "relative change"))
        charts.append(grid_heatmap(grid.rows("spectral"), grid.layers, grid.matrix_types,
                                   "Spectral norm ‖ΔW‖_2", chart_dir / "full_diff_spectral_norm.png",
                                   "σ_1(ΔW)"))
        charts.append(grid_heatmap(grid.rows("relative_rank"), grid.layers, grid.matrix_types,
                                   "Relative rank of ΔW (rank / min(m, n))",
                                   chart_dir / "full_diff_relative_rank.png", "relative rank"))
    reading = [f"Each cell is one weight matrix: rows are layers, columns matrix types "
               f"({', '.join(grid.matrix_types)}); blank where a layer has no such matrix. "
               "The relative change ‖ΔW‖_F / ‖W‖_F says how far fine-tuning moved a matrix for "
               "its size; the spectral norm σ_1(ΔW) is the most it stretches any one input "
               "direction; the relative rank is the number of singular values of ΔW above "
               f"{result.full_diff.settings.get('rank_rtol', 0.01):g}·σ_1, counted exactly, over "
               "min(m, n): near 0 the update is low-rank, near 1 it spans every direction."] if grid.layers else []
    files = write_analysis(result, out_dir, config=config,
                           sections=[Section("Full fine-tune diff", reading, charts)])
    files.chart_paths.extend(charts)
    return files

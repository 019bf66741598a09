"""Several training runs' files: runs.json, one self-contained runs.html with an animated chart of
their per-layer change overlaid (one frame per checkpoint index) and a table of every value."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tunelens.registry_hooks.engine.result import TrainingRuns, json_safe

from .checkpoints_page import frames_to_gif
from .compare_page import COLOURS
from .figures import figure, save_png
from .html import PAGES
from .sections import Section, Table


def write_runs(runs: TrainingRuns, out_dir: str | Path) -> tuple[Path, Path, list[Path]]:
    """out_dir/runs.json, out_dir/runs.html and out_dir/charts/runs_profile.gif with its frames."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "runs.json"
    json_path.write_text(json.dumps(json_safe(runs), indent=1, allow_nan=False), encoding="utf-8")
    count = max(len(run.checkpoints) for run in runs.runs)
    frames = [save_png(overlay_frame(runs, i), out / "charts" / "runs" / f"frame_{i:03d}.png")
              for i in range(count)]
    gif = frames_to_gif(frames, out / "charts" / "runs_profile.gif")
    section = Section(
        "Per-layer change over training, run by run",
        [f"{len(runs.runs)} runs: S_ℓ = Σ ‖ΔW‖_F per layer at each checkpoint, one line per run; "
         "frame i shows each run's i-th checkpoint (a run with fewer holds its last)."],
        [gif], [runs_table(runs)])
    html_path = out / "runs.html"
    html_path.write_text(PAGES.get_template("runs.html").render(
        labels=[run.label for run in runs.runs], sections=[section]), encoding="utf-8")
    return json_path, html_path, [*frames, gif]


def runs_table(runs: TrainingRuns) -> Table:
    """One row per run and checkpoint: its step and S_ℓ per layer."""
    return Table(["run", "checkpoint", "step", *[f"S_{layer}" for layer in runs.layers]],
                 [[run.label, ref.label, ref.step, *values]
                  for run in runs.runs for ref, values in zip(run.checkpoints, run.layer_fro)])


def overlay_frame(runs: TrainingRuns, index: int):
    """Checkpoint `index` of every run: S_ℓ by layer, one labelled line per run, fixed axes."""
    fig = figure(9, 4)
    ax = fig.add_subplot()
    top = max((v for run in runs.runs for row in run.layer_fro for v in row if v is not None),
              default=0.0)
    for i, run in enumerate(runs.runs):
        at = min(index, len(run.checkpoints) - 1)
        step = run.checkpoints[at].step
        values = [math.nan if v is None else v for v in run.layer_fro[at]]
        ax.plot(runs.layers, values, marker="o", color=COLOURS[i % len(COLOURS)],
                label=f"{run.label}: {run.checkpoints[at].label}"
                      + (f" (step {step})" if step is not None else ""))
    ax.set_ylim(0, top * 1.05 or 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("S_ℓ = Σ ‖ΔW‖_F")
    ax.set_title(f"Checkpoint {index + 1}", loc="left")
    ax.legend(fontsize=8, loc="upper left")
    return fig

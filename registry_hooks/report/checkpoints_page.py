"""A training evolution's files: write_analysis's plus one profile frame per checkpoint, an animated
GIF of them and a section with the subspace similarity between consecutive checkpoints."""
from __future__ import annotations

from pathlib import Path

from tunelens.registry_hooks.engine.result import AnalysisResult, CheckpointEvolution
from tunelens.settings import Settings

from .narrative import narrate_sections
from .outputs import write_analysis
from .figures import figure, save_png
from .sections import Section, Table


def write_checkpoints(result: AnalysisResult, out_dir: str | Path, *,
                      config: Settings | None = None):
    """write_analysis's files plus the per-layer profile over steps: PNG frames and an animated GIF."""
    chart_dir = Path(out_dir) / "charts"
    frames = render_frames(result.checkpoints, chart_dir / "checkpoints")
    gif = frames_to_gif(frames, chart_dir / "checkpoints_profile.gif")
    table = Table(["from", "to", "mean subspace similarity", "min"],
                  [[p.from_, p.to, p.mean, p.min] for p in result.checkpoints.subspace_similarity])
    section = Section("Training evolution",
                      [f"{len(frames)} checkpoints; changes are measured from "
                       f"{result.checkpoints.reference}.",
                       *narrate_sections(result).get("training", [])], [gif], [table])
    files = write_analysis(result, out_dir, config=config, sections=[section])
    files.chart_paths.extend([*frames, gif])
    return files


# The four statistics of A's and B's change since the reference checkpoint, one panel each.
STAT_LABELS = {"mean": "mean Δ", "var": "variance of Δ", "abs_mean": "mean |Δ|",
               "abs_var": "variance of |Δ|"}


def profile_frame(section: CheckpointEvolution, index: int):
    """One checkpoint's figure: per layer, A's and B's mean Δ, var Δ, mean |Δ| and var |Δ| since
    the reference, and S_ℓ; every panel on the axes of its largest value over all checkpoints."""
    layers = [r.layer for r in section.layers]
    fig = figure(13, 6)
    grid = fig.add_gridspec(2, 3)
    for n, (stat, label) in enumerate(STAT_LABELS.items()):
        ax = fig.add_subplot(grid[n // 2, n % 2])
        reach = max((abs(v) for r in section.layers for f in "AB" for v in getattr(r, f)[stat]),
                    default=0.0) or 1.0
        for offset, factor, colour in ((-0.2, "A", "#0072B2"), (0.2, "B", "#E69F00")):
            ax.bar([x + offset for x in layers],
                   [getattr(r, factor)[stat][index] for r in section.layers], 0.4,
                   label=f"lora_{factor}", color=colour)
        ax.set_ylim(-reach * 1.05 if stat == "mean" else 0, reach * 1.05)
        ax.set_ylabel(f"{label} since {section.reference}", fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        if n == 0:
            ax.legend(loc="upper left", fontsize=8)
    right = fig.add_subplot(grid[:, 2])
    right.bar(layers, [r.delta_fro[index] for r in section.layers], color="#009E73")
    right.set_ylim(0, max((max(r.delta_fro) for r in section.layers), default=0.0) * 1.05 or 1.0)
    right.set_xlabel("layer")
    right.set_ylabel("S_ℓ = Σ ‖ΔW‖_F")
    checkpoint = section.checkpoints[index]
    fig.suptitle(checkpoint.label + (f" (step {checkpoint.step})"
                                     if checkpoint.step is not None else ""), x=0.01, ha="left")
    fig.tight_layout()
    return fig


def render_frames(section: CheckpointEvolution, out_dir: Path) -> list[Path]:
    """One PNG per checkpoint (profile_frame), on fixed axes."""
    return [save_png(profile_frame(section, i), out_dir / f"frame_{i:03d}.png")
            for i in range(len(section.checkpoints))]


def frames_to_gif(frames: list[Path], path: Path, frame_ms: int = 700) -> Path:
    """An animated GIF of the PNG frames (Pillow), looping, the last frame held longer."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    durations = [frame_ms] * (len(images) - 1) + [frame_ms * 3]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return path

"""A training evolution's files: write_analysis's plus one profile frame per checkpoint, an animated
GIF of them and a section with the subspace similarity between consecutive checkpoints."""
from __future__ import annotations

from pathlib import Path

from tunelens.registry_hooks.engine.result import AnalysisResult, CheckpointEvolution

from .narrative import narrate_sections
from .outputs import write_analysis
from .figures import figure, save_png
from .sections import Section, Table


def write_checkpoints(result: AnalysisResult, out_dir: str | Path, *,
                      config: dict | None = None):
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


def render_frames(section: CheckpointEvolution, out_dir: Path) -> list[Path]:
    """One PNG per checkpoint: per-layer mean |Δ| of A and B, and S_ℓ, on fixed axes."""
    layers = [r.layer for r in section.layers]
    series = {"A": [r.A["abs_mean"] for r in section.layers],
              "B": [r.B["abs_mean"] for r in section.layers],
              "S": [r.delta_fro for r in section.layers]}
    top = {k: max((max(v) for v in vals), default=0.0) or 1.0 for k, vals in series.items()}
    paths = []
    for i, checkpoint in enumerate(section.checkpoints):
        fig = figure(9, 3.4)
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        width = 0.4
        left.bar([x - width / 2 for x in layers], [v[i] for v in series["A"]], width,
                 label="lora_A", color="#0072B2")
        left.bar([x + width / 2 for x in layers], [v[i] for v in series["B"]], width,
                 label="lora_B", color="#E69F00")
        left.set_ylim(0, max(top["A"], top["B"]) * 1.05)
        left.set_xlabel("layer")
        left.set_ylabel(f"mean |Δ| since {section.reference}")
        left.legend(loc="upper left", fontsize=8)
        right.bar(layers, [v[i] for v in series["S"]], color="#009E73")
        right.set_ylim(0, top["S"] * 1.05)
        right.set_xlabel("layer")
        right.set_ylabel("S_ℓ = Σ ‖ΔW‖_F")
        fig.suptitle(checkpoint.label + (f" (step {checkpoint.step})"
                                         if checkpoint.step is not None else ""),
                     x=0.01, ha="left")
        paths.append(save_png(fig, out_dir / f"frame_{i:03d}.png"))
    return paths


def frames_to_gif(frames: list[Path], path: Path, frame_ms: int = 700) -> Path:
    """An animated GIF of the PNG frames (Pillow), looping, the last frame held longer."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    size = images[0].size
    images = [im if im.size == size else im.resize(size) for im in images]
    durations = [frame_ms] * (len(images) - 1) + [frame_ms * 3]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return path

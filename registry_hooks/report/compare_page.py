"""A comparison's files: compare.json, one self-contained compare.html and its charts."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tunelens.registry_hooks.engine.compare import Comparison
from tunelens.registry_hooks.engine.result import json_safe

from .figures import figure, save_png
from .html import PAGES
from .sections import Section, Table

COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]


def write_comparison(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path, list[Path]]:
    """out_dir/compare.json, out_dir/compare.html (self-contained) and out_dir/charts/*.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(json_safe(comparison), indent=1, allow_nan=False),
                         encoding="utf-8")
    charts = [_profile_chart(comparison, out / "charts" / "compare_profiles.png"),
              _share_chart(comparison, out / "charts" / "compare_group_shares.png")]
    groups = sorted({g for shares in comparison.group_shares.values() for g in shares})
    sections = [Section("Per-layer profiles and attention vs MLP share", [
        f"{len(comparison.labels)} inputs on base {comparison.base_model or 'unknown'}: "
        "S_ℓ = Σ‖ΔW‖_F per layer, and each group's share of the total."], charts,
        [Table(["input", *groups], [[label, *[comparison.group_shares[label].get(g) for g in groups]]
                                    for label in comparison.labels])])]
    for pair in comparison.overlaps:
        sections.append(Section(
            f"Subspace overlap {pair.a} vs {pair.b}",
            [f"Mean over {pair.shared_modules} shared modules: "
             f"{pair.mean:.3f}" if pair.mean is not None else "No shared modules.",
             "φ = ‖U_aᵀU_b‖_F² / min(r_a, r_b) of the two ΔW's column spaces: 1 = the same "
             "directions, near r/m = unrelated."], [],
            [Table(["module", "φ"], sorted(pair.modules.items()))]))
    if comparison.warnings:
        sections.append(Section("Warnings", comparison.warnings))
    html_path = out / "compare.html"
    html_path.write_text(PAGES.get_template("compare.html").render(
        labels=comparison.labels, sections=sections), encoding="utf-8")
    return json_path, html_path, charts


def _profile_chart(comparison: Comparison, path: Path) -> Path:
    fig = figure(8, 3.6)
    ax = fig.add_subplot()
    for i, label in enumerate(comparison.labels):
        values = [math.nan if v is None else v for v in comparison.profiles[label]]
        ax.plot(comparison.layers, values, marker="o", color=COLOURS[i % len(COLOURS)], label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("S_ℓ = Σ ‖ΔW‖_F")
    ax.set_title("Per-layer change, overlaid", loc="left")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _share_chart(comparison: Comparison, path: Path) -> Path:
    groups = sorted({g for s in comparison.group_shares.values() for g in s})
    fig = figure(7, 0.5 * len(comparison.labels) + 1.6)
    ax = fig.add_subplot()
    left = [0.0] * len(comparison.labels)
    for i, group in enumerate(groups):
        values = [comparison.group_shares[label].get(group, 0.0) for label in comparison.labels]
        ax.barh(comparison.labels, values, left=left, color=COLOURS[i % len(COLOURS)], label=group)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of Σ ‖ΔW‖_F")
    ax.legend(fontsize=8, loc="lower right")
    return save_png(fig, path)

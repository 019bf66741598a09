"""A comparison's files: compare.json, one self-contained compare.html and its charts."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tunelens.registry_hooks.engine.compare import Comparison, NeuronOverlap, SubspaceOverlap
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
        f"{len(comparison.labels)} inputs on "
        + (f"base {comparison.base_model}" if comparison.base_model else
           "bases that differ or are not recorded") + ": "
        "S_ℓ = Σ‖ΔW‖_F per layer, and each group's share of the total."], charts,
        [Table(["input", *groups], [[label, *[comparison.group_shares[label].get(g) for g in groups]]
                                    for label in comparison.labels])])]
    if comparison.depth_profiles:
        depth_chart = _depth_chart(comparison, out / "charts" / "compare_relative_depth.png")
        charts = [*charts, depth_chart]  # a new list: the first section keeps its two charts
        sections.append(Section("Full fine-tunes by relative depth", [
            "Each full fine-tune's relative change per layer, sqrt(Σ‖ΔW‖_F²) / sqrt(Σ‖W‖_F²) over "
            "the layer's tensors, at relative depth ℓ / L (layer over its model's number of "
            "layers), so models of different sizes line up."], [depth_chart],
            [Table(["input", "layers", "depth", "relative change"],
                   [[p.label, p.num_layers, d, v] for p in comparison.depth_profiles
                    for d, v in zip(p.depth, p.relative_change)])]))
    if comparison.top_layer_norms:
        sections.append(_top_layers_section(comparison))
    subspaces = {(pair.a, pair.b): pair for pair in comparison.overlaps}
    for neurons in comparison.neuron_overlaps:
        sections.append(_overlap_section(subspaces.get((neurons.a, neurons.b)), neurons))
    if comparison.warnings:
        sections.append(Section("Warnings", comparison.warnings))
    html_path = out / "compare.html"
    html_path.write_text(PAGES.get_template("compare.html").render(
        labels=comparison.labels, sections=sections), encoding="utf-8")
    return json_path, html_path, charts


def _top_layers_section(comparison: Comparison) -> Section:
    """Per group, the first input's top layers and each input's mean norm over them."""
    first = comparison.labels[0]
    rows = [[f"{n.group}: top {len(n.layers)} layers of {first} ({', '.join(map(str, n.layers))})",
             *[n.mean_norm[label] for label in comparison.labels],
             *[n.layers_adapted[label] for label in comparison.labels]]
            for n in comparison.top_layer_norms]
    return Section("Norms in the first input's top layers", [
        f"For each group, the layers where {first} changed most (S_ℓ = Σ‖ΔW‖_F over the group's "
        "matrices of a layer, the top three as an ensemble re-tune targets them), and every "
        "input's mean S_ℓ of that group over those of the layers it adapted: with a full run "
        "first, then an ensemble and a soloist re-tune, the full run's, the ensemble's average "
        "and the soloist's norm in its one layer."], [],
        [Table(["group", *[f"mean S_ℓ {label}" for label in comparison.labels],
                *[f"layers {label}" for label in comparison.labels]], rows)])


def _overlap_section(subspace: SubspaceOverlap | None, neurons: NeuronOverlap) -> Section:
    """One pair: the top shifted neurons both share, overall and per module, beside φ."""
    overall = (f"Top shifted neurons: {neurons.shared} of the top {neurons.k} neurons (rows of ΔW "
               "by ‖ΔW_i‖₂, over all modules) are the same in both"
               + (f", a share of {neurons.share:.2f}." if neurons.share is not None else "."))
    if subspace is None:
        return Section(f"Overlap {neurons.a} vs {neurons.b}",
                       [overall, "Per-module overlaps need both adapters' factors."])
    paragraphs = [
        overall,
        f"Per module, the share of each module's top {neurons.k} rows the other also has in its "
        "top: mean " + (f"{neurons.mean:.3f}" if neurons.mean is not None else "n/a") + ".",
        f"Subspace overlap, mean over {subspace.shared_modules} shared modules: "
        + (f"{subspace.mean:.3f}." if subspace.mean is not None else "n/a."),
        "φ = ‖U_aᵀU_b‖_F² / min(r_a, r_b) of the two ΔW's column spaces: 1 = the same "
        "directions, near r/m = unrelated."]
    rows = [[name, phi, neurons.modules.get(name)] for name, phi in sorted(subspace.modules.items())]
    return Section(f"Overlap {neurons.a} vs {neurons.b}", paragraphs, [],
                   [Table(["module", "φ (subspace)", f"top-{neurons.k} rows shared"], rows)])


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


def _depth_chart(comparison: Comparison, path: Path) -> Path:
    fig = figure(8, 3.6)
    ax = fig.add_subplot()
    for i, profile in enumerate(comparison.depth_profiles):
        values = [math.nan if v is None else v for v in profile.relative_change]
        ax.plot(profile.depth, values, marker="o", color=COLOURS[i % len(COLOURS)],
                label=f"{profile.label} ({profile.num_layers} layers)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth ℓ / L")
    ax.set_ylabel("relative change ‖ΔW‖_F / ‖W‖_F")
    ax.set_title("Full fine-tunes by relative depth", loc="left")
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

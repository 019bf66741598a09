"""PNG charts of an AnalysisResult, for the MLflow artifact view and for people without a browser.

Drawn with matplotlib's object API on the Agg canvas (no pyplot global state, safe in a worker
thread). Colours: Okabe-Ito for categories and ColorBrewer RdBu for signed heatmaps, both readable
with the common colour-vision deficiencies.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .narrative import ROLE_NAMES, ROLE_ORDER, attention_role, fmt
from .result import AnalysisResult, ModuleMetrics

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000", "#999999"]
ROLE_COLOURS = {"Q": "#0072B2", "K": "#E69F00", "V": "#009E73", "O": "#CC79A7", "QKV": "#56B4E9"}
GROUP_COLOURS = {"attention": "#0072B2", "mlp": "#E69F00", "embedding": "#009E73", "other": "#999999"}
TOP_MODULES = 6  # modules shown in the spectra and heatmap grids: the largest ‖ΔW‖_F
DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax, title: str, xlabel: str | None = None, ylabel: str | None = None) -> None:
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e3e6ec", linewidth=0.8)
    ax.set_axisbelow(True)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _components(result: AnalysisResult) -> list[str]:
    """Components in the engine's module order (so colours follow the model's layout)."""
    seen: dict[str, None] = {}
    for m in result.modules:
        if m.layer is not None:
            seen.setdefault(m.component)
    return list(seen)


def _top_modules(result: AnalysisResult) -> list[ModuleMetrics]:
    finite = [m for m in result.modules if math.isfinite(m.fro)]
    return sorted(finite, key=lambda m: -m.fro)[:TOP_MODULES]


def layers_by_component(result: AnalysisResult, path: Path) -> Path | None:
    """Grouped bars: ‖ΔW‖_F per layer, one bar per component."""
    layers = sorted(result.layers, key=lambda l: l.layer)
    components = _components(result)
    if not layers or not components:
        return None
    fig = _figure(max(8.0, min(20.0, 0.32 * len(layers) * len(components) ** 0.5 + 4)), 4.6)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    width = 0.84 / len(components)
    for i, component in enumerate(components):
        values = [l.components.get(component, 0.0) for l in layers]
        ax.bar(x - 0.42 + (i + 0.5) * width, values, width, label=component,
               color=OKABE_ITO[i % len(OKABE_ITO)])
    ax.set_xticks(x, [str(l.layer) for l in layers])
    _style(ax, "How much each layer changed, by component", "Layer", "‖ΔW‖_F (Frobenius norm)")
    fig.legend(ncols=min(len(components), 7), fontsize=9, frameon=False, loc="outside lower left")
    return _save(fig, path)


def qkvo_stacked(result: AnalysisResult, path: Path) -> Path | None:
    """Stacked bars: the attention roles' ‖ΔW‖_F per layer."""
    per_layer: dict[int, dict[str, float]] = {}
    for m in result.modules:
        role = attention_role(m)
        if role and m.layer is not None and math.isfinite(m.fro):
            roles = per_layer.setdefault(m.layer, {})
            roles[role] = roles.get(role, 0.0) + m.fro
    if not per_layer:
        return None
    layers = sorted(per_layer)
    present = [r for r in ROLE_ORDER if any(r in v for v in per_layer.values())]
    fig = _figure(max(8.0, min(20.0, 0.3 * len(layers) + 4)), 4.4)
    ax = fig.add_subplot()
    bottom = np.zeros(len(layers))
    for role in present:
        values = np.array([per_layer[l].get(role, 0.0) for l in layers])
        ax.bar([str(l) for l in layers], values, 0.75, bottom=bottom, label=ROLE_NAMES[role],
               color=ROLE_COLOURS[role])
        bottom += values
    _style(ax, "Inside attention: Q / K / V / O per layer (stacked)", "Layer", "‖ΔW‖_F, stacked")
    fig.legend(ncols=len(present), fontsize=9, frameon=False, loc="outside lower left")
    return _save(fig, path)


def group_shares(result: AnalysisResult, path: Path) -> Path | None:
    """Horizontal bars: each group's share of the summed ‖ΔW‖_F."""
    groups = {g: v for g, v in result.summary.group_fro.items() if v and math.isfinite(v)}
    total = sum(groups.values())
    if total <= 0:
        return None
    names = sorted(groups, key=lambda g: groups[g])
    fig = _figure(7.5, 0.6 * len(names) + 1.3)
    ax = fig.add_subplot()
    shares = [groups[g] / total for g in names]
    bars = ax.barh(names, shares, color=[GROUP_COLOURS.get(g, "#999999") for g in names])
    ax.bar_label(bars, [f"{s * 100:.1f}%  (Σ {fmt(groups[g])})" for s, g in zip(shares, names)],
                 padding=4, fontsize=9)
    ax.set_xlim(0, 1.3)  # room for the labels
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(lambda v, _: f"{v * 100:.0f}%")
    _style(ax, "Share of the change by group", "share of Σ ‖ΔW‖_F")
    ax.grid(axis="x", color="#e3e6ec", linewidth=0.8)
    return _save(fig, path)


def singular_value_spectra(result: AnalysisResult, path: Path) -> Path | None:
    """Small multiples: the singular values of the most-changed modules."""
    top = [m for m in _top_modules(result) if m.singular_values]
    if not top:
        return None
    cols = min(3, len(top))
    rows = math.ceil(len(top) / cols)
    fig = _figure(4.0 * cols, 2.8 * rows)
    fig.suptitle("Singular-value spectra of the most-changed modules", x=0.01, ha="left",
                 fontsize=12, fontweight="bold")
    for i, m in enumerate(top):
        ax = fig.add_subplot(rows, cols, i + 1)
        sv = np.asarray(m.singular_values[:64], dtype=float)
        ax.bar(np.arange(1, len(sv) + 1), sv, color="#0072B2")
        _style(ax, "", "index i", "σᵢ")
        ax.set_title(f"{m.name}\neff. rank {m.effective_rank:.1f} of {m.rank}", fontsize=9,
                     loc="left")
    return _save(fig, path)


def histogram(result: AnalysisResult, path: Path) -> Path | None:
    """ΔW entry histogram with zero, the mean and the ±1 std band marked."""
    h = result.histogram
    if not h.counts or len(h.bin_edges) != len(h.counts) + 1:
        return None
    edges = np.asarray(h.bin_edges, dtype=float)
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    if math.isfinite(h.std) and h.std > 0:
        ax.axvspan(h.mean - h.std, h.mean + h.std, color="#E69F00", alpha=0.15,
                   label=f"mean ± 1 std ({h.share_within_one_std * 100:.1f}% of entries)")
    ax.stairs(h.counts, edges, fill=True, color="#0072B2", label="ΔW entries")
    ax.axvline(0.0, color="#1d2330", linestyle="--", linewidth=1, label="zero")
    ax.axvline(h.mean, color="#D55E00", linewidth=1.8, label=f"mean {fmt(h.mean)}")
    # A tall peak hides the tails on a linear axis: switch to log when it dwarfs a typical bin.
    log = max(h.counts) > 50 * max(1, float(np.median([c for c in h.counts if c] or [1])))
    if log:
        ax.set_yscale("log")
    source = "exact" if h.exact else f"sampled: {h.sample_size or 0:,} entries"
    _style(ax, f"Distribution of ΔW entries ({source})", "ΔW entry value",
           "count (log scale)" if log else "count")
    ax.legend(fontsize=9, frameon=False)
    return _save(fig, path)


def heatmaps(result: AnalysisResult, path: Path) -> Path | None:
    """Grid of block-mean heatmaps for the most-changed modules that have one."""
    stored = {h.module: h for h in result.heatmaps}
    chosen = [stored[m.name] for m in sorted(result.modules, key=lambda m: -m.fro
                                             if math.isfinite(m.fro) else 0) if m.name in stored]
    chosen = chosen[:TOP_MODULES]
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(4.2 * cols, 3.8 * rows)
    fig.suptitle("ΔW heatmaps (block means): red = strengthened, blue = weakened", x=0.01,
                 ha="left", fontsize=12, fontweight="bold")
    for i, h in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = np.array([[np.nan if v is None else v for v in row] for row in h.values], float)
        vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_title(h.module, fontsize=9, loc="left")
        ax.set_xlabel(f"input blocks ({h.cols})", fontsize=8)
        ax.set_ylabel(f"output blocks ({h.rows})", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def top_neurons(result: AnalysisResult, path: Path) -> Path | None:
    """Horizontal bars of the most-shifted neurons, largest on top."""
    top = result.top_neurons[:20]
    if not top:
        return None
    components = _components(result)
    fig = _figure(8.5, 0.28 * len(top) + 1.4)
    ax = fig.add_subplot()
    labels = [f"L{t.layer} {t.component} #{t.index}" if t.layer is not None
              else f"{t.component} #{t.index}" for t in top][::-1]
    colours = [OKABE_ITO[components.index(t.component) % len(OKABE_ITO)]
               if t.component in components else "#999999" for t in top][::-1]
    ax.barh(labels, [t.shift for t in top][::-1], color=colours)
    ax.tick_params(axis="y", labelsize=8)
    _style(ax, "Top shifted neurons (L2 norm of the row of ΔW)", "shift")
    ax.grid(axis="x", color="#e3e6ec", linewidth=0.8)
    return _save(fig, path)


CHARTS = {
    "layers_by_component.png": layers_by_component,
    "qkvo_stacked.png": qkvo_stacked,
    "group_shares.png": group_shares,
    "singular_values.png": singular_value_spectra,
    "histogram.png": histogram,
    "heatmaps.png": heatmaps,
    "top_neurons.png": top_neurons,
}


def render_charts(result: AnalysisResult, out_dir: str | Path) -> list[Path]:
    """Write every chart that has data to out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [draw(result, out / name) for name, draw in CHARTS.items()]
    return [p for p in written if p is not None]

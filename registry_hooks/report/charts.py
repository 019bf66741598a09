"""PNG charts of an AnalysisResult, for the MLflow artifact view and for people without a browser.

Drawn with matplotlib's object API on the Agg canvas (no pyplot global state, safe in a worker
thread). Colours: Okabe-Ito for categories, ColorBrewer RdBu for signed heatmaps; both stay
distinguishable with the common colour-vision deficiencies. Margins are fixed in inches rather
than solved by a layout engine: a 224-module adapter's charts then take a fraction of the time.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tunelens.registry_hooks.engine.naming import ROLE_NAMES, ROLE_ORDER, role_of
from tunelens.registry_hooks.engine.result import AnalysisResult, ModuleMetrics
from tunelens.settings import AnalysisSettings

from .narrative import component_order, fmt

if TYPE_CHECKING:  # matplotlib is imported when a chart is drawn
    from matplotlib.figure import Figure

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000", "#999999"]
ROLE_COLOURS = {"Q": "#0072B2", "K": "#E69F00", "V": "#009E73", "O": "#CC79A7", "QKV": "#56B4E9"}
GROUP_COLOURS = {"attention": "#0072B2", "mlp": "#E69F00", "embedding": "#009E73", "other": "#999999"}
TOP_MODULES = 6  # modules shown in the spectra and heatmap charts: the largest ‖ΔW‖_F
# Components drawn as their own bar series; the rest share one "other" series. A MoE adapter has a
# component per expert (mlp.experts.17.w1): 600 series made the legend, and the time, explode.
MAX_COMPONENT_SERIES = 12
DPI = 110


def _figure(width: float, height: float, *, left: float = 0.9, right: float = 0.25,
            bottom: float = 0.7, top: float = 0.5, **grid):
    """A figure with margins given in inches (title on top, axis labels left and bottom).
    matplotlib is imported here, on the first chart: report.py reads this module's component
    choice without drawing, and a run without PNG charts never loads it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, **grid)
    return fig


def _style(ax, xlabel: str | None = None, ylabel: str | None = None) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e3e6ec", linewidth=0.8)
    ax.set_axisbelow(True)


def _title(fig: Figure, text: str) -> None:
    fig.suptitle(text, x=0.01, y=0.985, ha="left", va="top", fontsize=12, fontweight="bold")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _top_modules(result: AnalysisResult) -> list[ModuleMetrics]:
    finite = [m for m in result.modules if math.isfinite(m.fro)]
    return sorted(finite, key=lambda m: -m.fro)[:TOP_MODULES]


def chart_components(result: AnalysisResult) -> tuple[list[str], list[str]]:
    """(shown, folded): the MAX_COMPONENT_SERIES components with the largest Σ_ℓ ‖ΔW‖_F, in reading
    order, and the others, which charts draw as one summed "other" series."""
    components = component_order(result)
    if len(components) <= MAX_COMPONENT_SERIES:
        return components, []
    totals = dict.fromkeys(components, 0.0)
    for layer in result.layers:
        for component, fro in layer.components.items():
            if component in totals and math.isfinite(fro):
                totals[component] += fro
    kept = set(sorted(components, key=lambda c: -totals[c])[:MAX_COMPONENT_SERIES])
    return [c for c in components if c in kept], [c for c in components if c not in kept]


def _legend_below(fig: Figure, ax) -> None:
    """The legend in rows under the x-axis label, as many entries a row as the width allows."""
    handles, labels = ax.get_legend_handles_labels()
    per_row = max(1, int(fig.get_figwidth() // 1.9))
    fig.legend(handles, labels, ncols=min(len(labels), per_row), fontsize=9, frameon=False,
               loc="lower left", bbox_to_anchor=(0.01, 0.0))


def layers_by_component(result: AnalysisResult, path: Path) -> Path | None:
    """Grouped bars: ‖ΔW‖_F per layer, one bar per component (past MAX_COMPONENT_SERIES, the
    smaller components summed into one "other" bar)."""
    layers = sorted(result.layers, key=lambda l: l.layer)
    shown, folded = chart_components(result)
    if not layers or not shown:
        return None
    series = [(c, [l.components.get(c, 0.0) for l in layers], OKABE_ITO[i % len(OKABE_ITO)])
              for i, c in enumerate(shown)]
    if folded:
        others = [sum(l.components.get(c, 0.0) for c in folded) for l in layers]
        series.append((f"{len(folded)} other components (summed)", others, "#bbbbbb"))
    width = max(8.0, min(20.0, 0.32 * len(layers) * len(series) ** 0.5 + 4))
    legend_rows = math.ceil(len(series) / max(1, int(width // 1.9)))
    fig = _figure(width, 4.4 + 0.25 * legend_rows, bottom=0.75 + 0.25 * legend_rows)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    bar_width = 0.84 / len(series)
    for i, (label, values, colour) in enumerate(series):
        ax.bar(x - 0.42 + (i + 0.5) * bar_width, values, bar_width, label=label, color=colour)
    every = math.ceil(len(layers) / 48)  # at most 48 labels: each one is a text to lay out
    ax.set_xticks(x[::every], [str(l.layer) for l in layers[::every]])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    _style(ax, "Layer", "‖ΔW‖_F (Frobenius norm)")
    _title(fig, "How much each layer changed, by component")
    _legend_below(fig, ax)
    return _save(fig, path)


def qkvo_stacked(result: AnalysisResult, path: Path) -> Path | None:
    """Stacked bars: the attention roles' ‖ΔW‖_F per layer."""
    per_layer: dict[int, dict[str, float]] = {}
    for m in result.modules:
        role = role_of(m)
        if role and m.layer is not None and math.isfinite(m.fro):
            roles = per_layer.setdefault(m.layer, {})
            roles[role] = roles.get(role, 0.0) + m.fro
    if not per_layer:
        return None
    layers = sorted(per_layer)
    present = [r for r in ROLE_ORDER if any(r in v for v in per_layer.values())]
    fig = _figure(max(8.0, min(20.0, 0.3 * len(layers) + 4)), 4.6, bottom=1.0)
    ax = fig.add_subplot()
    bottom = np.zeros(len(layers))
    for role in present:
        values = np.array([per_layer[l].get(role, 0.0) for l in layers])
        ax.bar([str(l) for l in layers], values, 0.75, bottom=bottom, label=ROLE_NAMES[role],
               color=ROLE_COLOURS[role])
        bottom += values
    _style(ax, "Layer", "‖ΔW‖_F, stacked")
    _title(fig, "Inside attention: Q / K / V / O per layer (stacked)")
    _legend_below(fig, ax)
    return _save(fig, path)


def group_shares(result: AnalysisResult, path: Path) -> Path | None:
    """Horizontal bars: each group's share of the summed ‖ΔW‖_F."""
    groups = {g: v for g, v in result.summary.group_fro.items() if v and math.isfinite(v)}
    total = sum(groups.values())
    if len(groups) < 2 or total <= 0:  # one group is 100%: nothing to compare
        return None
    names = sorted(groups, key=lambda g: groups[g])
    fig = _figure(7.5, 0.55 * len(names) + 1.4, left=1.1)
    ax = fig.add_subplot()
    shares = [groups[g] / total for g in names]
    bars = ax.barh(names, shares, color=[GROUP_COLOURS.get(g, "#999999") for g in names])
    ax.bar_label(bars, [f"{s * 100:.1f}%  (Σ {fmt(groups[g])})" for s, g in zip(shares, names)],
                 padding=4, fontsize=9)
    ax.set_xlim(0, 1.3)  # room for the labels
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(lambda v, _: f"{v * 100:.0f}%")
    _style(ax, "share of Σ ‖ΔW‖_F")
    ax.grid(axis="x", color="#e3e6ec", linewidth=0.8)
    _title(fig, "Share of the change by group")
    return _save(fig, path)


def singular_value_spectra(result: AnalysisResult, path: Path) -> Path | None:
    """The most-changed modules' singular values, each relative to its largest, on one axis."""
    top = [m for m in _top_modules(result) if m.singular_values and m.singular_values[0]]
    if not top:
        return None
    fig = _figure(9.0, 4.4, right=3.6)
    ax = fig.add_subplot()
    for i, m in enumerate(top):
        sv = np.asarray(m.singular_values[:64], dtype=float)
        ax.plot(np.arange(1, len(sv) + 1), sv / sv[0], marker="o", markersize=4,
                color=OKABE_ITO[i % len(OKABE_ITO)],
                label=f"{m.name}\n  σ₁ {fmt(m.spectral)} · eff. rank {m.effective_rank:.1f} of {m.rank}")
    ax.set_ylim(0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _style(ax, "index i (strongest direction first)", "σᵢ / σ₁")
    _title(fig, "Singular-value spectra of the most-changed modules")
    ax.legend(fontsize=7.5, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
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
    _style(ax, "ΔW entry value", "count (log scale)" if log else "count")
    _title(fig, f"Distribution of ΔW entries ({source})")
    ax.legend(fontsize=9, frameon=False)
    return _save(fig, path)


def heatmaps(result: AnalysisResult, path: Path) -> Path | None:
    """Block-mean heatmaps of the most-changed modules, each scaled to its own max |value|."""
    stored = {h.module: h for h in result.heatmaps}
    chosen = [stored[m.name] for m in _top_modules(result) if m.name in stored]
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = _figure(3.6 * cols + 1.0, 3.5 * rows + 0.5, left=0.5, right=1.2, bottom=0.45, top=0.8,
                  wspace=0.25, hspace=0.45)
    _title(fig, "ΔW heatmaps (block means): red = strengthened, blue = weakened")
    image = None
    for i, h in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = np.array([[np.nan if v is None else v for v in row] for row in h.values], float)
        vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
        image = ax.imshow(values / (vmax or 1.0), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                          interpolation="nearest")
        ax.set_title(f"{h.module}\nmax |block mean| {fmt(vmax)}", fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"inputs ({h.cols} blocks)", fontsize=8)
        ax.set_ylabel(f"outputs ({h.rows} blocks)", fontsize=8)
    bar = fig.colorbar(image, ax=fig.axes, shrink=0.6, pad=0.02)
    bar.set_label("block mean ÷ that module's max |block mean|", fontsize=8)
    return _save(fig, path)


def top_neurons(result: AnalysisResult, path: Path, limit: int | None = None) -> Path | None:
    """Horizontal bars of the `limit` most-shifted neurons (None: all the result keeps), largest
    on top."""
    top = result.top_neurons[:limit]
    if not top:
        return None
    components = component_order(result)
    fig = _figure(8.5, 0.26 * len(top) + 1.3, left=2.6)
    ax = fig.add_subplot()
    labels = [f"L{t.layer} {t.component} #{t.index}" if t.layer is not None
              else f"{t.component} #{t.index}" for t in top][::-1]
    colours = [OKABE_ITO[components.index(t.component) % len(OKABE_ITO)]
               if t.component in components else "#999999" for t in top][::-1]
    ax.barh(labels, [t.shift for t in top][::-1], color=colours)
    ax.tick_params(axis="y", labelsize=8)
    _style(ax, "shift = ‖ΔW[i, :]‖₂")
    ax.grid(axis="x", color="#e3e6ec", linewidth=0.8)
    _title(fig, "Top shifted neurons")
    return _save(fig, path)


def experts(result: AnalysisResult, path: Path) -> Path | None:
    """MoE layers × experts coloured by Σ‖ΔW_e‖_F over the adapted expert matrices."""
    summary = result.experts
    if summary is None or not summary.layers:
        return None
    grid = np.array([[np.nan if v is None else v for v in layer.fro_by_expert]
                     for layer in summary.layers], float)
    fig = _figure(10, min(9.0, 1.4 + 0.16 * len(summary.layers)), left=0.8, right=1.3, bottom=0.6)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest", vmin=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ticks = list(range(0, len(summary.layers), max(1, math.ceil(len(summary.layers) / 24))))
    ax.set_yticks(ticks, [str(summary.layers[i].layer) for i in ticks])
    _style(ax, "expert", "layer")
    ax.grid(False)
    fig.colorbar(image, ax=ax, pad=0.02).set_label("Σ ‖ΔW_e‖_F")
    _title(fig, f"Which experts moved: top {summary.top_k} per layer hold "
                f"{summary.top_share:.0%} of the change (uniform: {summary.uniform_share:.0%})")
    return _save(fig, path)


CHARTS = {
    "layers_by_component.png": layers_by_component,
    "qkvo_stacked.png": qkvo_stacked,
    "group_shares.png": group_shares,
    "singular_values.png": singular_value_spectra,
    "histogram.png": histogram,
    "heatmaps.png": heatmaps,
    "top_neurons.png": top_neurons,
    "experts.png": experts,
}


def render_charts(result: AnalysisResult, out_dir: str | Path,
                  settings: AnalysisSettings | None = None) -> list[Path]:
    """Write every chart that has data to out_dir, to the limits of `settings` (None: the result's
    own lists); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draws = {**CHARTS, "top_neurons.png": partial(
        top_neurons, limit=settings.top_neurons if settings else None)}
    written = [draw(result, out / name) for name, draw in draws.items()]
    return [p for p in written if p is not None]

"""How the perplexity and activation-drift results are shown and logged: PNG charts for MLflow's
artifact view, an inline-SVG section of side_by_side.html (no external URL, no image source), the
per-text table and the drift profile as run artifacts."""
from __future__ import annotations

import io
import math

from markupsafe import Markup

from tunelens.evaluators.texts.drift import DRIFT_CHART, DRIFT_FILE, DriftProfile
from tunelens.evaluators.texts.perplexity import CURVES_FILE, TEXTS_TABLE_FILE, TextResults
from tunelens.evaluators.pages.report import PAGES

SVG_W, SVG_H, PAD = 420, 170, 34


def _scale(values, low, high, size, flip=False):
    span = (high - low) or 1.0
    return [(size - PAD if flip else PAD) + (-1 if flip else 1) * (v - low) / span * (size - 2 * PAD)
            for v in values]


def _svg_curve(curve) -> dict:
    """Polyline and band polygon points of one cumulative delta curve, in SVG pixels."""
    n = len(curve.mean)
    xs = _scale(range(n), 0, max(n - 1, 1), SVG_W)
    low = float(min(curve.low.min(), 0.0)) if n else 0.0
    high = float(max(curve.high.max(), 0.0)) if n else 1.0
    line = _scale(curve.mean, low, high, SVG_H, flip=True)
    band_low = _scale(curve.low, low, high, SVG_H, flip=True)
    band_high = _scale(curve.high, low, high, SVG_H, flip=True)
    zero = _scale([0.0], low, high, SVG_H, flip=True)[0]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, line))
    band = " ".join(f"{x:.1f},{y:.1f}" for x, y in [*zip(xs, band_high),
                                                     *reversed(list(zip(xs, band_low)))])
    return {"line": pts, "band": band, "zero": f"{zero:.1f}", "low": low, "high": high,
            "positions": n}


def _svg_drift(drift: DriftProfile) -> dict:
    """Bars of S_ℓ (scaled to their maximum) and the relative-change line, per layer."""
    count = len(drift.relative_change)
    width = (SVG_W - 2 * PAD) / max(count, 1)
    top_w = max(drift.weight_delta.values(), default=0.0) or 1.0
    top_r = max(drift.relative_change) or 1.0
    bars = [{"x": f"{PAD + i * width + width * 0.15:.1f}", "w": f"{width * 0.7:.1f}",
             "y": f"{SVG_H - PAD - drift.weight_delta.get(i, 0.0) / top_w * (SVG_H - 2 * PAD):.1f}",
             "h": f"{drift.weight_delta.get(i, 0.0) / top_w * (SVG_H - 2 * PAD):.1f}"}
            for i in range(count)]
    line = " ".join(f"{PAD + (i + 0.5) * width:.1f},"
                    f"{SVG_H - PAD - r / top_r * (SVG_H - 2 * PAD):.1f}"
                    for i, r in enumerate(drift.relative_change))
    return {"bars": bars, "line": line, "top_w": top_w, "top_r": top_r}


def html_section(results: TextResults | None) -> Markup:
    """The perplexity and drift section of side_by_side.html (empty without text groups)."""
    if results is None:
        return Markup("")
    curves = [{"reference": reference, "group": c.group, "guard": c.guard,
               "ppl": (c.ppl_reference, c.ppl_other), "delta": c.delta, "p": c.wilcoxon_p,
               "constant": c.constant, "svg": _svg_curve(c.curve)}
              for reference, comparisons in results.comparisons.items() for c in comparisons]
    drift = results.drift
    return Markup(PAGES.get_template("texts_section.html").render(
        curves=curves, width=SVG_W, height=SVG_H, pad=PAD, notes=results.notes,
        ppl=results.metrics, labels=list(results.logprobs), groups=results.plan.groups,
        drift=drift, drift_svg=_svg_drift(drift) if drift else None, isnan=math.isnan))


def _curves_png(results: TextResults) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results.plan.groups
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for reference, comparisons in results.comparisons.items():
            curve = next(c for c in comparisons if c.group == group.name).curve
            x = range(1, len(curve.mean) + 1)
            ax.plot(x, curve.mean, label=f"finetuned - {reference}")
            ax.fill_between(x, curve.low, curve.high, alpha=0.25)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{group.name}{' (guard)' if group.guard else ''}")
        ax.set_xlabel("token position")
        ax.set_ylabel("cumulative Δ NLL (nats)")
        ax.legend(fontsize=8)
    fig.suptitle("Cumulative per-token NLL change (below 0: the fine-tune is less surprised)",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _drift_png(drift: DriftProfile) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = list(range(len(drift.relative_change)))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.bar(layers, [drift.weight_delta.get(i, 0.0) for i in layers], color="#c9d6f2",
           label="S_ℓ = Σ ‖ΔW‖_F (weights)")
    ax.set_xlabel("layer")
    ax.set_ylabel("Σ ‖ΔW‖_F")
    twin = ax.twinx()
    twin.plot(layers, drift.relative_change, "o-", color="#d1495b",
              label="‖h_ft − h_base‖ / ‖h_base‖")
    twin.plot(layers, [1 - c for c in drift.cosine], "s--", color="#2e4057",
              label="1 − cos(h_ft, h_base)")
    twin.set_ylabel("activation drift")
    twin.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    ax.set_title(f"Weights moved vs behaviour diverged ({drift.texts} texts, {drift.tokens} "
                 "tokens)", fontsize=10)
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def log_text_results(client, run_id: str, results: TextResults | None,
                     folder: str = "tunelens") -> None:
    """The per-text table, the curves and the drift chart and profile, to the run, under `folder`
    (a comparison gives each candidate a folder of its own)."""
    if results is None:
        return

    def under(name: str) -> str:
        return f"{folder}/{name.split('/', 1)[1]}"

    import tempfile
    from pathlib import Path

    from mlflow.entities import Param

    plan = results.plan
    params = {"tunelens.texts.groups": ",".join(f"{g.name}={g.source}" for g in plan.groups),
              "tunelens.texts.guard": ",".join(g.name for g in plan.groups if g.guard),
              "tunelens.texts.margin": plan.margin, "tunelens.texts.max_tokens": plan.max_tokens,
              "tunelens.texts.drift_texts": plan.drift_texts}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_table(run_id, data=results.table, artifact_file=under(TEXTS_TABLE_FILE))
    files = {under(CURVES_FILE): _curves_png(results)} if results.comparisons else {}
    if results.drift is not None:
        files[under(DRIFT_CHART)] = _drift_png(results.drift)
        client.log_dict(run_id, results.drift.to_dict(), under(DRIFT_FILE))
    with tempfile.TemporaryDirectory(prefix="tunelens-texts-") as work:
        for name, data in files.items():
            path = Path(work) / Path(name).name
            path.write_bytes(data)
            client.log_artifact(run_id, str(path), str(Path(name).parent))

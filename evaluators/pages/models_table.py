"""The comparison page's "models side by side" table: one column per model, one row per question a
reader asks before choosing (does it chat, explain, over-correct, how long are its answers, how
fast and how big is it as served, what is it suited for), each cell in words with its figure."""
from __future__ import annotations

from dataclasses import dataclass

# The grammar profile's rates: (metric, row name); computed only with evaluation.task_profile: grammar
BEHAVIOUR_ROWS = (("preamble_rate", "adds a preamble"), ("explanation_rate", "explains"),
                  ("over_correction_rate", "over-corrects"))
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class ModelColumn:
    """One model of the table: its label, its base's label (itself for a base) and what the
    comparison says it is suited for."""

    label: str
    base_label: str
    suited_for: str


@dataclass(frozen=True)
class ModelsTable:
    labels: list[str]
    rows: list[tuple[str, list[str]]]  # (what the row asks, one cell per model)


def _rate(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.0%} of answers"


def _length(metrics: dict[str, float], column: ModelColumn) -> str:
    """"3.0x the expected answer (1.8x its base)": Σ output words / Σ target words, and mean words
    against its base's."""
    expected = metrics.get(f"{column.label}/words_vs_target")
    text = NOT_MEASURED if expected is None else f"{expected:.1f}x the expected answer"
    words, base_words = (metrics.get(f"{label}/mean_words")
                         for label in (column.label, column.base_label))
    if column.label != column.base_label and words is not None and base_words:
        text += f" ({words / base_words:.1f}x its base)"
    return text


def _speed(metrics: dict[str, float], label: str) -> str:
    p50, p95 = (metrics.get(f"{label}/served_latency_ms_{q}") for q in ("p50", "p95"))
    if p50 is None or p95 is None:
        return NOT_MEASURED
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms per request as served"


def _memory(metrics: dict[str, float], label: str) -> str:
    total = metrics.get(f"{label}/memory_total_gib")
    return NOT_MEASURED if total is None else f"{total:.3g} GiB as served"


def models_side_by_side(columns: list[ModelColumn], metrics: dict[str, float]) -> ModelsTable:
    """The table from the per-model metrics (`<label>/<metric>`); the grammar profile's rows only
    when some model has them."""
    labels = [c.label for c in columns]
    rows = [(name, [_rate(metrics.get(f"{label}/{metric}")) for label in labels])
            for metric, name in BEHAVIOUR_ROWS
            if any(f"{label}/{metric}" in metrics for label in labels)]
    rows += [("output length (vs expected)", [_length(metrics, c) for c in columns]),
             ("speed", [_speed(metrics, label) for label in labels]),
             ("memory", [_memory(metrics, label) for label in labels]),
             ("suited for", [c.suited_for for c in columns])]
    return ModelsTable(labels, rows)

"""Quality metrics, one score per row and model: built-ins and MLflow `extra_metrics`.

Every metric gives a per-row array so that two models can be compared row by row (the verdict's
paired tests need the pairing). Built-ins: `exact_match` (HF evaluate's semantics, binary),
`token_f1` (unigram F1, rouge-score's ROUGE-1 F-measure: lowercased alphanumeric tokens, clipped
counts), `chrf` (sacrebleu's sentence chrF, as a share 0-1) and `rouge_l` (rouge-score's ROUGE-L
F-measure, longest common subsequence). An MLflow metric made with `mlflow.metrics.make_metric`
joins them when its `eval_fn` returns per-row `scores`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from tunelens.errors import TunelensError

from tunelens.evaluators.scoring.metrics import exact_match
from tunelens.settings import ExactMatchSettings

BUILTIN_METRICS = ("exact_match", "token_f1", "chrf", "rouge_l")
# Arguments tunelens can give an MLflow metric's eval_fn, by parameter name.
_EVAL_FN_ARGUMENTS = ("predictions", "targets", "metrics", "inputs")


@dataclass(frozen=True)
class QualityMetric:
    """A per-row quality score: `score(predictions, targets, inputs)` -> one value per row."""

    name: str
    greater_is_better: bool
    score: Callable[[list[str], list[str], list[str]], np.ndarray]
    source: str  # "built-in" or "extra_metrics"

    def per_row(self, predictions: list[str], targets: list[str], inputs: list[str]) -> np.ndarray:
        values = np.asarray(self.score(predictions, targets, inputs), dtype=np.float64)
        if values.shape != (len(predictions),) or not np.all(np.isfinite(values)):
            raise TunelensError(f"metric {self.name!r} must give one finite score per row "
                                f"({len(predictions)} rows), got shape {values.shape}")
        return values


def is_binary(*arrays: np.ndarray) -> bool:
    """True when every per-row value is 0 or 1: then the exact McNemar test fits."""
    return all(np.isin(a, (0.0, 1.0)).all() for a in arrays)


def _rouge(kind: str) -> Callable:
    def score(predictions, targets, inputs):
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer([kind], use_stemmer=False)
        return np.array([scorer.score(t, p)[kind].fmeasure for p, t in zip(predictions, targets)])
    return score


def _chrf(predictions, targets, inputs):
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return np.array([chrf.sentence_score(p, [t]).score / 100 for p, t in zip(predictions, targets)])


def builtin_metric(name: str, exact_match_options: ExactMatchSettings) -> QualityMetric:
    """One of BUILTIN_METRICS, exact match with conf.yaml's evaluation.exact_match options."""
    scorers = {
        "exact_match": lambda p, t, i: exact_match(p, t, **exact_match_options.model_dump()).astype(float),
        "token_f1": _rouge("rouge1"),
        "chrf": _chrf,
        "rouge_l": _rouge("rougeL"),
    }
    if name not in scorers:
        raise TunelensError(f"unknown quality metric {name!r}: built-ins are "
                            f"{', '.join(BUILTIN_METRICS)}, or pass it in extra_metrics")
    return QualityMetric(name, True, scorers[name], "built-in")


def from_mlflow(metric) -> QualityMetric:
    """An `mlflow.metrics.make_metric` metric; its eval_fn must return MetricValue(scores=...)."""
    from mlflow.metrics.base import MetricValue

    name = getattr(metric, "name", None)
    eval_fn = getattr(metric, "eval_fn", None)
    if not name or eval_fn is None:
        raise TunelensError(f"extra_metrics holds {metric!r}, not a metric made with "
                            "mlflow.metrics.make_metric")
    parameters = inspect.signature(eval_fn).parameters
    unknown = [p.name for p in parameters.values() if p.name not in _EVAL_FN_ARGUMENTS
               and p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if unknown:
        raise TunelensError(f"metric {name!r} asks for {unknown}: tunelens gives an eval_fn "
                            f"{', '.join(_EVAL_FN_ARGUMENTS)}")

    def score(predictions, targets, inputs):
        given = {"predictions": pd.Series(predictions), "targets": pd.Series(targets),
                 "metrics": {}, "inputs": pd.Series(inputs)}
        value = eval_fn(*(given[p] for p in parameters if p in given))
        if not isinstance(value, MetricValue) or value.scores is None:
            raise TunelensError(f"metric {name!r} returned no per-row scores (MetricValue(scores="
                                "[...])): the paired comparison needs one score per row")
        return np.asarray(value.scores, dtype=np.float64)

    return QualityMetric(name, bool(metric.greater_is_better), score, "extra_metrics")


def quality_metrics(names: list[str], exact_match_options: ExactMatchSettings, extra_metrics=(),
                    primary: str = "exact_match") -> list[QualityMetric]:
    """The built-ins named in conf.yaml, then every extra metric; `primary` must be among them."""
    metrics = [builtin_metric(name, exact_match_options) for name in names]
    metrics += [from_mlflow(m) for m in extra_metrics or ()]
    seen = [m.name for m in metrics]
    if len(set(seen)) != len(seen):
        raise TunelensError(f"quality metric names must be unique, got {seen}")
    if primary not in seen:
        if primary in BUILTIN_METRICS:
            metrics.append(builtin_metric(primary, exact_match_options))
        else:
            raise TunelensError(f"primary metric {primary!r} is neither a built-in "
                                f"({', '.join(BUILTIN_METRICS)}) nor in extra_metrics "
                                f"({', '.join(seen) or 'none given'})")
    return metrics

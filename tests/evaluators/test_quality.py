"""Quality metrics per row (built-ins from rouge-score and sacrebleu, MLflow extra_metrics) and the
paired test each kind of score gets in the verdict."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow.metrics import MetricValue, make_metric

from tunelens.config import load_config
from tunelens.errors import TunelensError
from tunelens.evaluators.scoring.quality import builtin_metric, from_mlflow, quality_metrics
from tunelens.evaluators.scoring.stats import ModelScores, QualityMetricInfo, compare_paired
from tunelens.evaluators.verdict import (Decision, HolderCoverage, combine, decide, decide_part)

OPTIONS = load_config().evaluation.exact_match


def per_row(name, predictions, targets):
    return builtin_metric(name, OPTIONS).per_row(predictions, targets, [""] * len(targets))


def test_builtin_metrics_score_each_row():
    predictions = ["the cat sat", "the cat sat on the mat", "dog", ""]
    targets = ["the cat sat on the mat"] * 3 + ["x"]
    assert per_row("exact_match", predictions, targets).tolist() == [0, 1, 0, 0]
    # unigram F1: precision 3/3, recall 3/6
    assert per_row("token_f1", predictions, targets) == pytest.approx([2 / 3, 1, 0, 0])
    # LCS of 3 words: the same as F1 here; word order matters for ROUGE-L only
    assert per_row("rouge_l", predictions, targets) == pytest.approx([2 / 3, 1, 0, 0])
    assert per_row("rouge_l", ["mat the on sat cat the"], ["the cat sat on the mat"])[0] < \
        per_row("token_f1", ["mat the on sat cat the"], ["the cat sat on the mat"])[0]
    chrf = per_row("chrf", predictions, targets)
    assert chrf[1] == pytest.approx(1.0) and 0 < chrf[0] < 1 and chrf[3] == 0


def test_unknown_metric_or_primary_is_one_clear_error():
    with pytest.raises(TunelensError, match="unknown quality metric 'bleu'"):
        quality_metrics(["bleu"], OPTIONS)
    with pytest.raises(TunelensError, match="primary metric 'nope' is neither"):
        quality_metrics(["exact_match"], OPTIONS, primary="nope")
    assert [m.name for m in quality_metrics(["exact_match"], OPTIONS, primary="chrf")] == [
        "exact_match", "chrf"]


def test_mlflow_metric_gives_per_row_scores_and_refuses_aggregates():
    def length_gap(predictions, targets):
        return MetricValue(scores=[abs(len(p) - len(t)) for p, t in zip(predictions, targets)])

    metric = from_mlflow(make_metric(eval_fn=length_gap, greater_is_better=False,
                                     name="length_gap"))
    assert metric.greater_is_better is False and metric.source == "extra_metrics"
    assert metric.per_row(["ab", "abcd"], ["abc", "abc"], ["", ""]).tolist() == [1, 1]

    aggregate_only = from_mlflow(make_metric(
        eval_fn=lambda predictions, targets: MetricValue(aggregate_results={"mean": 1.0}),
        greater_is_better=True, name="overall"))
    with pytest.raises(TunelensError, match="no per-row scores"):
        aggregate_only.per_row(["a"], ["a"], ["x"])
    needs_more = make_metric(eval_fn=lambda predictions, context: 1.0, greater_is_better=True,
                             name="ctx")
    with pytest.raises(TunelensError, match=r"asks for \['context'\]"):
        from_mlflow(needs_more)


def continuous(base, other, greater_is_better=True, n=200):
    words = np.full(n, 10)
    return compare_paired(ModelScores("base", base, words), ModelScores("ft", other, words),
                          load_config(), metric=QualityMetricInfo("token_f1", greater_is_better))


def test_continuous_scores_get_the_paired_bca_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, 200)
    better = np.clip(base + rng.normal(0.1, 0.05, 200), 0, 1)
    comparison = continuous(base, better)
    assert not comparison.binary and comparison.mcnemar is None and comparison.power is None
    assert comparison.test_name == "paired BCa bootstrap"
    assert comparison.quality_delta.low > 0.08 and comparison.quality_delta.high < 0.12
    verdict = decide(comparison, load_config())
    assert verdict.rules[0].name == "token_f1" and verdict.rules[0].passed is True
    assert "significant gain (paired BCa bootstrap" in verdict.rules[0].detail
    assert "delta/token_f1_ci_low" in comparison.metrics() and \
        "delta/mcnemar_p_value" not in comparison.metrics()
    worse = decide(continuous(base, np.clip(base - rng.normal(0.1, 0.05, 200), 0, 1)),
                   load_config())
    assert worse.rules[0].passed is False and worse.decision is Decision.REJECT
    # lower is better: the same drop is now a gain
    flipped = decide(continuous(base, np.clip(base - rng.normal(0.1, 0.05, 200), 0, 1), False),
                     load_config())
    assert flipped.rules[0].passed is True


def test_a_constant_difference_leaves_the_bootstrap_nothing_to_measure():
    base = np.linspace(0.1, 0.5, 20)
    comparison = continuous(base, base + 0.05, n=20)
    assert np.isnan(comparison.quality_delta.low)
    verdict = decide(comparison, load_config())
    assert verdict.rules[0].passed is None and verdict.decision is Decision.INCONCLUSIVE
    assert "cannot measure the spread" in verdict.warnings[0]


def test_promote_needs_both_parts_and_the_reasons_name_the_deciding_one():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.4, 200)
    holder = np.clip(base + 0.3 + rng.normal(0, 0.03, 200), 0, 1)
    candidate = np.clip(base + 0.1 + rng.normal(0, 0.03, 200), 0, 1)
    vs_base = decide_part(continuous(base, candidate), load_config(), against="base")
    vs_holder = decide_part(continuous(holder, candidate), load_config(), against="holder")
    assert vs_base.decision is Decision.PROMOTE and vs_holder.decision is Decision.REJECT
    verdict = combine("finetuned", 200, [vs_base, vs_holder], HolderCoverage("production", "4"))
    assert verdict.decision is Decision.REJECT
    assert verdict.reasons.startswith(
        "REJECT finetuned on 200 rows, decided by vs holder production=v4 | ")
    assert "[vs holder production=v4 REJECT] token_f1 FAIL" in verdict.reasons
    assert verdict.to_dict()["holder"] == {"alias": "production", "version": "4"}
    both = combine("finetuned", 200, [vs_base, decide_part(continuous(candidate, holder),
                                                           load_config(), against="holder")])
    assert both.decision is Decision.PROMOTE
    assert HolderCoverage.from_tag("production=none") == HolderCoverage("production", None)
    assert HolderCoverage.from_tag(None) is None

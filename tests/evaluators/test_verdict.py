"""The verdict policy: every rule's pass / fail / undecided branch, on comparisons of real score arrays."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException

from test_stats import paired_rows
from tunelens.config import ConfigError, load_config
from tunelens.evaluators.scoring.stats import ModelScores, compare_paired
from tunelens.evaluators.verdict import (Decision, RuleOutcome, decide, metric_thresholds,
                                         unmeasured)
from tunelens.registry.verdicts import HolderCoverage

# 1000 rows, the models disagree on 2 of them, one each way: non-inferior within 2 points
CLOSE_ON_1000_ROWS = (500, 1, 1, 498)


def pair(both, base_only, other_only, neither, *, base_words=None, other_words=None,
         config=None):
    """Compare two models whose exact match follows the 2x2 table; words default to equal."""
    base_exact, other_exact = paired_rows(both, base_only, other_only, neither)
    words = np.arange(base_exact.size) % 7 + 5
    base = ModelScores("base", base_exact, words if base_words is None else base_words)
    other = ModelScores("v2", other_exact, words if other_words is None else other_words)
    return compare_paired(base, other, config or load_config())


def rule(verdict, name):
    return next(r for r in verdict.rules if r.name == name)


def user_config(tmp_path, text):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_config(path)


def test_significant_gain_on_ten_rows_promotes():
    rng = np.random.default_rng(0)
    comparison = pair(1, 0, 6, 3, base_words=rng.integers(35, 55, 10),
                      other_words=rng.integers(12, 20, 10))
    verdict = decide(comparison, load_config())
    assert verdict.decision is Decision.PROMOTE
    exact = rule(verdict, "exact_match")
    assert exact.passed is True and "significant gain" in exact.detail
    assert exact.observed == pytest.approx(0.6) and exact.threshold == -0.02
    assert all(r.passed is True for r in verdict.rules)
    # no conciseness rule by default, and latency and memory only as served (none given here)
    assert {r.name for r in verdict.rules} == {"exact_match"}
    assert verdict.reasons.startswith("PROMOTE v2 on 10 rows, vs base pass")
    assert [part.against for part in verdict.parts] == ["base"]
    assert "\n" not in verdict.reasons


def test_non_inferior_on_enough_rows_promotes_without_a_significant_gain():
    verdict = decide(pair(*CLOSE_ON_1000_ROWS), load_config())
    exact = rule(verdict, "exact_match")
    assert exact.passed is True and "non-inferior" in exact.detail
    assert verdict.decision is Decision.PROMOTE
    assert verdict.warnings == []


def test_models_that_never_disagree_on_few_rows_are_not_called_non_inferior():
    """Zero discordant rows in 30: the bootstrap says [0, 0], the score interval -0.11 to +0.11."""
    comparison = pair(15, 0, 0, 15)
    assert (comparison.quality_delta.low, comparison.quality_delta.high) == (0, 0)
    verdict = decide(comparison, load_config())
    assert rule(verdict, "exact_match").passed is None
    assert verdict.decision is Decision.INCONCLUSIVE
    assert "only 0 rows where the models disagree" in verdict.warnings[0]
    # -0.006 on 600 rows
    assert decide(pair(300, 0, 0, 300), load_config()).decision is Decision.PROMOTE


def test_too_few_rows_is_inconclusive_with_the_power_note():
    comparison = pair(2, 1, 2, 3)
    verdict = decide(comparison, load_config())
    assert verdict.decision is Decision.INCONCLUSIVE
    assert rule(verdict, "exact_match").passed is None
    assert "CIs reach below -0.02" in rule(verdict, "exact_match").detail
    assert verdict.warnings == [comparison.warning]
    assert "needs at least 6" in verdict.reasons


def test_interval_straddling_the_margin_is_inconclusive_and_a_wider_margin_promotes(tmp_path):
    verdict = decide(pair(40, 5, 3, 52), load_config())
    assert verdict.decision is Decision.INCONCLUSIVE
    assert "CIs reach below -0.02" in rule(verdict, "exact_match").detail
    lenient = user_config(tmp_path, "verdict:\n  noninferiority_margin: 0.1\n")
    assert decide(pair(40, 5, 3, 52, config=lenient), lenient).decision is Decision.PROMOTE


def test_significant_loss_rejects():
    verdict = decide(pair(20, 12, 2, 6), load_config())
    exact = rule(verdict, "exact_match")
    assert exact.passed is False and "significant loss" in exact.detail
    assert verdict.decision is Decision.REJECT
    assert verdict.reasons.split(" | ")[0] == "REJECT v2 on 40 rows, decided by vs base"
    assert verdict.reasons.split(" | ")[1].startswith("[vs base REJECT] exact_match FAIL")


def test_wordier_outputs_pass_by_default_and_a_relative_limit_or_the_grammar_profile_rejects(
        tmp_path):
    words = np.arange(1000) % 7 + 5
    comparison = pair(*CLOSE_ON_1000_ROWS, base_words=words, other_words=words + 3)
    default = decide(comparison, load_config())
    assert "mean_words_ratio" not in {r.name for r in default.rules}
    assert default.decision is Decision.PROMOTE
    # words grew by about 38 %: within a limit of +50 %, beyond one of +20 %
    generous = user_config(tmp_path, "verdict:\n  max_mean_words_ratio: 1.5\n")
    assert rule(decide(comparison, generous), "mean_words_ratio").passed is True
    strict = user_config(tmp_path, "verdict:\n  max_mean_words_ratio: 1.2\n")
    assert rule(decide(comparison, strict), "mean_words_ratio").passed is False
    assert decide(comparison, strict).decision is Decision.REJECT
    grammar = user_config(tmp_path, "evaluation:\n  task_profile: grammar\n")
    words_rule = rule(decide(comparison, grammar), "mean_words_ratio")
    assert words_rule.threshold == 1.0 and words_rule.passed is False


def test_serving_rules_decide_beside_quality_and_an_unmeasured_one_is_undecided():
    """Latency and memory rules come from the models as served (evaluators.timing); a failing one
    rejects a candidate whose quality passes, an undecided one leaves the verdict inconclusive."""
    comparison = pair(*CLOSE_ON_1000_ROWS)
    assert decide(comparison, load_config()).decision is Decision.PROMOTE
    heavy = RuleOutcome("memory_ratio", 1.38, 1.25, False, "memory as served 6.5 -> 9.0 GiB")
    rejected = decide(comparison, load_config(), serving_rules=[heavy])
    assert rejected.decision is Decision.REJECT and "memory_ratio FAIL" in rejected.reasons
    unmeasured = RuleOutcome("latency_ratio", None, 1.2, None, "latency as served not measured")
    undecided = decide(comparison, load_config(), serving_rules=[unmeasured])
    assert undecided.decision is Decision.INCONCLUSIVE


def test_a_verdict_with_nothing_measured_is_inconclusive_in_every_part_with_the_reason():
    why = "cannot reach the server at http://gpu-7:8000 (ConnectionError)"
    alone = unmeasured("v3", {"base": "base"}, why)
    assert alone.decision is Decision.INCONCLUSIVE and [p.against for p in alone.parts] == ["base"]
    covered = unmeasured("v3", {"base": "base", "holder": "production"}, why,
                         HolderCoverage("production", "2"))
    assert [(p.against, p.reference, p.decision) for p in covered.parts] == [
        ("base", "base", Decision.INCONCLUSIVE), ("holder", "production", Decision.INCONCLUSIVE)]
    assert all(rule.passed is None and rule.detail == why for rule in covered.rules)
    assert covered.reasons.startswith("INCONCLUSIVE v3 on 0 rows, decided by vs base and vs "
                                      "holder production=v2")
    assert f"measured undecided: {why}" in covered.reasons


def test_verdict_to_dict_lists_every_rule_with_its_status():
    data = decide(pair(2, 1, 2, 3), load_config()).to_dict()
    assert data["decision"] == "INCONCLUSIVE"
    assert {r["name"]: r["status"] for r in data["rules"]}["exact_match"] == "undecided"


def evaluation(comparison, prefix="delta/", served=None):
    """What the evaluator logs for a comparison: its paired metrics and the served rules' figures."""
    served = {f"{prefix}{name}": value for name, value in (served or {}).items()}
    return EvaluationResult(metrics=comparison.metrics(prefix) | served, artifacts={},
                            run_id="test")


def test_metric_thresholds_pass_with_mlflow_validate_for_a_promoted_comparison():
    comparison = pair(*CLOSE_ON_1000_ROWS)
    assert decide(comparison, load_config()).decision is Decision.PROMOTE
    thresholds = metric_thresholds(load_config())
    assert set(thresholds) == {"delta/primary_gain_ci_low", "delta/latency_ratio",
                               "delta/memory_ratio"}
    served = {"latency_ratio": 1.05, "memory_ratio": 1.01}
    mlflow.validate_evaluation_results(thresholds, evaluation(comparison, served=served))
    # a baseline (here: the previous evaluation) is accepted; absolute thresholds never use it
    previous = evaluation(pair(50, 1, 0, 49), served=served)
    mlflow.validate_evaluation_results(thresholds, evaluation(comparison, served=served), previous)


def test_metric_thresholds_fail_with_mlflow_validate_on_the_rules_decide_fails(tmp_path):
    words = np.arange(1000) % 7 + 5
    comparison = pair(*CLOSE_ON_1000_ROWS, base_words=words, other_words=words + 3)
    concise = user_config(tmp_path, "verdict:\n  max_mean_words_ratio: 1.2\n")
    slow = RuleOutcome("latency_ratio", 1.5, 1.2, False, "served latency x1.5")
    assert decide(comparison, concise, serving_rules=[slow]).decision is Decision.REJECT
    with pytest.raises(ModelValidationFailedException) as failure:
        mlflow.validate_evaluation_results(
            metric_thresholds(concise),
            evaluation(comparison, served={"latency_ratio": 1.5, "memory_ratio": 1.0}))
    message = str(failure.value)
    assert "delta/latency_ratio" in message and "delta/mean_words_ratio" in message
    assert "primary_gain" not in message and "memory_ratio" not in message


def test_metric_thresholds_follow_the_prefix_and_name_missing_metrics():
    comparison = pair(20, 12, 2, 6)
    thresholds = metric_thresholds(load_config(), prefix="delta/production/")
    with pytest.raises(ModelValidationFailedException) as failure:
        mlflow.validate_evaluation_results(thresholds, evaluation(comparison, "delta/production/"))
    message = str(failure.value)
    assert "delta/production/primary_gain_ci_low" in message  # a real loss: the CI is below -0.02
    assert "delta/production/memory_ratio was missing" in message  # unmeasured memory is not a pass


def test_a_policy_out_of_range_is_one_clear_error_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"'verdict.alpha' .*less than 1 \(got 5\)"):
        user_config(tmp_path, "verdict:\n  alpha: 5\n")
    with pytest.raises(ConfigError, match=r"'verdict.noninferiority_margin' .*greater than or equal"):
        user_config(tmp_path, "verdict:\n  noninferiority_margin: -0.1\n")

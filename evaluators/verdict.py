"""The deploy decision from a paired comparison and the `verdict:` policy in conf.yaml.

Each rule is tri-state: passed (True), failed with confidence (False), or undecided on this test set
(None). Any failed rule gives REJECT; otherwise any undecided rule gives INCONCLUSIVE; otherwise
PROMOTE. So INCONCLUSIVE always means "more rows (or a missing measurement) could change the
answer", and REJECT never does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from tunelens.evaluators.stats import PairedComparison, verdict_settings

# Model-version tags the evaluator writes and `tunelens promote` reads.
VERDICT_TAG = "tunelens.verdict"
REASONS_TAG = "tunelens.verdict.reasons"
EVAL_RUN_TAG = "tunelens.eval.run_id"


class Decision(StrEnum):
    PROMOTE = "PROMOTE"
    REJECT = "REJECT"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True)
class RuleOutcome:
    name: str
    observed: float | None
    threshold: float | None
    passed: bool | None  # None: cannot be decided from this test set
    detail: str

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "undecided"}[self.passed]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    rules: list[RuleOutcome]
    reasons: str  # one line, for the tag tunelens.verdict.reasons
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"decision": self.decision.value, "reasons": self.reasons, "warnings": self.warnings,
                "rules": [{**asdict(rule), "status": rule.status} for rule in self.rules]}


def _exact_match_rule(comparison: PairedComparison, margin: float) -> RuleOutcome:
    interval, test, alpha = comparison.exact_match_cautious, comparison.mcnemar, comparison.alpha
    significant = test.significant(alpha)
    gain = significant and interval.estimate > 0
    loss = significant and interval.estimate < 0
    non_inferior = interval.low > -margin
    passed = (True if gain or non_inferior else
              False if loss or interval.high < -margin else None)
    evidence = (f"exact match {comparison.exact_match_base:.1%} -> {comparison.exact_match_other:.1%}"
                f", difference {interval.estimate:+.3f} (bootstrap CI "
                f"{comparison.exact_match_delta.low:+.3f} to {comparison.exact_match_delta.high:+.3f}"
                f", score CI {comparison.exact_match_score_ci.low:+.3f} to "
                f"{comparison.exact_match_score_ci.high:+.3f}); McNemar p={test.p_value:.3g} "
                f"({test.other_only} rows only {comparison.other_label} right, {test.base_only} "
                f"only {comparison.base_label})")
    if gain:
        why = f"significant gain at alpha={alpha:g}"
    elif non_inferior:
        why = f"non-inferior: both CIs' lower bounds above -{margin:g}"
    elif loss:
        why = f"significant loss at alpha={alpha:g}, not shown within -{margin:g}"
    elif passed is False:
        why = f"worse by more than the margin: both CIs below -{margin:g}"
    else:
        why = f"no significant gain, and the CIs reach below -{margin:g}"
    return RuleOutcome("exact_match", interval.estimate, -margin, passed, f"{why}; {evidence}")


def _interval_rule(name: str, ci, limit: float, what: str, fmt: str) -> RuleOutcome:
    """Lower is better: pass when the estimate is within `limit`; fail when the whole CI is above."""
    passed = True if ci.estimate <= limit else False if ci.low > limit else None
    relation = {True: "within", False: "above", None: "above, but its CI reaches below,"}[passed]
    return RuleOutcome(name, ci.estimate, limit, passed,
                       f"{what} {ci.describe(fmt)} {relation} the limit {limit:g}")


def _memory_rules(comparison: PairedComparison, max_ratio, max_gib) -> list[RuleOutcome]:
    memory, rules = comparison.memory, []
    unmeasured = (f"memory not measured for both models on one basis (peak or weights), so the "
                  f"budget cannot be checked; set the limit to null in conf.yaml to skip it")
    if max_ratio is not None:
        ratio = memory.ratio
        rules.append(RuleOutcome(
            "memory_ratio", ratio, float(max_ratio), None if ratio is None else ratio <= max_ratio,
            unmeasured if ratio is None else
            f"{memory.source} memory {memory.base_gib:.3f} -> {memory.other_gib:.3f} GiB, ratio "
            f"{ratio:.3f} {'<=' if ratio <= max_ratio else '>'} {max_ratio:g}"))
    if max_gib is not None:
        gib = memory.other_gib
        rules.append(RuleOutcome(
            "memory_gib", gib, float(max_gib), None if gib is None else gib <= max_gib,
            unmeasured if gib is None else
            f"{comparison.other_label} {memory.source} memory {gib:.3f} GiB "
            f"{'<=' if gib <= max_gib else '>'} budget {max_gib:g} GiB"))
    return rules


def decide(comparison: PairedComparison, config: dict | None = None) -> Verdict:
    """PROMOTE / REJECT / INCONCLUSIVE from the rules of conf.yaml's `verdict:` section."""
    settings = verdict_settings(config)
    rules = [_exact_match_rule(comparison, float(settings["noninferiority_margin"]))]
    if settings["max_p95_latency_ratio"] is not None:
        rules.append(_interval_rule("latency_p95_ratio", comparison.latency_p95_ratio,
                                    float(settings["max_p95_latency_ratio"]),
                                    f"p95 latency ratio {comparison.other_label}/"
                                    f"{comparison.base_label}", ".3f"))
    rules += _memory_rules(comparison, settings["max_memory_ratio"], settings["max_memory_gib"])
    if settings["max_mean_words_increase"] is not None:
        rules.append(_interval_rule("mean_words", comparison.mean_words_delta,
                                    float(settings["max_mean_words_increase"]),
                                    f"mean words {comparison.mean_words_base:.1f} -> "
                                    f"{comparison.mean_words_other:.1f}, difference", "+.2f"))
    if any(rule.passed is False for rule in rules):
        decision = Decision.REJECT
    elif any(rule.passed is None for rule in rules):
        decision = Decision.INCONCLUSIVE
    else:
        decision = Decision.PROMOTE
    warnings = [comparison.warning] if comparison.warning else []
    return Verdict(decision, rules, _reasons(decision, comparison, rules, warnings), warnings)


def _reasons(decision: Decision, comparison: PairedComparison, rules: list[RuleOutcome],
             warnings: list[str]) -> str:
    """One line: the deciding rules first (failed, then undecided), then the rest."""
    order = {False: 0, None: 1, True: 2}
    parts = [f"{rule.name} {rule.status}: {rule.detail}"
             for rule in sorted(rules, key=lambda rule: order[rule.passed])]
    head = (f"{decision.value} {comparison.other_label} vs {comparison.base_label} on "
            f"{comparison.n_rows} rows")
    return " | ".join([head, *parts, *(f"warning: {w}" for w in warnings)])


def metric_thresholds(config: dict | None = None, prefix: str = "delta/") -> dict:
    """MetricThresholds on `PairedComparison.metrics(prefix)` names, one per configured rule.

    For `mlflow.validate_evaluation_results(thresholds, candidate_result)`, where candidate_result
    holds the comparison metrics (the tunelens evaluator logs them under `delta/`). A baseline result
    is not needed; if one is passed it must hold the same metric names (mlflow 3.17 raises KeyError
    on a non-empty baseline that lacks one), and absolute thresholds ignore it. The rules compare two models on the same rows, which
    MetricThreshold's min_absolute_change / min_relative_change cannot say (they only accept
    required improvements, never a tolerance), so each threshold is an absolute bound on a paired
    metric. The thresholds check point estimates and both exact-match lower bounds (bootstrap and
    score, >= -margin); `decide` also passes a significant exact-match gain and leaves a straddling
    interval undecided rather than failed, so it is the authority when the two disagree.
    """
    from mlflow.models import MetricThreshold

    settings = verdict_settings(config)
    margin = float(settings["noninferiority_margin"])
    thresholds = {f"{prefix}{name}": MetricThreshold(threshold=-margin, greater_is_better=True)
                  for name in ("exact_match_ci_low", "exact_match_score_ci_low")}
    lower_is_better = {"latency_ms_p95_ratio": settings["max_p95_latency_ratio"],
                       "memory_ratio": settings["max_memory_ratio"],
                       "memory_gib": settings["max_memory_gib"],
                       "mean_words": settings["max_mean_words_increase"]}
    for name, limit in lower_is_better.items():
        if limit is not None:
            thresholds[f"{prefix}{name}"] = MetricThreshold(threshold=float(limit),
                                                            greater_is_better=False)
    return thresholds

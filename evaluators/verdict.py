"""The deploy decision from paired comparisons and the `verdict:` policy in conf.yaml.

The verdict has up to two parts. *vs base*: did fine-tuning help (the candidate against its own
base). *vs holder*: is the candidate at least as good as the version that holds the promotion alias
now (non-inferior on quality within the margin, within the latency and memory limits); there is
no such part when nobody holds the alias or the candidate is the holder. Each part's rules are
tri-state: passed (True), failed with confidence (False), or undecided on this test set (None).
Any failed rule gives REJECT; otherwise any undecided rule gives INCONCLUSIVE; otherwise PROMOTE.
The whole verdict is the worse of its parts (REJECT over INCONCLUSIVE over PROMOTE), so PROMOTE
needs both, and INCONCLUSIVE always means "more rows (or a missing measurement) could change the
answer" while REJECT never does.

`RuleOutcome` is the record every rule produces (the serving measurements' rules too); keep its
fields stable.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tunelens.evaluators.scoring.profiles import task_profile
from tunelens.evaluators.scoring.stats import PairedComparison
from tunelens.registry.verdicts import Decision, HolderCoverage
from tunelens.settings import Settings

_SEVERITY = {Decision.PROMOTE: 0, Decision.INCONCLUSIVE: 1, Decision.REJECT: 2}


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
class VerdictPart:
    """One side of the verdict: the candidate against `reference` ("base" or the holder's label)."""

    against: str  # "base" or "holder"
    reference: str  # the label of the model compared against
    decision: Decision
    rules: list[RuleOutcome]
    warnings: list[str] = field(default_factory=list)

    def deciding(self) -> list[RuleOutcome]:
        """The rules that made this part's decision: failed for REJECT, undecided for INCONCLUSIVE."""
        wanted = {Decision.REJECT: False, Decision.INCONCLUSIVE: None}
        if self.decision not in wanted:
            return []
        return [rule for rule in self.rules if rule.passed is wanted[self.decision]]

    def to_dict(self) -> dict:
        return {"against": self.against, "reference": self.reference,
                "decision": self.decision.value, "warnings": self.warnings,
                "rules": [{**asdict(rule), "status": rule.status} for rule in self.rules]}


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    parts: list[VerdictPart]
    reasons: str  # one line, for the tag tunelens.verdict.reasons
    holder: HolderCoverage | None = None  # None: no promotion alias was looked at

    @property
    def rules(self) -> list[RuleOutcome]:
        return [rule for part in self.parts for rule in part.rules]

    @property
    def warnings(self) -> list[str]:
        return [w for part in self.parts for w in part.warnings]

    def part(self, against: str) -> VerdictPart | None:
        return next((p for p in self.parts if p.against == against), None)

    def to_dict(self) -> dict:
        return {"decision": self.decision.value, "reasons": self.reasons,
                "warnings": self.warnings,
                "holder": None if self.holder is None else asdict(self.holder),
                "parts": [part.to_dict() for part in self.parts],
                "rules": [{**asdict(rule), "status": rule.status} for rule in self.rules]}


def _quality_rule(comparison: PairedComparison, margin: float) -> RuleOutcome:
    """Pass on a significant gain or non-inferiority (interval above -margin); fail on a
    significant loss not shown within the margin, or an interval wholly below -margin."""
    gain = comparison.quality_gain
    significant = comparison.significant_gain()
    undefined = math.isnan(gain.low)
    non_inferior = not undefined and gain.low > -margin
    below = not undefined and gain.high < -margin
    passed = (True if significant is True or non_inferior else
              False if significant is False or below else None)
    name, test = comparison.metric, comparison.test_name
    intervals = (f"{'percentile' if comparison.binary else 'paired BCa'} bootstrap CI "
                 f"{comparison.quality_delta.low:+.3f} to {comparison.quality_delta.high:+.3f}")
    if comparison.binary:
        mcnemar = comparison.mcnemar
        intervals += (f", score CI {comparison.quality_score_ci.low:+.3f} to "
                      f"{comparison.quality_score_ci.high:+.3f}); McNemar p={mcnemar.p_value:.3g} "
                      f"({mcnemar.other_only} rows only {comparison.other_label} right, "
                      f"{mcnemar.base_only} only {comparison.base_label}")
    fmt = ".1%" if comparison.binary else ".3f"
    evidence = (f"{name} {comparison.quality_base:{fmt}} -> {comparison.quality_other:{fmt}}, "
                f"difference {comparison.quality_delta.estimate:+.3f} ({intervals})"
                + ("" if comparison.greater_is_better else "; lower is better"))
    if significant is True:
        why = f"significant gain ({test}, alpha={comparison.alpha:g})"
    elif non_inferior:
        why = f"non-inferior: the lower bound of the gain above -{margin:g}"
    elif significant is False:
        why = f"significant loss ({test}, alpha={comparison.alpha:g}), not shown within -{margin:g}"
    elif passed is False:
        why = f"worse by more than the margin: the interval below -{margin:g}"
    elif undefined:
        why = "every row differs by the same amount: the bootstrap cannot measure the spread"
    else:
        why = f"no significant gain, and the CIs reach below -{margin:g}"
    return RuleOutcome(name, gain.estimate, -margin, passed, f"{why}; {evidence}")


def _interval_rule(name: str, ci, limit: float, what: str, fmt: str) -> RuleOutcome:
    """Lower is better: pass when the estimate is within `limit`; fail when the whole CI is above."""
    if not math.isfinite(ci.estimate):
        return RuleOutcome(name, None, limit, None, f"{what} cannot be computed (a zero base)")
    passed = True if ci.estimate <= limit else False if ci.low > limit else None
    relation = {True: "within", False: "above", None: "above, but its CI reaches below,"}[passed]
    return RuleOutcome(name, ci.estimate, limit, passed,
                       f"{what} {ci.describe(fmt)} {relation} the limit {limit:g}")


def words_limit(config: Settings) -> float | None:
    """verdict.max_mean_words_ratio, else the task profile's conciseness limit, else None (off)."""
    limit = config.verdict.max_mean_words_ratio
    if limit is None:
        profile = task_profile(config)
        limit = profile.max_mean_words_ratio if profile else None
    return None if limit is None else float(limit)


def _decision(rules: list[RuleOutcome]) -> Decision:
    if any(rule.passed is False for rule in rules):
        return Decision.REJECT
    if any(rule.passed is None for rule in rules):
        return Decision.INCONCLUSIVE
    return Decision.PROMOTE


def decide_part(comparison: PairedComparison, config: Settings, against: str = "base",
                serving_rules: list[RuleOutcome] = ()) -> VerdictPart:
    """One part of the verdict from the rules of conf.yaml's `verdict:` section: quality and
    conciseness from the paired rows, plus `serving_rules`, the latency and memory rules of the
    models as served (evaluators.timing; undecided where they were not measured as served). A
    batch's queue times and a process's RSS never decide.
    """
    settings = config.verdict
    rules = [_quality_rule(comparison, float(settings.noninferiority_margin))]
    limit = words_limit(config)
    if limit is not None:
        rules.append(_interval_rule("mean_words_ratio", comparison.mean_words_ratio, limit,
                                    f"mean words {comparison.mean_words_base:.1f} -> "
                                    f"{comparison.mean_words_other:.1f}, ratio", ".3f"))
    rules += list(serving_rules)
    warnings = [comparison.warning] if comparison.warning else []
    return VerdictPart(against, comparison.base_label, _decision(rules), rules, warnings)


def combine(candidate: str, n_rows: int, parts: list[VerdictPart],
            holder: HolderCoverage | None = None) -> Verdict:
    """The verdict: the worse of its parts, with one line of reasons naming the deciding part."""
    decision = max((part.decision for part in parts), key=_SEVERITY.__getitem__)
    return Verdict(decision, parts, _reasons(decision, candidate, n_rows, parts, holder), holder)


def unmeasured(candidate: str, references: dict[str, str], reason: str,
               holder: HolderCoverage | None = None) -> Verdict:
    """INCONCLUSIVE in every part (`references`: {"base" | "holder": the label compared}), each
    part's one rule `measured` undecided with `reason`: no model gave an output to judge."""
    rule = RuleOutcome("measured", None, None, None, reason)
    parts = [VerdictPart(against, reference, Decision.INCONCLUSIVE, [rule])
             for against, reference in references.items()]
    return combine(candidate, 0, parts, holder)


def decide(comparison: PairedComparison, config: Settings,
           serving_rules: list[RuleOutcome] = ()) -> Verdict:
    """The verdict of a comparison against the base alone (no alias holder looked at)."""
    part = decide_part(comparison, config, serving_rules=serving_rules)
    return combine(comparison.other_label, comparison.n_rows, [part])


def _reasons(decision: Decision, candidate: str, n_rows: int, parts: list[VerdictPart],
             holder: HolderCoverage | None) -> str:
    """One line: which part decided, then per part its rules (failed, then undecided, then the rest)."""
    order = {False: 0, None: 1, True: 2}
    names = {"base": "vs base", "holder": f"vs holder {holder.alias}=v{holder.version}"
             if holder and holder.version else "vs holder"}
    deciding = [names[p.against] for p in parts if p.decision is decision]
    head = (f"{decision.value} {candidate} on {n_rows} rows"
            + (f", decided by {' and '.join(deciding)}" if decision is not Decision.PROMOTE
               else f", {' and '.join(deciding)} pass"))
    if holder is not None and holder.version is None:
        head += f" (no version held {holder.alias})"
    pieces = [head]
    for part in parts:
        pieces += [f"[{names[part.against]} {part.decision.value}] {rule.name} {rule.status}: "
                   f"{rule.detail}" for rule in sorted(part.rules, key=lambda r: order[r.passed])]
        pieces += [f"warning: {w}" for w in part.warnings]
    return " | ".join(pieces)


def metric_thresholds(config: Settings, prefix: str = "delta/") -> dict:
    """MetricThresholds on the evaluator's paired metric names, one per configured rule.

    For `mlflow.validate_evaluation_results(thresholds, candidate_result)`, where candidate_result
    holds the comparison metrics (the tunelens evaluator logs them under `delta/`, and those against
    the alias's holder under `delta_vs_<alias>/`). A baseline result is not needed; if one is passed
    it must hold the same metric names (mlflow 3.17 raises KeyError on a non-empty baseline that
    lacks one), and absolute thresholds ignore it. The rules compare two models on the same rows,
    which MetricThreshold's min_absolute_change / min_relative_change cannot say (they only accept
    required improvements, never a tolerance), so each threshold is an absolute bound on a paired
    figure the verdict judged: `primary_gain_ci_low` (the primary metric's cautious lower bound,
    oriented so that positive is better) above -margin, and the served `latency_ratio`,
    `memory_ratio`, `memory_gib` and `mean_words_ratio` within their limits. A figure that was not
    measured is missing, and a missing metric fails validation. The thresholds check point
    estimates; the verdict also passes a significant gain and leaves a straddling interval undecided
    rather than failed, so it is the authority when the two disagree.
    """
    from mlflow.models import MetricThreshold

    settings = config.verdict
    thresholds = {f"{prefix}primary_gain_ci_low": MetricThreshold(
        threshold=-float(settings.noninferiority_margin), greater_is_better=True)}
    lower_is_better = {"latency_ratio": settings.max_latency_ratio,
                       "memory_ratio": settings.max_memory_ratio,
                       "memory_gib": settings.max_memory_gib,
                       "mean_words_ratio": words_limit(config)}
    for name, limit in lower_is_better.items():
        if limit is not None:
            thresholds[f"{prefix}{name}"] = MetricThreshold(threshold=float(limit),
                                                            greater_is_better=False)
    return thresholds

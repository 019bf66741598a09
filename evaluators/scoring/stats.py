"""Paired statistics for a side-by-side evaluation: the same rows, scored for two models.

The primary quality metric gets the paired test that fits it. A binary per-row score (exact match,
or any metric whose scores are all 0 or 1) gets the exact McNemar test (only the rows where the two
models disagree carry information) and, besides the percentile bootstrap, Tango's score interval
(sound when the models rarely disagree), with a power note saying when the test set is too small to
decide. A continuous score (token F1, chrF, ROUGE-L, most extra metrics) gets a paired BCa bootstrap
interval of the mean difference (scipy.stats.bootstrap, paired=True). Words get paired
percentile bootstrap intervals (rows resampled jointly, so the pairing is kept). Latency and memory
are compared as served (timing/rules.py), not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Literal

import numpy as np

from tunelens.errors import TunelensError
from tunelens.settings import Settings

# Bootstrap index matrices are drawn in blocks of at most this many entries (bounded memory).
_BOOTSTRAP_BLOCK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class ModelScores:
    """One model's per-row scores on the evaluation rows (row i is the same prompt for every model)."""

    label: str
    quality: np.ndarray  # float per row: the primary quality metric (0/1 for a binary one)
    words: np.ndarray  # int per row: words in the output

    def __post_init__(self):
        arrays = {"quality": np.asarray(self.quality, dtype=np.float64),
                  "words": np.asarray(self.words, dtype=np.int64)}
        lengths = {name: a.shape for name, a in arrays.items()}
        if any(a.ndim != 1 for a in arrays.values()) or len(set(lengths.values())) != 1:
            raise TunelensError(f"scores of {self.label!r} must be 1-D arrays of one length per row, "
                                f"got shapes {lengths}")
        if arrays["quality"].size == 0:
            raise TunelensError(f"scores of {self.label!r} have no rows: evaluate at least one row")
        if not np.all(np.isfinite(arrays["quality"])):
            raise TunelensError(f"quality scores of {self.label!r} must be finite")
        for name, array in arrays.items():
            object.__setattr__(self, name, array)

    @property
    def n_rows(self) -> int:
        return int(self.quality.size)


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test: under H0 each discordant row favours either model with probability 1/2."""

    base_only: int  # rows the base got right and the other model wrong
    other_only: int  # rows the other model got right and the base wrong
    p_value: float  # two-sided

    @property
    def n_discordant(self) -> int:
        return self.base_only + self.other_only

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float

    def describe(self, fmt: str = "+.3f") -> str:
        return (f"{self.estimate:{fmt}} ({self.level:.0%} CI {self.low:{fmt}} to "
                f"{self.high:{fmt}})")


@dataclass(frozen=True)
class PowerNote:
    """How much this test set can detect, in exact-match share of rows."""

    min_discordant: int  # fewest discordant rows for which any split can reach p < alpha
    min_detectable_gain: float | None  # smallest significant gain with these rows and discordant rows
    rows_needed: int | None  # rows to detect the observed difference with `power` at the same rates
    power: float


@dataclass(frozen=True)
class QualityMetricInfo:
    """What the paired test needs to know of the primary metric."""

    name: str = "exact_match"
    greater_is_better: bool = True


@dataclass(frozen=True)
class PairedComparison:
    """`other` against `base` on the same rows: deltas are other - base, ratios other / base."""

    base_label: str
    other_label: str
    n_rows: int
    alpha: float
    metric: str  # the primary quality metric's name
    binary: bool  # every per-row score 0 or 1: McNemar; else the paired BCa bootstrap
    greater_is_better: bool
    quality_base: float
    quality_other: float
    quality_delta: ConfidenceInterval  # other - base: percentile (binary) or BCa bootstrap
    quality_score_ci: ConfidenceInterval | None  # binary only: Tango's score interval
    mcnemar: McNemarResult | None  # binary only
    mean_words_base: float
    mean_words_other: float
    mean_words_delta: ConfidenceInterval
    mean_words_ratio: ConfidenceInterval  # mean words other / base
    power: PowerNote | None  # binary only
    warning: str | None  # set when the test set is too small to decide the quality question

    @property
    def too_small(self) -> bool:
        return self.warning is not None

    @property
    def test_name(self) -> str:
        return "exact McNemar" if self.binary else "paired BCa bootstrap"

    @property
    def quality_cautious(self) -> ConfidenceInterval:
        """What the verdict judges quality on: for a binary metric the union of the bootstrap and
        score intervals (with few discordant rows the percentile bootstrap collapses: 0 of 30 rows
        discordant gives [0, 0], the score interval -0.11), else the BCa interval."""
        if self.quality_score_ci is None:
            return self.quality_delta
        return _union(self.quality_delta, self.quality_score_ci)

    @property
    def quality_gain(self) -> ConfidenceInterval:
        """The cautious interval oriented so that positive is better (flipped for lower-is-better)."""
        ci = self.quality_cautious
        if self.greater_is_better:
            return ci
        return ConfidenceInterval(-ci.estimate, -ci.high, -ci.low, ci.level)

    def significant_gain(self) -> bool | None:
        """A gain (or loss) significant at alpha: McNemar for binary, the BCa interval excluding 0
        otherwise. True gain, False loss, None neither."""
        if self.binary:
            if not self.mcnemar.significant(self.alpha):
                return None
            return (self.quality_gain.estimate > 0) if self.quality_gain.estimate != 0 else None
        gain = self.quality_gain
        return True if gain.low > 0 else False if gain.high < 0 else None

    def metrics(self, prefix: str = "delta/") -> dict[str, float]:
        """Flat metrics for `mlflow.log_metrics`; `verdict.metric_thresholds` uses the same names."""
        name = self.metric
        values = {
            name: self.quality_delta.estimate,
            f"{name}_ci_low": self.quality_delta.low,
            f"{name}_ci_high": self.quality_delta.high,
            "mean_words": self.mean_words_delta.estimate,
            "mean_words_ci_low": self.mean_words_delta.low,
            "mean_words_ci_high": self.mean_words_delta.high,
            "mean_words_ratio": self.mean_words_ratio.estimate,
            # The bound the quality rule's non-inferiority judges, oriented so that positive is
            # better whatever the metric's direction (`metric_thresholds` checks it).
            "primary_gain_ci_low": self.quality_gain.low,
        }
        if self.binary:
            values |= {f"{name}_score_ci_low": self.quality_score_ci.low,
                       f"{name}_score_ci_high": self.quality_score_ci.high,
                       "mcnemar_p_value": self.mcnemar.p_value,
                       "discordant_rows": self.mcnemar.n_discordant}
        return {f"{prefix}{key}": float(value) for key, value in values.items()
                if math.isfinite(value)}


def _union(first: ConfidenceInterval, second: ConfidenceInterval) -> ConfidenceInterval:
    return ConfidenceInterval(first.estimate, min(first.low, second.low),
                              max(first.high, second.high), first.level)


def _two_sided_binomial_half(k: int, n: int) -> float:
    """Two-sided exact p of k successes in n trials at p=1/2: min(1, 2·P(X ≤ min(k, n-k)))."""
    tail, term = 0, 1  # term = C(n, i), exact integers
    for i in range(min(k, n - k) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / (1 << n))


def mcnemar_exact(base_correct, other_correct) -> McNemarResult:
    """Exact McNemar: p = min(1, 2·Σ_{i≤min(b,c)} C(b+c, i) / 2^(b+c)), b and c the discordant counts."""
    base_correct = np.asarray(base_correct, dtype=bool)
    other_correct = np.asarray(other_correct, dtype=bool)
    if base_correct.shape != other_correct.shape:
        raise TunelensError(f"paired exact match needs the same rows: {base_correct.shape} vs "
                            f"{other_correct.shape}")
    b = int(np.count_nonzero(base_correct & ~other_correct))
    c = int(np.count_nonzero(other_correct & ~base_correct))
    return McNemarResult(base_only=b, other_only=c, p_value=_two_sided_binomial_half(b, b + c))


def _bootstrap_indices(n_rows: int, n_resamples: int, seed: int):
    """Row indices of each resample, in blocks; the same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK_ENTRIES // n_rows)
    for start in range(0, n_resamples, block):
        yield rng.integers(0, n_rows, size=(min(block, n_resamples - start), n_rows))


def paired_bootstrap(base, other, statistic: Callable = np.mean, *, n_resamples: int,
                     level: float, seed: int,
                     combine: Literal["difference", "ratio"] = "difference") -> ConfidenceInterval:
    """Percentile CI of stat(other) - stat(base) (or the ratio), resampling rows of both together.

    `statistic(values, axis=...)` must reduce along an axis, like np.mean or np.median.
    """
    base = np.asarray(base, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if base.shape != other.shape or base.ndim != 1 or base.size == 0:
        raise TunelensError(f"paired bootstrap needs two non-empty arrays of one length, got "
                            f"{base.shape} and {other.shape}")
    if not 0 < level < 1 or n_resamples < 1:
        raise TunelensError(f"bootstrap needs 0 < level < 1 and n_resamples >= 1 (got {level}, "
                            f"{n_resamples})")

    def combined(b, o):
        if combine == "difference":
            return o - b
        with np.errstate(divide="ignore", invalid="ignore"):
            return o / b

    estimate = float(combined(statistic(base, axis=0), statistic(other, axis=0)))
    resampled = np.concatenate([
        combined(statistic(base[idx], axis=1), statistic(other[idx], axis=1))
        for idx in _bootstrap_indices(base.size, n_resamples, seed)])
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return ConfidenceInterval(estimate=estimate, low=float(low), high=float(high), level=level)


def paired_bca(base, other, *, n_resamples: int, level: float, seed: int) -> ConfidenceInterval:
    """BCa interval of mean(other) - mean(base), rows resampled in pairs (scipy.stats.bootstrap).

    When every row differs by the same amount the bootstrap has no spread to measure: the bounds
    are NaN (undecided), never a zero-width interval claiming certainty.
    """
    from scipy.stats import bootstrap

    base = np.asarray(base, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    differences = other - base
    estimate = float(differences.mean())
    if np.ptp(differences) <= 1e-12:  # equal up to rounding: scipy's BCa would divide by zero
        return ConfidenceInterval(estimate, math.nan, math.nan, level)
    result = bootstrap((base, other), lambda b, o, axis: o.mean(axis=axis) - b.mean(axis=axis),
                       paired=True, vectorized=True, n_resamples=n_resamples,
                       confidence_level=level, method="BCa", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return ConfidenceInterval(estimate, float(low), float(high), level)


def paired_score_interval(mcnemar: McNemarResult, n_rows: int, level: float) -> ConfidenceInterval:
    """Tango (1998) score CI of Δ = (c - b)/n: all Δ with |c - b - nΔ| ≤ z·√(n(2p̃_b + Δ - Δ²)).

    p̃_b is the constrained MLE of P(base only) under Δ, the positive root of
    2n·p² - (b + c - (2n + b - c)Δ)·p - bΔ(1 - Δ) = 0. Bounds are found by bisection.
    """
    b, c, n = mcnemar.base_only, mcnemar.other_only, n_rows
    z = NormalDist().inv_cdf(0.5 + level / 2)
    observed = (c - b) / n

    def outside(delta: float) -> bool:
        slope = b + c - (2 * n + b - c) * delta
        p_base = (slope + math.sqrt(max(slope ** 2 + 8 * n * b * delta * (1 - delta), 0.0))) / (4 * n)
        variance = n * (2 * p_base + delta - delta ** 2)
        gap = abs(c - b - n * delta)
        return gap > 0 and (variance <= 0 or gap > z * math.sqrt(variance))

    def bound(inside: float, limit: float) -> float:
        if not outside(limit):
            return limit
        for _ in range(80):
            middle = (inside + limit) / 2
            inside, limit = (inside, middle) if outside(middle) else (middle, limit)
        return inside

    return ConfidenceInterval(observed, bound(observed, -1.0), bound(observed, 1.0), level)


def _power_note(n_rows: int, mcnemar: McNemarResult, alpha: float, power: float) -> PowerNote:
    """Limits of the McNemar test here, and rows needed for the observed difference (Connor 1987)."""
    # 2·(1/2)^D < alpha is the smallest p any split of D discordant rows can give.
    min_discordant = math.ceil(math.log2(2 / alpha) - 1e-12)
    n_disc = mcnemar.n_discordant
    min_gain = None
    if n_disc >= min_discordant:
        # largest lower tail m with 2·P(X ≤ m) < alpha; the split other_only = D - m is the most
        # even one that is still significant
        tail, term, whole = 0, 1, 1 << n_disc
        for m in range(n_disc // 2 + 1):
            tail += term
            if 2 * tail / whole >= alpha:
                break
            min_gain = (n_disc - 2 * m) / n_rows
            term = term * (n_disc - m) // (m + 1)
    rows_needed = None
    diff = abs(mcnemar.other_only - mcnemar.base_only) / n_rows
    if diff > 0:
        # n = (z_{1-α/2}·√ψ + z_{power}·√(ψ - δ²))² / δ², ψ the discordant share, δ the difference
        share = n_disc / n_rows
        z = NormalDist()
        top = z.inv_cdf(1 - alpha / 2) * math.sqrt(share) + z.inv_cdf(power) * math.sqrt(
            max(share - diff ** 2, 0.0))
        rows_needed = math.ceil(top ** 2 / diff ** 2)
    return PowerNote(min_discordant=min_discordant, min_detectable_gain=min_gain,
                     rows_needed=rows_needed, power=power)


def _too_small_warning(n_rows: int, mcnemar: McNemarResult, note: PowerNote, alpha: float,
                       cautious: ConfidenceInterval, margin: float, metric: str) -> str | None:
    """Set exactly when a binary metric is undecided: no significant result, and the interval
    straddles the non-inferiority margin."""
    if mcnemar.significant(alpha) or cautious.low > -margin or cautious.high < -margin:
        return None
    problems = [f"the {metric} interval {cautious.low:+.3f} to {cautious.high:+.3f} reaches "
                f"below the non-inferiority margin -{margin:g}"]
    if mcnemar.n_discordant < note.min_discordant:
        problems.append(f"only {mcnemar.n_discordant} rows where the models disagree on "
                        f"{metric}: no split of them can reach p < {alpha:g} (needs at least "
                        f"{note.min_discordant})")
    if note.rows_needed is not None and note.rows_needed > n_rows:
        diff = (mcnemar.other_only - mcnemar.base_only) / n_rows
        problems.append(f"detecting the observed {metric} difference of {diff * 100:+.1f} points "
                        f"with {note.power:.0%} power needs about {note.rows_needed} rows")
    if note.min_detectable_gain is not None:
        problems.append(f"with these rows the smallest significant gain is "
                        f"{note.min_detectable_gain * 100:+.1f} points")
    return f"too small to decide on {n_rows} rows: " + "; ".join(problems)


def _continuous_warning(n_rows: int, gain: ConfidenceInterval, margin: float,
                        metric: str) -> str | None:
    """Set exactly when a continuous metric is undecided (its interval straddles 0 and -margin)."""
    if math.isnan(gain.low):
        return (f"too small to decide on {n_rows} rows: every row's {metric} differs by the same "
                f"amount ({gain.estimate:+.3f}), so the bootstrap cannot measure the spread")
    if gain.low > 0 or gain.low > -margin or gain.high < -margin:
        return None
    return (f"too small to decide on {n_rows} rows: the {metric} BCa interval {gain.low:+.3f} to "
            f"{gain.high:+.3f} reaches below the non-inferiority margin -{margin:g}; more rows "
            "narrow it")


def compare_paired(base: ModelScores, other: ModelScores, config: Settings,
                   metric: QualityMetricInfo = QualityMetricInfo()) -> PairedComparison:
    """Every paired difference of `other` against `base`, with CIs, the fitting test and a power
    note; `metric` names the primary quality metric the `quality` arrays hold."""
    if base.n_rows != other.n_rows:
        raise TunelensError(f"{base.label} has {base.n_rows} rows and {other.label} "
                            f"{other.n_rows}: a paired comparison needs the same rows in the same "
                            f"order")
    settings = config.verdict
    alpha = float(settings.alpha)
    margin = float(settings.noninferiority_margin)
    boot = dict(n_resamples=int(settings.bootstrap_resamples),
                level=float(settings.confidence_level), seed=int(settings.seed))
    binary = bool(np.isin(base.quality, (0.0, 1.0)).all() and np.isin(other.quality, (0.0, 1.0)).all())
    sign = 1.0 if metric.greater_is_better else -1.0
    mcnemar = note = score = None
    if binary:
        # McNemar counts "right" rows: for a lower-is-better binary score, 0 is right.
        right_base, right_other = (base.quality == 1, other.quality == 1) if sign > 0 else (
            base.quality == 0, other.quality == 0)
        mcnemar = mcnemar_exact(right_base, right_other)
        note = _power_note(base.n_rows, mcnemar, alpha, float(settings.power))
        delta = paired_bootstrap(base.quality, other.quality, **boot)
        score = paired_score_interval(mcnemar, base.n_rows, boot["level"])
        if sign < 0:  # the score interval is of (right other - right base): back to other - base
            score = ConfidenceInterval(-score.estimate, -score.high, -score.low, score.level)
        cautious = _union(delta, score)
        gain = cautious if sign > 0 else ConfidenceInterval(-cautious.estimate, -cautious.high,
                                                            -cautious.low, cautious.level)
        warning = _too_small_warning(base.n_rows, mcnemar, note, alpha, gain, margin, metric.name)
    else:
        delta = paired_bca(base.quality, other.quality, **boot)
        gain = delta if sign > 0 else ConfidenceInterval(-delta.estimate, -delta.high, -delta.low,
                                                         delta.level)
        warning = _continuous_warning(base.n_rows, gain, margin, metric.name)
    return PairedComparison(
        base_label=base.label, other_label=other.label, n_rows=base.n_rows, alpha=alpha,
        metric=metric.name, binary=binary, greater_is_better=metric.greater_is_better,
        quality_base=float(base.quality.mean()), quality_other=float(other.quality.mean()),
        quality_delta=delta, quality_score_ci=score, mcnemar=mcnemar,
        mean_words_base=float(base.words.mean()), mean_words_other=float(other.words.mean()),
        mean_words_delta=paired_bootstrap(base.words, other.words, **boot),
        mean_words_ratio=paired_bootstrap(base.words, other.words, combine="ratio", **boot),
        power=note, warning=warning,
    )

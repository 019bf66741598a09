"""The verdict's rules on latency and memory as served.

The latency rule judges the median over rows of c_i / sqrt(b1_i * b2_i) (candidate against the
base just before and after it on the same prompt), with a bootstrap interval, and the same median of
b2_i / b1_i (the base against itself, A/A) as the noise floor: it fails only when the whole interval
is above both the limit and the noise floor. Load that slows every request alike cancels in each
ratio; a burst that hits one request moves one row, not the median; a noisier machine raises the
floor, and a higher floor can only turn a fail into "undecided", never a pass into a fail.

Memory totals come from accounting, not sampling: their rules have no interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import MemoryProfile
from tunelens.evaluators.timing.profiles import LatencyProfile, ServingFigures, percentile
from tunelens.evaluators.verdict import RuleOutcome


@dataclass(frozen=True)
class LatencyRatio:
    """Candidate against base on the same rows, each candidate request between two base requests.

    The judged figure is the median over rows of c_i / sqrt(b1_i * b2_i): how much slower the
    candidate answers a prompt than the base answered it just before and just after. A burst of
    load that hits one request moves one row's ratio, not the median; a steady drift cancels between
    b1 and b2. The A/A figure is the same median of b2_i / b1_i: the base against itself.
    """

    estimate: float  # median of the per-row ratios
    low: float  # its percentile bootstrap interval
    high: float
    level: float
    base_vs_base: float  # A/A: median of b2_i / b1_i
    base_vs_base_low: float
    base_vs_base_high: float
    p95_ratio: float  # sqrt(p95(c)/p95(b1) * p95(c)/p95(b2)): the tails, reported beside it
    p50_ratio: float  # the same on medians
    rows_timed: int = 0
    # rows in which some compared request's threads waited for a core more than max_core_wait of
    # their runnable time: left out of the figures above while enough rows are left
    contended_rows: int = 0
    # fewer uncontended rows than half a round: the figures are over every row, and the rule
    # cannot decide
    oversubscribed: bool = False
    core_wait_p50: float = math.nan  # median waiting share over the compared requests

    @property
    def noise_factor(self) -> float:
        """How far the base landed from itself here: max(A/A, 1/A/A).

        The A/A estimate, not its interval's far end: the candidate's own interval already carries
        the rows' scatter, and requiring one interval to clear the other's far end counted that
        scatter twice, so a busy machine turned a clear fail into "undecided"."""
        return max(1.0, self.base_vs_base, 1.0 / self.base_vs_base)

    @property
    def noise_bound(self) -> float:
        """How far two timings of one model can land apart here: max(A/A high, 1/A/A low); for
        unpaired figures (p50s from different engines), where no per-row interval carries it."""
        return max(1.0, self.base_vs_base_high, 1.0 / self.base_vs_base_low)


def _across_passes(c, b1, b2, statistic) -> float:
    """sqrt(stat(c)/stat(b1) * stat(c)/stat(b2)): candidate against both base passes."""
    return float(np.sqrt(statistic(c) ** 2 / (statistic(b1) * statistic(b2))))


def _contended_rows(profiles, max_core_wait: float) -> np.ndarray:
    """Per row: whether some request of `profiles` waited for a core more than `max_core_wait` of
    its threads' runnable time (a request whose wait was not measured counts as uncontended)."""
    waits = [np.asarray(stream, dtype=np.float64) for p in profiles
             for stream in p.core_wait_streams]
    if not waits:
        return np.zeros(len(profiles[0].rows), dtype=bool)
    return np.any(np.nan_to_num(np.vstack(waits), nan=0.0) > max_core_wait, axis=0)


def compare_latency(base: LatencyProfile, candidate: LatencyProfile, *, level: float,
                    n_resamples: int, seed: int, reference: LatencyProfile | None = None,
                    max_core_wait: float | None = None) -> LatencyRatio:
    """Per-row paired ratios with percentile bootstrap intervals (scipy.stats.bootstrap).

    `reference`: another candidate timed in the same rows (the alias's holder): the ratios are then
    c_i / r_i; the noise floor is still the base's A/A.
    `max_core_wait`: rows in which a compared request's threads waited for a core more than this
    share of their runnable time are left out: those times are the machine's load, whichever model
    they belong to. At least half a round's rows (and 2) must be left; otherwise every row counts
    and the result is `oversubscribed`. While the rule is undecided more rounds are timed, so a
    machine busy in bursts still gives enough uncontended rows.
    """
    from scipy.stats import bootstrap

    if base.repeat_e2e_ms is None:
        raise TunelensError(f"{base.label!r} has one latency pass; the comparison needs the base "
                            "timed before and after the candidate")
    if base.rows != candidate.rows:
        raise TunelensError(f"{base.label!r} and {candidate.label!r} were timed on different rows")
    if len(base.rows) < 2:
        raise TunelensError("the served-latency comparison needs at least 2 sampled rows")
    if reference is not None and reference.rows != candidate.rows:
        raise TunelensError(f"{reference.label!r} and {candidate.label!r} were timed on different "
                            "rows")
    compared = [base, candidate] + ([] if reference is None else [reference])
    timed = len(base.rows)
    contended = (np.zeros(timed, dtype=bool) if max_core_wait is None
                 else _contended_rows(compared, max_core_wait))
    oversubscribed = timed - int(contended.sum()) < max(2, -(-(base.round_rows or timed) // 2))
    kept = np.ones(timed, dtype=bool) if oversubscribed else ~contended
    first, second = np.asarray(base.e2e_ms)[kept], np.asarray(base.repeat_e2e_ms)[kept]
    other = np.asarray(candidate.e2e_ms)[kept]
    base_vs_base = second / first
    if reference is None:
        ratios = other / np.sqrt(first * second)
    else:  # the reference stands in for both base passes
        first = second = np.asarray(reference.e2e_ms)[kept]
        ratios = other / first
    options = dict(vectorized=True, method="percentile", n_resamples=n_resamples,
                   confidence_level=level)
    interval = bootstrap((ratios,), np.median, rng=np.random.default_rng(seed),
                         **options).confidence_interval
    aa = bootstrap((base_vs_base,), np.median, rng=np.random.default_rng(seed),
                   **options).confidence_interval
    return LatencyRatio(estimate=float(np.median(ratios)), low=float(interval.low),
                        high=float(interval.high), level=level,
                        base_vs_base=float(np.median(base_vs_base)),
                        base_vs_base_low=float(aa.low), base_vs_base_high=float(aa.high),
                        p95_ratio=_across_passes(other, first, second, lambda v: np.percentile(v, 95)),
                        p50_ratio=_across_passes(other, first, second, np.median),
                        rows_timed=timed, contended_rows=int(contended.sum()),
                        oversubscribed=oversubscribed,
                        core_wait_p50=percentile([w for p in compared for w in p.core_waits], 50))


def latency_rule(base: LatencyProfile, candidate: LatencyProfile, limit: float, *, level: float,
                 n_resamples: int, seed: int, reference: LatencyProfile | None = None,
                 max_core_wait: float | None = None, name: str = "latency_ratio") -> RuleOutcome:
    """Pass when the served latency ratio is within `limit`; fail only when its whole interval lies
    above both the limit and the noise factor (how far the base lands from itself, A/A): a
    difference within the machine's noise never fails. Undecided when the machine was
    oversubscribed (`max_core_wait`, see compare_latency): those times are its load, not the models.

    Against the base by default, against `reference` (e.g. the alias's holder) when given. Named
    `latency_ratio` (limit `verdict.max_latency_ratio`): it judges a median of per-prompt ratios;
    the p50 and p95 ratios are reported beside it.
    """
    compared = compare_latency(base, candidate, level=level, n_resamples=n_resamples, seed=seed,
                               reference=reference, max_core_wait=max_core_wait)
    against = base if reference is None else reference
    noise = compared.noise_factor
    passed = (None if compared.oversubscribed else True if compared.estimate <= limit else
              False if compared.low > max(limit, noise) else None)
    relation = ("against the limit" if compared.oversubscribed else
                {True: "within the limit", False: "above the limit and the noise",
                 None: "above the limit, but its interval reaches the limit or the noise"}[passed])
    waits = _core_waits_in_words(compared, max_core_wait)
    before = after = ""
    if compared.oversubscribed:
        before = (f"NOT JUDGED: {waits}: more threads wanted to run than the machine has cores, so "
                  f"these times say more about its load than about the models; evaluate again on "
                  f"a quieter machine (evaluation.latency.max_core_wait sets the share). ")
    elif waits:
        after = f"; {waits}" + (": those rows are left out" if compared.contended_rows else "")
    detail = (f"{before}served latency {candidate.label}/{against.label} per prompt (median of "
              f"paired ratios) "
              f"{compared.estimate:.3f} ({level:.0%} CI {compared.low:.3f} to {compared.high:.3f})"
              f" {relation} {limit:g}; noise x{noise:.3f} (base against itself: "
              f"{compared.base_vs_base:.3f}, CI {compared.base_vs_base_low:.3f} to "
              f"{compared.base_vs_base_high:.3f}); p50 {against.e2e_p50_ms:.1f} -> "
              f"{candidate.e2e_p50_ms:.1f} ms, p95 {against.e2e_p95_ms:.1f} -> "
              f"{candidate.e2e_p95_ms:.1f} ms (p95 ratio {compared.p95_ratio:.3f}); "
              f"{candidate.n_requests} requests each at concurrency {candidate.concurrency}, "
              f"{candidate.label} served as "
              f"{candidate.served_as}{after}")
    return RuleOutcome(name, compared.estimate, float(limit), passed, detail)


def _core_waits_in_words(compared: LatencyRatio, max_core_wait: float | None) -> str:
    """How long the requests' threads waited for a CPU core, in words ("" when not measured)."""
    if compared.contended_rows:
        return (f"in {compared.contended_rows} of {compared.rows_timed} rows a request's threads "
                f"waited for a CPU core more than {max_core_wait:.0%} of the time they could run "
                f"(median over all requests {compared.core_wait_p50:.0%})")
    if math.isfinite(compared.core_wait_p50):
        return (f"requests waited for a CPU core {compared.core_wait_p50:.0%} of the time they "
                f"could run (median)")
    return ""


def memory_rules(base: MemoryProfile, candidate: MemoryProfile, max_ratio: float | None,
                 max_gib: float | None) -> list[RuleOutcome]:
    """`memory_ratio` (total as served, candidate / base) and `memory_gib` (candidate's total).

    Totals come from accounting, not sampling, so these rules have no interval: undecided only
    when a figure could not be measured on this engine.
    """
    rules = []
    unknown = "; ".join(candidate.not_measured + base.not_measured) or "no total"
    if max_ratio is not None:
        ratio = (None if base.total_bytes in (None, 0) or candidate.total_bytes is None
                 else candidate.total_bytes / base.total_bytes)
        rules.append(RuleOutcome(
            "memory_ratio", ratio, float(max_ratio), None if ratio is None else ratio <= max_ratio,
            f"memory as served not measured ({unknown}); set the limit to null to skip the rule"
            if ratio is None else
            f"memory as served {base.total_gib:.4f} -> {candidate.total_gib:.4f} GiB, ratio "
            f"{ratio:.3f} {'<=' if ratio <= max_ratio else '>'} {max_ratio:g} ({_parts(candidate)})"))
    if max_gib is not None:
        gib = candidate.total_gib
        rules.append(RuleOutcome(
            "memory_gib", gib, float(max_gib), None if gib is None else gib <= max_gib,
            f"memory as served not measured ({unknown}); set the limit to null to skip the rule"
            if gib is None else
            f"{candidate.label} memory as served {gib:.4f} GiB "
            f"{'<=' if gib <= max_gib else '>'} budget {max_gib:g} GiB ({_parts(candidate)})"))
    return rules


def _parts(profile: MemoryProfile) -> str:
    def mib(value):
        return "n/a" if value is None else f"{value / 1024 ** 2:.2f} MiB"

    adapter = mib(profile.adapter_bytes) + (" inside the buffers" if profile.adapter_in_buffers
                                            else "")
    return (f"weights {mib(profile.weights_bytes)}, adapter {adapter}, LoRA buffers "
            f"{mib(profile.lora_buffers_bytes)}, peak KV cache {mib(profile.kv_cache_peak_bytes)}")


@dataclass(frozen=True)
class LatencyJudgement:
    """The verdict's latency rule for the judged candidates, so the timing can go on while it is
    undecided: each candidate against every other model timed with it (the base, the holder, the
    other candidates of a comparison)."""

    candidates: tuple[str, ...]
    limit: float
    level: float
    n_resamples: int
    seed: int
    max_core_wait: float | None = None
    concurrency: int = 1  # the level the rule judges (verdict.latency_at)

    def undecided(self, figures: ServingFigures) -> bool:
        """Whether some candidate's rule against some other model neither passes nor fails."""
        judged = [figures.at(p.label, self.concurrency) for p in figures.latency]
        base = next(p for p in judged if p.repeat_e2e_ms is not None)
        return any(latency_rule(base, figures.at(label, self.concurrency), self.limit,
                                level=self.level, n_resamples=self.n_resamples, seed=self.seed,
                                max_core_wait=self.max_core_wait,
                                reference=None if other is base else other).passed is None
                   for label in self.candidates
                   for other in judged if other.label != label)



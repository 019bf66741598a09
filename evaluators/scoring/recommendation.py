"""Which candidate to deploy, and which to keep as backup, from their verdicts, paired tests and cost.

Only a candidate whose own verdict is PROMOTE can be recommended: it beat its base and held its own
against the version serving now, so the gate's guarantees hold whatever is chosen here. Among them:

1. rank by the primary quality metric (the higher, or lower where lower is better, first);
2. the best is recommended, unless a cheaper candidate is not clearly worse than it: "clearly" means
   the paired test between the two (exact McNemar or paired BCa bootstrap, at the verdict's alpha)
   finds the best significantly better AND by more than the non-inferiority margin, the difference
   the team declared to matter. Then the cheapest such candidate is recommended instead;
3. the backup is chosen by the same rule among the rest.

Cheaper means less memory as served (by more than `verdict.same_memory_within`), or, with memory
alike, lower served latency (median per request) by more than the noise both engines showed timing
their base against itself. A figure that was not measured as served cannot make a candidate
cheaper: the reasons say so, and quality alone decides.
"""
from __future__ import annotations

from dataclasses import dataclass

from tunelens.evaluators.scoring.stats import PairedComparison
from tunelens.evaluators.verdict import Decision


@dataclass(frozen=True)
class Standing:
    """One candidate as the recommendation sees it: its verdict, quality and cost as served."""

    label: str
    uri: str
    decision: Decision
    quality: float  # mean of the primary metric per row
    memory_bytes: int | None  # memory as served (None: not measured)
    latency_p50_ms: float | None  # served latency, median over the timed requests (None: not timed)
    latency_noise: float  # how far two timings of one model land apart on its engine (>= 1)


@dataclass(frozen=True)
class Recommendation:
    recommended: str | None  # a candidate's label; None when no verdict allows promotion
    backup: str | None
    reasons: list[str]

    def suited_for(self, label: str) -> str:
        """What the recommendation says about candidate `label`: its role and why, in its words."""
        for reason in self.reasons:
            if any(reason.startswith(f"{head}{label}:") for head in ("recommended ", "backup ", "")):
                return reason
        return (f"not chosen: its verdict allows promotion, but {self.recommended} and "
                f"{self.backup or 'no other'} came first")

    def to_dict(self, uris: dict[str, str]) -> dict:
        return {"recommended": uris.get(self.recommended), "backup": uris.get(self.backup),
                "recommended_label": self.recommended, "backup_label": self.backup,
                "reasons": self.reasons}


def _cheaper(a: Standing, b: Standing, same_memory_within: float) -> str | None:
    """Why `a` is cheaper to serve than `b` ("2.3x less memory ..."), None when it is not shown."""
    if a.memory_bytes is not None and b.memory_bytes is not None:
        if a.memory_bytes * (1 + same_memory_within) < b.memory_bytes:
            return (f"{b.memory_bytes / a.memory_bytes:.1f}x less memory as served "
                    f"({a.memory_bytes / 2 ** 30:.3g} vs {b.memory_bytes / 2 ** 30:.3g} GiB)")
        if b.memory_bytes * (1 + same_memory_within) < a.memory_bytes:
            return None
    if a.latency_p50_ms is None or b.latency_p50_ms is None:
        return None
    noise = max(a.latency_noise, b.latency_noise)
    if a.latency_p50_ms * noise < b.latency_p50_ms:
        return (f"{1 - a.latency_p50_ms / b.latency_p50_ms:.0%} faster as served (p50 "
                f"{a.latency_p50_ms:.0f} vs {b.latency_p50_ms:.0f} ms, beyond the engines' "
                f"noise x{noise:.2f})")
    return None


def _clearly_better(comparison: PairedComparison, margin: float) -> bool:
    """The comparison's `other` is significantly better than its `base` by more than `margin`."""
    return comparison.significant_gain() is True and comparison.quality_gain.estimate > margin


def _difference(comparison: PairedComparison) -> str:
    """How `other` compares with `base`: 'not significantly different from v1 (McNemar p = 0.4)'."""
    if comparison.binary:
        test = f"McNemar p = {comparison.mcnemar.p_value:.2g}"
    else:
        gain = comparison.quality_gain
        test = f"paired BCa CI of the gain {gain.low:+.3f} to {gain.high:+.3f}"
    significant = comparison.significant_gain()
    if significant is None:
        return f"not significantly different from {comparison.base_label} ({test})"
    return f"significantly {'better' if significant else 'worse'} than {comparison.base_label} ({test})"


@dataclass(frozen=True)
class _Ranking:
    """How candidates are chosen among the eligible ones, and the reasons written for it."""

    pairs: dict[tuple[str, str], PairedComparison]
    metric: str
    fmt: str  # how a quality figure is printed
    margin: float
    same_memory_within: float

    def choose(self, pool: list[Standing], role: str, reasons: list[str]) -> Standing:
        """The best of `pool` by quality, or a cheaper one it does not clearly beat; the reason
        is appended to `reasons`."""
        best = pool[0]
        alternatives = []
        for other in pool[1:]:
            saving = _cheaper(other, best, self.same_memory_within)
            if saving and not _clearly_better(self.pairs[(other.label, best.label)], self.margin):
                alternatives.append((other, saving))
        if not alternatives:
            reasons.append(self._why_best(pool, role))
            return best
        # the cheapest of the alternatives: each of them cheaper than every other one it beats
        chosen, saving = alternatives[0]
        for other, other_saving in alternatives[1:]:
            if _cheaper(other, chosen, self.same_memory_within):
                chosen, saving = other, other_saving
        metric, fmt = self.metric, self.fmt
        reasons.append(f"{role} {chosen.label}: {metric} {chosen.quality:{fmt}} vs "
                       f"{best.quality:{fmt}} for {best.label}, "
                       f"{_difference(self.pairs[(best.label, chosen.label)])}; {saving}")
        return chosen

    def _why_best(self, pool: list[Standing], role: str) -> str:
        """Why the best of `pool` by quality is chosen: the only one, or against each other."""
        best, metric, fmt = pool[0], self.metric, self.fmt
        if len(pool) == 1:
            return (f"{role} {best.label}: {metric} {best.quality:{fmt}}, the only "
                    f"{'eligible' if role == 'recommended' else 'other eligible'} candidate")
        others = []
        for other in pool[1:]:
            saving = _cheaper(best, other, self.same_memory_within)
            others.append(f"{other.label} {metric} {other.quality:{fmt}}, "
                          f"{_difference(self.pairs[(best.label, other.label)])}"
                          + (f"; {best.label}: {saving}" if saving else ""))
        return (f"{role} {best.label}: the best {metric} ({best.quality:{fmt}}); "
                + "; ".join(others))


def recommend(standings: list[Standing], pairs: dict[tuple[str, str], PairedComparison], *,
              metric: str, greater_is_better: bool, margin: float,
              same_memory_within: float) -> Recommendation:
    """The recommended candidate and the backup, with reasons in plain words and numbers.

    `pairs[(a, b)]`: the paired comparison with base a and other b, for every ordered pair.
    """
    sign = 1.0 if greater_is_better else -1.0
    fmt = ".0%" if all(0 <= s.quality <= 1 for s in standings) and metric == "exact_match" \
        else ".3f"
    eligible = [s for s in standings if s.decision is Decision.PROMOTE]
    notes = [f"{s.label}: verdict {s.decision.value}, not eligible" for s in standings
             if s.decision is not Decision.PROMOTE]
    ranked = sorted(eligible, key=lambda s: -sign * s.quality)  # stable: input order on ties
    if not ranked:
        return Recommendation(None, None, ["no candidate's verdict allows promotion", *notes])
    unmeasured = [s.label for s in ranked if s.memory_bytes is None and s.latency_p50_ms is None]
    if unmeasured:
        notes.append(f"cost as served not measured for {', '.join(unmeasured)} "
                       "(evaluation.latency.sample_rows 0): it cannot count as cheaper")
    ranking = _Ranking(pairs, metric, fmt, margin, same_memory_within)
    reasons: list[str] = []
    recommended = ranking.choose(ranked, "recommended", reasons)
    rest = [s for s in ranked if s is not recommended]
    backup = ranking.choose(rest, "backup", reasons) if rest else None
    if backup is None:
        reasons.append("no backup: no other candidate's verdict allows promotion")
    return Recommendation(recommended.label, backup.label if backup else None, reasons + notes)

"""Paired statistics: the exact McNemar test, the paired bootstrap and the power note."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, norm

from tunelens.config import load_config
from tunelens.errors import TunelensError
from tunelens.evaluators.scoring.stats import (McNemarResult, ModelScores, QualityMetricInfo,
                                       compare_paired, mcnemar_exact, paired_bootstrap,
                                       paired_score_interval)


def paired_rows(both: int, base_only: int, other_only: int, neither: int):
    """Exact-match arrays with the given 2x2 table of (base right?, other right?)."""
    base = [True] * both + [True] * base_only + [False] * other_only + [False] * neither
    other = [True] * both + [False] * base_only + [True] * other_only + [False] * neither
    return np.array(base), np.array(other)


def scores(label, exact, words=None) -> ModelScores:
    return ModelScores(label, exact, np.full(len(exact), 10) if words is None else words)


@pytest.mark.parametrize("b, c, expected", [
    (0, 6, 2 / 64),                     # every discordant row favours one model: 2·(1/2)^6
    (1, 5, 2 * (1 + 6) / 64),           # 2·(C(6,0)+C(6,1))/2^6
    (2, 8, 2 * (1 + 10 + 45) / 1024),   # 2·(C(10,0)+C(10,1)+C(10,2))/2^10
    (3, 3, 1.0),                        # an even split is no evidence at all
    (0, 0, 1.0),                        # no discordant rows: nothing to test
    (0, 5, 2 / 32),                     # five rows can never reach 0.05
])
def test_mcnemar_hand_worked(b, c, expected):
    base, other = paired_rows(both=7, base_only=b, other_only=c, neither=4)
    result = mcnemar_exact(base, other)
    assert (result.base_only, result.other_only) == (b, c)
    assert result.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_scipy_binomtest_on_many_tables():
    rng = np.random.default_rng(7)
    tables = [(int(b), int(c)) for b, c in rng.integers(0, 60, size=(60, 2))]
    tables += [(480, 560), (1000, 1001), (3, 40), (250, 200)]
    for b, c in tables:
        base, other = paired_rows(both=11, base_only=b, other_only=c, neither=5)
        expected = binomtest(c, b + c, 0.5).pvalue if b + c else 1.0
        assert mcnemar_exact(base, other).p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)
        # swapping the models changes nothing in a two-sided test
        assert mcnemar_exact(other, base).p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_concordant_rows_do_not_change_mcnemar():
    few = mcnemar_exact(*paired_rows(0, 2, 9, 0))
    many = mcnemar_exact(*paired_rows(500, 2, 9, 300))
    assert few.p_value == many.p_value


def test_bootstrap_keeps_rows_paired():
    """other = base + 1 on every row: a paired bootstrap CI of the difference is exactly [1, 1]."""
    base = np.random.default_rng(0).normal(50, 20, 80)
    ci = paired_bootstrap(base, base + 1, n_resamples=500, level=0.95, seed=3)
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((1, 1, 1))
    ratio = paired_bootstrap(base + 200, 2 * (base + 200), np.median, n_resamples=500, level=0.9,
                             seed=3, combine="ratio")
    assert (ratio.estimate, ratio.low, ratio.high) == pytest.approx((2, 2, 2))


def test_bootstrap_matches_a_plain_loop_and_is_seeded():
    rng = np.random.default_rng(1)
    base, other = rng.normal(0, 1, 40), rng.normal(0.3, 1, 40)
    ci = paired_bootstrap(base, other, n_resamples=300, level=0.9, seed=11)
    # the same resamples drawn row by row, one at a time
    draw = np.random.default_rng(11).integers(0, 40, size=(300, 40))
    diffs = [other[idx].mean() - base[idx].mean() for idx in draw]
    assert ci.estimate == pytest.approx(other.mean() - base.mean())
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(diffs, [0.05, 0.95])))
    assert paired_bootstrap(base, other, n_resamples=300, level=0.9, seed=11) == ci
    assert paired_bootstrap(base, other, n_resamples=300, level=0.9, seed=12) != ci


def test_bootstrap_interval_covers_the_true_difference_about_as_often_as_it_says():
    rng = np.random.default_rng(5)
    covered = 0
    for rep in range(200):
        skill = rng.normal(0, 1, 120)  # rows differ in difficulty; both models see the same rows
        base = skill + rng.normal(0, 1, 120)
        other = skill + 0.5 + rng.normal(0, 1, 120)
        ci = paired_bootstrap(base, other, n_resamples=400, level=0.9, seed=rep)
        covered += ci.low <= 0.5 <= ci.high
    assert 0.82 <= covered / 200 <= 0.96


def test_power_note_min_discordant_and_min_detectable_gain_against_scipy():
    config = load_config()
    n_rows, b, c = 200, 20, 24
    comparison = compare_paired(scores("base", paired_rows(100, b, c, 56)[0]),
                                scores("ft", paired_rows(100, b, c, 56)[1]), config)
    note = comparison.power
    assert note.min_discordant == 6  # 2·(1/2)^5 = 0.0625 >= 0.05 > 2·(1/2)^6
    # the most even significant split of 44 discordant rows, found by brute force with scipy
    best = min(2 * k - 44 for k in range(23, 45) if binomtest(k, 44, 0.5).pvalue < 0.05)
    assert note.min_detectable_gain == pytest.approx(best / n_rows)
    # Connor (1987): n = (z_.975·√ψ + z_.8·√(ψ-δ²))² / δ², ψ = 44/200, δ = 4/200
    psi, delta = 44 / 200, 4 / 200
    hand = (1.959964 * math.sqrt(psi) + 0.841621 * math.sqrt(psi - delta ** 2)) ** 2 / delta ** 2
    assert abs(note.rows_needed - hand) < 1
    assert "too small to decide" in comparison.warning
    assert f"about {note.rows_needed} rows" in comparison.warning


def test_rows_needed_gives_about_the_promised_power():
    """Simulate test sets of `rows_needed` rows at the same rates: ~80% reach p < 0.05."""
    base, other = paired_rows(30, 10, 20, 40)  # psi = 0.3, delta = 0.1
    note = compare_paired(scores("b", base), scores("o", other), load_config()).power
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(400):
        cells = rng.choice(4, size=note.rows_needed, p=[0.3, 0.1, 0.2, 0.4])
        b_right, o_right = np.isin(cells, [0, 1]), np.isin(cells, [0, 2])
        hits += mcnemar_exact(b_right, o_right).p_value < 0.05
    assert 0.7 <= hits / 400 <= 0.9


def test_warning_when_too_few_rows_disagree_and_none_when_significant():
    base, other = paired_rows(2, 1, 2, 3)
    small = compare_paired(scores("base", base), scores("ft", other), load_config())
    assert "only 3 rows where the models disagree" in small.warning
    assert "needs at least 6" in small.warning and "too small to decide on 8 rows" in small.warning
    assert small.power.min_detectable_gain is None
    base, other = paired_rows(1, 0, 6, 3)  # a grammar fine-tune's jump: 10% -> 70% on ten rows
    decisive = compare_paired(scores("base", base), scores("ft", other), load_config())
    assert decisive.mcnemar.p_value == pytest.approx(1 / 32)
    assert decisive.warning is None
    same = np.arange(300) % 3 == 0
    assert compare_paired(scores("a", same), scores("b", same), load_config()).warning is None


def test_comparison_fields_follow_from_the_arrays():
    rng = np.random.default_rng(4)
    base_exact, other_exact = paired_rows(20, 5, 15, 10)
    base_words, other_words = rng.integers(30, 60, 50), rng.integers(10, 20, 50)
    comparison = compare_paired(scores("base", base_exact, base_words),
                                scores("ft", other_exact, other_words), load_config())
    assert comparison.quality_delta.estimate == pytest.approx(0.2)
    assert comparison.mean_words_delta.estimate == pytest.approx(other_words.mean() -
                                                                 base_words.mean())
    metrics = comparison.metrics()
    assert metrics["delta/exact_match"] == pytest.approx(0.2)
    assert metrics["delta/discordant_rows"] == 20
    assert metrics["delta/primary_gain_ci_low"] == pytest.approx(comparison.quality_cautious.low)
    # latency and memory are compared as served (evaluators/timing), never from the scored batch
    assert not any("latency" in name or "memory" in name for name in metrics)


def test_the_logged_gain_bound_is_oriented_so_that_positive_is_better():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.5, 30)
    other = base - rng.uniform(0.05, 0.15, 30)  # lower on every row
    lower_better = compare_paired(ModelScores("b", base, np.full(30, 5)),
                                  ModelScores("o", other, np.full(30, 5)), load_config(),
                                  metric=QualityMetricInfo("loss", greater_is_better=False))
    higher_better = compare_paired(ModelScores("b", base, np.full(30, 5)),
                                   ModelScores("o", other, np.full(30, 5)), load_config())
    assert lower_better.metrics()["delta/primary_gain_ci_low"] > 0
    assert higher_better.metrics()["delta/primary_gain_ci_low"] < 0


def test_bad_scores_are_one_clear_error():
    with pytest.raises(TunelensError, match="one length per row"):
        ModelScores("ft", np.ones(3, bool), np.ones(4))
    with pytest.raises(TunelensError, match="no rows"):
        ModelScores("ft", np.ones(0, bool), np.ones(0))
    with pytest.raises(TunelensError, match="finite"):
        ModelScores("ft", np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(TunelensError, match="same rows in the same order"):
        compare_paired(scores("b", np.ones(3, bool)), scores("o", np.ones(4, bool)), load_config())


def test_score_interval_closed_form_when_the_models_never_disagree():
    """b = c = 0: |nΔ| = z·√(n(-Δ - Δ²)) solves to Δ = -z² / (n + z²)."""
    z2 = norm.ppf(0.975) ** 2
    for n in (1, 10, 30, 1000):
        ci = paired_score_interval(McNemarResult(0, 0, 1.0), n, 0.95)
        assert ci.low == pytest.approx(-z2 / (n + z2), rel=1e-9)
        assert ci.high == pytest.approx(z2 / (n + z2), rel=1e-9)


@pytest.mark.parametrize("b, c, n", [(1, 7, 21), (5, 3, 100), (20, 24, 200), (0, 6, 10), (3, 0, 40)])
def test_score_interval_bounds_solve_the_score_equation(b, c, n):
    """At each bound the score statistic, with p_b maximised numerically under Δ, equals z."""
    ci = paired_score_interval(McNemarResult(b, c, 1.0), n, 0.95)
    for delta in (ci.low, ci.high):
        if abs(delta) >= 1 - 1e-9:
            continue

        def negative_loglik(p_base):  # multinomial cells: base only, other only, agree
            cells = np.array([p_base, p_base + delta, 1 - 2 * p_base - delta])
            counts = np.array([b, c, n - b - c])
            return -np.sum(counts[counts > 0] * np.log(np.clip(cells[counts > 0], 1e-300, None)))

        low, high = max(0.0, -delta), (1 - delta) / 2
        p_base = minimize_scalar(negative_loglik, bounds=(low, high), method="bounded",
                                 options={"xatol": 1e-12}).x
        variance = n * (2 * p_base + delta - delta ** 2)
        assert abs(c - b - n * delta) / math.sqrt(variance) == pytest.approx(norm.ppf(0.975),
                                                                              rel=1e-4)


def test_score_interval_covers_the_true_difference_on_small_test_sets():
    rng = np.random.default_rng(9)
    probabilities = [0.30, 0.04, 0.02, 0.64]  # both right, base only, other only, neither
    true_difference = 0.02 - 0.04
    covered = 0
    for _ in range(2000):
        b, c = rng.multinomial(40, probabilities)[1:3]
        ci = paired_score_interval(McNemarResult(int(b), int(c), 1.0), 40, 0.95)
        covered += ci.low <= true_difference <= ci.high
    assert covered / 2000 >= 0.93

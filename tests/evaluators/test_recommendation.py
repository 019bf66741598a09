"""The recommendation's rule on real paired tests of score arrays: eligibility, the cheaper one when
not clearly worse, the best when clearly better, and costs that were not measured or are noise."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tunelens.config import load_config
from tunelens.evaluators.scoring.recommendation import Standing, recommend
from tunelens.evaluators.scoring.stats import ModelScores, compare_paired
from tunelens.evaluators.verdict import Decision

GIB = 2 ** 30
CONFIG = load_config()


def _pairs(rows: dict[str, list[int]]):
    scores = {label: ModelScores(label, np.array(r, dtype=float), np.full(len(r), 5))
              for label, r in rows.items()}
    return {(a, b): compare_paired(scores[a], scores[b], CONFIG)
            for a, b in itertools.permutations(scores, 2)}


def _standing(label, rows, decision=Decision.PROMOTE, memory=1.0, latency=100.0, noise=1.05):
    return Standing(label, f"models:/m/{label}", decision, float(np.mean(rows)),
                    None if memory is None else int(memory * GIB), latency, noise)


def _recommend(standings, pairs):
    return recommend(standings, pairs, metric="exact_match", greater_is_better=True, margin=0.02,
                     same_memory_within=0.05)


# 40 rows: "a" right on 30, "b" on 28 (2 discordant rows, not significant), "c" on 10
A = [1] * 30 + [0] * 10
B = [1] * 28 + [0] * 12
C = [1] * 10 + [0] * 30


def test_the_cheaper_candidate_wins_when_the_better_one_is_not_clearly_better():
    pairs = _pairs({"a": A, "b": B})
    result = _recommend([_standing("a", A, memory=6.0), _standing("b", B, memory=2.5)], pairs)
    assert (result.recommended, result.backup) == ("b", "a")
    assert result.reasons[0].startswith("recommended b: exact_match 70% vs 75% for a, not "
                                        "significantly different from a (McNemar p = 0.5)")
    assert "2.4x less memory as served (2.5 vs 6 GiB)" in result.reasons[0]


def test_a_clearly_better_candidate_is_recommended_whatever_it_costs():
    pairs = _pairs({"a": A, "c": C})
    result = _recommend([_standing("c", C, memory=1.0), _standing("a", A, memory=8.0)], pairs)
    assert (result.recommended, result.backup) == ("a", "c")
    assert "significantly worse than a" in result.reasons[0]


def test_only_promote_verdicts_are_eligible():
    pairs = _pairs({"a": A, "b": B})
    result = _recommend([_standing("a", A, Decision.INCONCLUSIVE), _standing("b", B)], pairs)
    assert (result.recommended, result.backup) == ("b", None)
    assert "a: verdict INCONCLUSIVE, not eligible" in result.reasons
    nothing = _recommend([_standing("a", A, Decision.REJECT), _standing("b", B, Decision.REJECT)],
                         pairs)
    assert nothing.recommended is None and nothing.backup is None
    assert nothing.reasons[0] == "no candidate's verdict allows promotion"


@pytest.mark.parametrize("latency_b, noise, cheaper", [(80.0, 1.05, True), (97.0, 1.05, False),
                                                       (80.0, 1.4, False)])
def test_with_memory_alike_latency_decides_only_beyond_the_engines_noise(latency_b, noise,
                                                                          cheaper):
    pairs = _pairs({"a": A, "b": B})
    result = _recommend([_standing("a", A, memory=2.0, latency=100.0, noise=noise),
                         _standing("b", B, memory=2.04, latency=latency_b, noise=noise)], pairs)
    assert result.recommended == ("b" if cheaper else "a")


def test_unmeasured_costs_never_make_a_candidate_cheaper():
    pairs = _pairs({"a": A, "b": B})
    result = _recommend([_standing("a", A, memory=None, latency=None),
                         _standing("b", B, memory=None, latency=None)], pairs)
    assert result.recommended == "a"
    assert any("cost as served not measured for a, b" in line for line in result.reasons)

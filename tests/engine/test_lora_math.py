"""The factored formulas against the same quantities computed on the materialised ΔW."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunelens.registry_hooks.engine import lora_math


def _factors(m, n, r, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -spread, r,
                                                                                dtype=torch.float64)
    right = torch.randn(r, n, generator=g, dtype=torch.float64)
    return left, right


SHAPES = [(48, 32, 4), (30, 70, 8), (5, 40, 8), (64, 64, 1)]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_factored_svd_matches_dense_singular_values_and_reconstructs(m, n, r):
    left, right = _factors(m, n, r)
    delta = 2.5 * left @ right
    u, s, v = lora_math.factored_svd(left, right, 2.5)
    dense = np.linalg.svd(delta.numpy(), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), dense[: s.numel()], rtol=1e-10, atol=1e-12)
    assert np.all(dense[s.numel():] < 1e-10 * dense[0])  # nothing beyond rank r
    np.testing.assert_allclose((u * s) @ v.T, delta, atol=1e-12)
    assert lora_math.frobenius(s) == pytest.approx(float(delta.norm()), rel=1e-12)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_balanced_factors_reconstruct_and_give_back_the_singular_vectors(m, n, r):
    left, right = _factors(m, n, r)
    u, s, v = lora_math.factored_svd(left, right, -1.5)
    x, s_balanced, y = lora_math.balanced_factored_svd(left, right, -1.5)
    np.testing.assert_allclose(s_balanced, s, rtol=1e-12)
    np.testing.assert_allclose(x @ y.T, -1.5 * left @ right, atol=1e-12)
    u_back, v_back = lora_math.singular_vectors(x, s_balanced, y)
    np.testing.assert_allclose(u_back, u, atol=1e-9)
    np.testing.assert_allclose(v_back, v, atol=1e-9)
    norms, x_norms = lora_math.batched_row_norms(x, s_balanced)
    np.testing.assert_allclose(norms, (-1.5 * left @ right).norm(dim=1), rtol=1e-10)
    np.testing.assert_allclose(x_norms, x.norm(dim=1), rtol=1e-12)


def test_rank_measures_on_a_known_spectrum():
    s = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64).sort(descending=True).values
    p = np.array([4, 3]) / 7
    assert lora_math.effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert lora_math.stable_rank(s) == pytest.approx(25 / 16)
    assert lora_math.energy_rank(s, 0.6) == 1  # 16/25 = 0.64 >= 0.6
    assert lora_math.energy_rank(s, 0.9) == 2
    zero = torch.zeros(4, dtype=torch.float64)
    assert (lora_math.effective_rank(zero), lora_math.stable_rank(zero),
            lora_math.energy_rank(zero, 0.9)) == (0.0, 0.0, 0)


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 8), (True, 16 / math.sqrt(8))])
def test_lora_scale(rslora, expected):
    assert lora_math.lora_scale(16, 8, rslora) == pytest.approx(expected)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_row_norms_block_means_and_sum_from_factors(m, n, r):
    left, right = _factors(m, n, r, seed=1)
    delta = -0.7 * left @ right
    np.testing.assert_allclose(lora_math.row_norms(left, right, -0.7), delta.norm(dim=1),
                               rtol=1e-10)
    blocks = 7
    heat = lora_math.block_means(left, right, -0.7, blocks)
    rows = [k * m // min(m, blocks) for k in range(min(m, blocks) + 1)]
    cols = [k * n // min(n, blocks) for k in range(min(n, blocks) + 1)]
    expected = [[float(delta[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].mean())
                 for j in range(len(cols) - 1)] for i in range(len(rows) - 1)]
    np.testing.assert_allclose(heat, expected, atol=1e-12)
    np.testing.assert_allclose(lora_math.block_means_dense(delta, blocks), expected, atol=1e-12)
    assert lora_math.entry_sum(left, right, -0.7) == pytest.approx(float(delta.sum()), abs=1e-10)


@pytest.mark.parametrize("m,n,r,spread", [(300, 200, 8, 1.0), (257, 1000, 16, 0.0),
                                          (40, 3, 2, 2.0), (1000, 600, 4, 3.0)])
def test_extreme_entries_are_exact_and_skip_most_of_a_large_delta(m, n, r, spread):
    left, right = _factors(m, n, r, seed=2, spread=spread)
    u, s, v = lora_math.factored_svd(left, right, 1.3)
    x, y = lora_math.balanced_factors(u, s, v)
    low, high, evaluated = lora_math.extreme_entries(x, y, row_tile=32, seed=8)
    delta = 1.3 * left @ right
    assert low == pytest.approx(float(delta.min()), rel=1e-12)
    assert high == pytest.approx(float(delta.max()), rel=1e-12)
    if m * n >= 600_000:
        assert evaluated < 0.5 * m * n


def test_extreme_entries_of_an_all_negative_delta_visit_everything_needed():
    left = torch.ones(50, 1, dtype=torch.float64)
    right = -torch.linspace(1, 2, 30, dtype=torch.float64).unsqueeze(0)
    u, s, v = lora_math.factored_svd(left, right, 1.0)
    low, high, _ = lora_math.extreme_entries(*lora_math.balanced_factors(u, s, v), row_tile=8,
                                             seed=2, first_tile=2)
    assert (low, high) == (pytest.approx(-2.0), pytest.approx(-1.0))


def test_a_zero_row_outside_the_seed_block_is_the_maximum_of_a_negative_delta():
    """Entries 0 of a zero row beat every negative one: the search must reach rows of norm 0."""
    left = torch.ones(90, 1, dtype=torch.float64)
    left[70] = 0
    right = -torch.linspace(1, 2, 40, dtype=torch.float64).unsqueeze(0)
    x, y = left.unsqueeze(0), right.T.unsqueeze(0)
    low, high, _ = lora_math.batched_extreme_entries(x, y, seed=4, first_tile=2, row_tile=8)
    assert (float(low[0]), float(high[0])) == (-2.0, 0.0)


def test_entry_tiles_cover_every_entry_and_samples_are_entries():
    left, right = _factors(33, 21, 3, seed=3)
    u, s, v = lora_math.factored_svd(left, right, 1.0)
    x, y = lora_math.balanced_factors(u, s, v)
    tiles = torch.cat(list(lora_math.entry_tiles(x, y, max_entries=100)))
    np.testing.assert_allclose(tiles, left @ right, atol=1e-12)
    sample = lora_math.sample_entries(x, y, 500, torch.Generator().manual_seed(0))
    dense = (left @ right).reshape(-1)
    assert all(torch.isclose(dense, value, atol=1e-12).any() for value in sample[:50])


def test_amplification_factor_and_intruders_against_dense():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, 30, generator=g, dtype=torch.float64)
    left, right = _factors(40, 30, 4, seed=5)
    delta = 0.5 * left @ right
    u, s, v = lora_math.factored_svd(left, right, 0.5)
    du, ds, dvh = np.linalg.svd(delta.numpy())
    expected = np.linalg.norm(delta.numpy()) / np.linalg.norm(du[:, :4].T @ base.numpy() @ dvh[:4].T)
    assert lora_math.amplification_factor(u, v, s, base) == pytest.approx(expected, rel=1e-9)
    bu = np.linalg.svd(base.numpy(), full_matrices=False)[0]
    tu = np.linalg.svd((base + delta).numpy(), full_matrices=False)[0][:, :10]
    expected_intruders = int((np.abs(tu.T @ bu).max(axis=1) < 0.5).sum())
    assert lora_math.intruder_dimensions(base, base + delta, 10, 0.5) == expected_intruders
    # A huge rank-1 change in a fresh direction is an intruder by construction.
    spike = torch.zeros(40, 30, dtype=torch.float64)
    spike[:, 0] = 1000 * torch.linalg.svd(base)[0][:, -1]
    assert lora_math.intruder_dimensions(base, base + spike, 1, 0.5) == 1


def test_batched_expert_math_matches_each_dense_delta():
    """Stacks of experts, one of them untouched (B = 0, as an expert the router never picked) and
    one rank-deficient: singular values, spectrum metrics, row norms, sums and exact extremes
    against each materialised ΔW_e."""
    g = torch.Generator().manual_seed(3)
    left = torch.randn(5, 40, 4, generator=g, dtype=torch.float64)
    right = torch.randn(5, 4, 30, generator=g, dtype=torch.float64)
    left[1] = 0.0
    left[2, :, 3] = left[2, :, 0]  # rank 3
    scale = 0.5
    x, singular, y = lora_math.batched_factored_svd(left, right, scale)
    dense = scale * left @ right
    np.testing.assert_allclose(x @ y.transpose(-2, -1), dense, atol=1e-12)
    for e in range(5):
        expected = torch.linalg.svdvals(dense[e])[:4]
        np.testing.assert_allclose(singular[e], expected, atol=1e-9 * max(float(expected[0]), 1))
    spectrum = lora_math.batched_spectrum(singular)
    np.testing.assert_allclose(spectrum["fro"], dense.norm(dim=(1, 2)), rtol=1e-12)
    assert spectrum["fro"][1] == 0 and spectrum["effective_rank"][1] == 0
    assert spectrum["energy_rank_99"][1] == 0 and spectrum["stable_rank"][1] == 0
    for e in (0, 2, 3):
        assert spectrum["effective_rank"][e] == pytest.approx(
            lora_math.effective_rank(singular[e]), rel=1e-12)
        assert spectrum["energy_rank_90"][e] == lora_math.energy_rank(singular[e], 0.90)
    norms, x_norms = lora_math.batched_row_norms(x, singular)
    np.testing.assert_allclose(norms, dense.norm(dim=2), atol=1e-12)
    np.testing.assert_allclose(x_norms, x.norm(dim=2), rtol=1e-12)
    np.testing.assert_allclose(lora_math.batched_entry_sums(left, right, scale),
                               dense.sum(dim=(1, 2)), atol=1e-12)
    low, high, _ = lora_math.batched_extreme_entries(x, y, row_tile=4, seed=2, first_tile=2)
    np.testing.assert_allclose(high, dense.amax(dim=(1, 2)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(low, dense.amin(dim=(1, 2)), rtol=1e-12, atol=1e-15)

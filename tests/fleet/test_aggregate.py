"""Aggregation maths against straightforward numpy loops on random inputs.

The fleet manager's global model is only as right as these functions: each is compared with a
per-coordinate loop that states the definition literally.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.strategies.aggregate import (
    apply_masks,
    masked_weighted_mean,
    momentum_step,
    sparse_vote_merge,
    sum_arrays,
    topk_mask,
    topk_per_layer,
    union_masks,
    vote_counts,
    weighted_mean,
)

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
FAST = settings(max_examples=40, deadline=None)


def _random_inputs(
    seed: int, shape: tuple[int, ...], count: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(count)]
    masks = [rng.random(shape) < 0.5 for _ in range(count)]
    weights = [int(w) for w in rng.integers(1, 100, size=count)]
    return arrays, masks, weights


# -- means -------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, count=st.integers(1, 6))
def test_weighted_mean_matches_loop(seed: int, shape: tuple[int, ...], count: int) -> None:
    """FedAvg's mean is sum(n_i x_i) / sum(n_i) at every coordinate."""
    arrays, _, weights = _random_inputs(seed, shape, count)
    out = weighted_mean(arrays, weights)
    assert out.dtype == np.float32 and out.shape == shape
    for idx in itertools.product(*(range(s) for s in shape)):
        expected = sum(w * float(a[idx]) for a, w in zip(arrays, weights, strict=True)) / sum(
            weights
        )
        assert out[idx] == pytest.approx(expected, rel=1e-5, abs=1e-6)


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, count=st.integers(1, 6))
def test_masked_weighted_mean_matches_loop(seed: int, shape: tuple[int, ...], count: int) -> None:
    """FedDST's mean uses only the devices holding a coordinate; nobody -> the fallback value."""
    arrays, masks, weights = _random_inputs(seed, shape, count)
    fallback = np.random.default_rng(seed + 1).normal(size=shape).astype(np.float32)
    out = masked_weighted_mean(arrays, masks, weights, fallback)
    for idx in itertools.product(*(range(s) for s in shape)):
        holders = [i for i in range(count) if masks[i][idx]]
        if not holders:
            assert out[idx] == fallback[idx]
            continue
        num = sum(weights[i] * float(arrays[i][idx]) for i in holders)
        den = sum(weights[i] for i in holders)
        assert out[idx] == pytest.approx(num / den, rel=1e-5, abs=1e-6)


def test_masked_mean_ignores_values_outside_a_devices_mask() -> None:
    """A device's value outside its own mask (even NaN) must not leak into the mean."""
    a = np.array([1.0, np.nan], dtype=np.float32)
    b = np.array([3.0, 5.0], dtype=np.float32)
    out = masked_weighted_mean(
        [a, b], [np.array([True, False]), np.array([True, True])], [1, 1], np.zeros(2, np.float32)
    )
    np.testing.assert_allclose(out, [2.0, 5.0])


def test_means_reject_bad_weights_and_shapes() -> None:
    """Zero or negative example counts and mismatched shapes are caller bugs, not averages."""
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="> 0"):
        weighted_mean([x, x], [1, 0])
    with pytest.raises(ValueError, match="2 arrays but 1 weights"):
        weighted_mean([x, x], [1])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([x, np.ones(4, dtype=np.float32)], [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="mask 0 has shape"):
        masked_weighted_mean([x], [np.ones(2, bool)], [1], x)


# -- votes -------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=shapes,
    count=st.integers(1, 6),
    min_votes=st.integers(1, 7),
)
def test_votes_and_union_match_loop(
    seed: int, shape: tuple[int, ...], count: int, min_votes: int
) -> None:
    """A coordinate's vote is the number of masks holding it; the union needs min_votes."""
    _, masks, _ = _random_inputs(seed, shape, count)
    votes = vote_counts(masks)
    union = union_masks(masks, min_votes)
    for idx in itertools.product(*(range(s) for s in shape)):
        n = sum(bool(m[idx]) for m in masks)
        assert votes[idx] == n
        assert union[idx] == (n >= min_votes)


def test_union_refuses_min_votes_below_one() -> None:
    """min_votes = 0 would make every coordinate a candidate, which is no union at all."""
    with pytest.raises(ValueError, match="min_votes"):
        union_masks([np.ones(2, bool)], 0)


# -- top-k -------------------------------------------------------------------------------------


def _topk_reference(scores: np.ndarray, k: int, priority: np.ndarray | None) -> np.ndarray:
    flat = scores.reshape(-1)
    pri = np.zeros(flat.size, int) if priority is None else priority.reshape(-1)

    def key(i: int) -> tuple[int, float, int]:
        s = float(flat[i])
        return (-int(pri[i]), -(s if not np.isnan(s) else -np.inf), i)

    chosen = sorted(range(flat.size), key=key)[: max(0, min(k, flat.size))]
    out = np.zeros(flat.size, bool)
    out[chosen] = True
    return out.reshape(scores.shape)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=shapes,
    k=st.integers(-1, 130),
    use_priority=st.booleans(),
    ties=st.booleans(),
)
def test_topk_matches_sorted_reference(
    seed: int, shape: tuple[int, ...], k: int, use_priority: bool, ties: bool
) -> None:
    """Top-k keeps the best k by (priority, score), ties to the lower flat index, k clipped."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=shape)
    if ties:
        scores = np.round(scores)  # many equal scores
    priority = rng.integers(0, 3, size=shape) if use_priority else None
    out = topk_mask(scores, k, priority)
    np.testing.assert_array_equal(out, _topk_reference(scores, k, priority))
    assert out.sum() == max(0, min(k, scores.size))


def test_topk_ranks_nan_last() -> None:
    """A NaN score must never beat a number (a NaN weight is the first to go)."""
    out = topk_mask(np.array([np.nan, -5.0, 1.0]), 2)
    np.testing.assert_array_equal(out, [False, True, True])


def test_topk_per_layer_gives_each_layer_its_own_count() -> None:
    """Each layer keeps exactly its budget, whatever the other layers' magnitudes."""
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=(4, 5)) * 100, "b": rng.normal(size=7)}
    masks = topk_per_layer(scores, {"a": 3, "b": 5})
    assert masks["a"].sum() == 3 and masks["b"].sum() == 5
    with pytest.raises(ValueError, match="no scores"):
        topk_per_layer(scores, {"c": 1})


# -- momentum, sums, masks ---------------------------------------------------------------------


def test_momentum_step_matches_hand_computation() -> None:
    """FedAvgM: v' = beta v + (w - avg); w' = w - lr v' (worked by hand for two coordinates)."""
    w = np.array([1.0, -2.0], dtype=np.float32)
    avg = np.array([0.5, -1.0], dtype=np.float32)
    v = np.array([0.2, 0.4], dtype=np.float32)
    new_w, new_v = momentum_step(w, avg, v, beta=0.9, server_lr=1.0)
    # delta = [0.5, -1.0]; v' = [0.18 + 0.5, 0.36 - 1.0] = [0.68, -0.64]
    np.testing.assert_allclose(new_v, [0.68, -0.64], rtol=1e-6)
    # w' = [1 - 0.68, -2 + 0.64] = [0.32, -1.36]
    np.testing.assert_allclose(new_w, [0.32, -1.36], rtol=1e-6)
    half_w, _ = momentum_step(w, avg, v, beta=0.9, server_lr=0.5)
    np.testing.assert_allclose(half_w, [1 - 0.34, -2 + 0.32], rtol=1e-6)


def test_momentum_without_beta_is_fedavg() -> None:
    """beta = 0 and server lr 1 must reduce FedAvgM to FedAvg's average."""
    rng = np.random.default_rng(1)
    w, avg = rng.normal(size=(2, 10)).astype(np.float32)
    new_w, new_v = momentum_step(w, avg, np.ones(10, np.float32), beta=0.0, server_lr=1.0)
    np.testing.assert_allclose(new_w, avg, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_v, w - avg, rtol=1e-6, atol=1e-7)


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, count=st.integers(1, 5))
def test_sum_arrays_matches_loop(seed: int, shape: tuple[int, ...], count: int) -> None:
    """PruneFL's importance is the plain elementwise sum over devices."""
    arrays = [np.abs(a) for a in _random_inputs(seed, shape, count)[0]]
    expected = np.zeros(shape)
    for a in arrays:
        for idx in itertools.product(*(range(s) for s in shape)):
            expected[idx] += float(a[idx])
    np.testing.assert_allclose(sum_arrays(arrays), expected, rtol=1e-12)


def test_apply_masks_zeroes_outside_and_leaves_inputs_alone() -> None:
    """Masked entries become zero in a copy; dense tensors pass through; the input is untouched."""
    w = {"a": np.arange(4, dtype=np.float32) + 1, "b": np.ones(2, dtype=np.float32)}
    out = apply_masks(w, {"a": np.array([True, False, True, False])})
    np.testing.assert_array_equal(out["a"], [1, 0, 3, 0])
    np.testing.assert_array_equal(out["b"], [1, 1])
    np.testing.assert_array_equal(w["a"], [1, 2, 3, 4])


# -- FedDST's merge ----------------------------------------------------------------------------


def _merge_reference(
    g: np.ndarray,
    gmask: np.ndarray,
    arrays: list[np.ndarray],
    masks: list[np.ndarray],
    counts: list[int],
    budget: int,
    min_votes: int,
    fill: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The FedDST server step, coordinate by coordinate."""
    flat_values, tiers = [], []
    for j in range(g.size):
        holders = [i for i in range(len(arrays)) if masks[i].reshape(-1)[j]]
        if holders:
            num = sum(counts[i] * float(arrays[i].reshape(-1)[j]) for i in holders)
            value = num / sum(counts[i] for i in holders)
        else:
            value = float(g.reshape(-1)[j])
        flat_values.append(value)
        tiers.append(2 if len(holders) >= min_votes else (1 if holders else 0))
    order = sorted(range(g.size), key=lambda j: (-tiers[j], -abs(flat_values[j]), j))
    eligible = sum(t == 2 for t in tiers)
    k = budget if fill else min(budget, eligible)
    mask = np.zeros(g.size, bool)
    mask[order[:k]] = True
    values = np.where(mask, np.array(flat_values), 0.0)
    return values.reshape(g.shape), mask.reshape(g.shape)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=shapes,
    count=st.integers(1, 5),
    min_votes=st.integers(1, 4),
    fill=st.booleans(),
)
def test_sparse_vote_merge_matches_loop(
    seed: int, shape: tuple[int, ...], count: int, min_votes: int, fill: bool
) -> None:
    """Masked mean, votes and top-k back to the budget, exactly as FedDST's server states them."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    budget = int(rng.integers(0, size + 1))
    gmask = topk_mask(rng.random(shape), budget)
    g = np.where(gmask, rng.normal(size=shape), 0).astype(np.float32)
    arrays, masks, counts = _random_inputs(seed + 7, shape, count)
    arrays = [np.where(m, a, 0).astype(np.float32) for a, m in zip(arrays, masks, strict=True)]
    bias = rng.normal(size=(3,)).astype(np.float32)
    weights, new_masks = sparse_vote_merge(
        {"w": g, "b": bias},
        {"w": gmask},
        [{"w": a, "b": bias + i} for i, a in enumerate(arrays)],
        [{"w": m} for m in masks],
        counts,
        {"w": budget},
        min_votes=min_votes,
        fill_to_budget=fill,
    )
    exp_w, exp_m = _merge_reference(g, gmask, arrays, masks, counts, budget, min_votes, fill)
    np.testing.assert_array_equal(new_masks["w"], exp_m)
    np.testing.assert_allclose(weights["w"], exp_w, rtol=1e-5, atol=1e-6)
    assert not np.any(weights["w"][~new_masks["w"]])
    assert "b" not in new_masks
    expected_bias = bias + sum(c * i for i, c in enumerate(counts)) / sum(counts)
    # float32 means of values up to ~5 in size: an absolute error of a few ulps (~5e-7) is
    # rounding, which rtol alone misreads where the mean cancels to near zero (seed 2195).
    np.testing.assert_allclose(weights["b"], expected_bias, rtol=1e-5, atol=2e-6)
    if fill:
        assert new_masks["w"].sum() == budget


def test_merge_fills_budget_by_votes_then_magnitude() -> None:
    """With min_votes above what the devices agree on, the budget is still met: first from
    coordinates someone holds (largest mean first), then from the old global values."""
    g = np.array([0.0, 0.0, 0.0, 9.0], dtype=np.float32)
    gmask = np.array([False, False, False, True])
    a = np.array([1.0, 0.0, 3.0, 0.0], dtype=np.float32)
    b = np.array([2.0, 0.5, 0.0, 0.0], dtype=np.float32)
    ma, mb = np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)

    def merge(budget: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return sparse_vote_merge(
            {"w": g},
            {"w": gmask},
            [{"w": a}, {"w": b}],
            [{"w": ma}, {"w": mb}],
            [1, 1],
            {"w": budget},
            min_votes=2,
        )

    # Coordinate 0 has 2 votes (tier 2); in tier 1 coordinate 2 (|3|) beats 1 (|0.5|);
    # coordinate 3, which nobody holds, comes last despite its global |9|.
    np.testing.assert_array_equal(merge(2)[1]["w"], [True, False, True, False])
    np.testing.assert_array_equal(merge(3)[1]["w"], [True, True, True, False])
    weights, masks = merge(4)
    np.testing.assert_array_equal(masks["w"], [True, True, True, True])
    assert weights["w"][3] == 9.0  # nobody trained it: it keeps the global value


def test_merge_without_fill_lets_the_model_get_sparser() -> None:
    """The reference behaviour (opt-in): too few votes means fewer kept weights, not a fill."""
    g = np.zeros(4, dtype=np.float32)
    ma, mb = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    a = np.where(ma, 1.0, 0.0).astype(np.float32)
    _, masks = sparse_vote_merge(
        {"w": g},
        {"w": ma},
        [{"w": a}, {"w": a * mb}],
        [{"w": ma}, {"w": mb}],
        [1, 1],
        {"w": 2},
        min_votes=2,
        fill_to_budget=False,
    )
    np.testing.assert_array_equal(masks["w"], [True, False, False, False])

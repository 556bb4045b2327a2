"""Exact partial sums: any sharding of a round's results finishes to the same bits.

Sharded aggregation is only trustworthy if K = 1 and K = 3 workers produce the same global
model; float sums depend on order, so these tests throw adversarial magnitudes (1e-30 next to
1e30, subnormals, cancellation) at random splits and merge orders and demand bit equality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.strategies import create_strategy
from fleet.strategies.accumulate import Accumulator, ExactSum, aggregate_exact
from fleet.strategies.base import ClientResult, GlobalModel, Strategy

SHAPES = {"conv.weight": (5, 6), "fc.bias": (4,)}
MASKED = "conv.weight"
KEPT = 12  # kept entries of the masked tensor (the FedDST budget)


def _values(rng: np.random.Generator, shape: tuple[int, ...], wild: bool) -> np.ndarray:
    """float32 values; ``wild`` mixes magnitudes from 1e-40 (subnormal) to 1e30 and signs."""
    base = rng.standard_normal(shape)
    if wild:
        base = base * 10.0 ** rng.integers(-40, 31, size=shape)
    return base.astype(np.float32)


def _global_mask(rng: np.random.Generator) -> np.ndarray:
    flat = np.zeros(30, dtype=bool)
    flat[rng.choice(30, KEPT, replace=False)] = True
    return flat.reshape(SHAPES[MASKED])


def _setup(
    name: str, seed: int, devices: int, wild: bool
) -> tuple[Strategy, GlobalModel, list[ClientResult]]:
    rng = np.random.default_rng(seed)
    masked = name != "fedavg" and name != "fedavgm"
    gmask = _global_mask(rng) if masked else None
    weights = {n: _values(rng, s, False) for n, s in SHAPES.items()}
    masks = {}
    if gmask is not None:
        weights[MASKED] = np.where(gmask, weights[MASKED], np.float32(0)).astype(np.float32)
        masks[MASKED] = gmask
    model = GlobalModel(3, weights, masks, "tiny")
    options: dict[str, object] = {"clients_per_round": devices}
    if name == "prunefl":
        options["reconfig_every"] = 1
    strategy = create_strategy(name, **options)
    if name == "feddst":
        strategy.load_state_dict({f"budget/{MASKED}": np.array(KEPT, dtype=np.int64)})
    results = []
    for i in range(devices):
        w = {n: _values(rng, s, wild) for n, s in SHAPES.items()}
        m: dict[str, np.ndarray] = {}
        importance: dict[str, np.ndarray] = {}
        if gmask is not None:
            m[MASKED] = _global_mask(rng) if name == "feddst" else gmask
            w[MASKED] = np.where(m[MASKED], w[MASKED], np.float32(0)).astype(np.float32)
            if name == "prunefl" and i % 2 == 0:
                importance[MASKED] = np.abs(_values(rng, SHAPES[MASKED], wild))
        count = int(rng.integers(1, 5000))
        results.append(ClientResult(f"dev-{i:03d}", count, w, m, importance))
    return strategy, model, results


def _same(a: GlobalModel, b: GlobalModel) -> bool:
    return (
        a.version == b.version
        and a.weights.keys() == b.weights.keys()
        and all(a.weights[n].tobytes() == b.weights[n].tobytes() for n in a.weights)
        and a.masks.keys() == b.masks.keys()
        and all(np.array_equal(a.masks[n], b.masks[n]) for n in a.masks)
    )


def _sharded(
    name: str, model: GlobalModel, results: Sequence[ClientResult], owners: Sequence[int], k: int
) -> Accumulator:
    """Accumulate on ``k`` shards (result i on shard owners[i]), merge the shards in reverse."""
    shards = [Accumulator.for_model(name, model) for _ in range(k)]
    for owner, r in zip(owners, results, strict=True):
        shards[owner % k].add(r)
    merged = shards[-1]
    for s in reversed(shards[:-1]):
        merged.merge(s)
    return merged


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["fedavg", "fedavgm", "feddst", "prunefl"]),
    seed=st.integers(0, 2**32 - 1),
    devices=st.integers(1, 7),
    k=st.integers(1, 4),
    data=st.data(),
)
def test_any_sharding_finishes_to_the_same_bits(
    name: str, seed: int, devices: int, k: int, data: st.DataObject
) -> None:
    """K workers with any assignment and merge order == one accumulator, bit for bit, and the
    strategy's state (FedAvgM momentum, PruneFL counters) moves the same way."""
    strategy, model, results = _setup(name, seed, devices, wild=True)
    owners = data.draw(st.lists(st.integers(0, k - 1), min_size=devices, max_size=devices))
    order = data.draw(st.permutations(range(devices)))
    reference_strategy, _, _ = _setup(name, seed, devices, wild=True)
    reference = aggregate_exact(reference_strategy, 1, model, results)
    shuffled = [results[i] for i in order]
    merged = _sharded(name, model, shuffled, [owners[i] for i in order], k)
    got = merged.finish(strategy, 1, model)
    assert _same(got, reference)
    for key, value in reference_strategy.state_dict().items():
        assert np.array_equal(strategy.state_dict()[key], value)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "feddst", "prunefl"])
def test_equals_strategy_aggregate_when_float_sums_are_exact(name: str) -> None:
    """With values whose float64 running sums round nowhere (small-range values, small counts),
    the exact path reproduces ``strategy.aggregate`` bit for bit: it is the same algorithm."""
    strategy, model, results = _setup(name, 7, 5, wild=False)
    coarse = []
    for r in results:
        w = {n: (np.round(v * 64) / 64).astype(np.float32) for n, v in r.weights.items()}
        imp = {n: (np.round(v * 64) / 64).astype(np.float32) for n, v in r.importance.items()}
        coarse.append(ClientResult(r.device_id, r.num_examples % 64 + 1, w, r.masks, imp))
    mine, _, _ = _setup(name, 7, 5, wild=False)
    assert _same(aggregate_exact(mine, 1, model, coarse), strategy.aggregate(1, model, coarse))


def test_close_to_strategy_aggregate_on_wild_values() -> None:
    """Where the strategy's running float64 sum rounds, the exact mean differs by at most one
    float32 ulp (FedAvg, adversarial magnitudes)."""
    strategy, model, results = _setup("fedavg", 11, 6, wild=True)
    mine, _, _ = _setup("fedavg", 11, 6, wild=True)
    a = aggregate_exact(mine, 1, model, results)
    b = strategy.aggregate(1, model, results)
    for n in a.weights:
        ulp = np.spacing(np.abs(b.weights[n]))
        assert np.all(np.abs(a.weights[n].astype(np.float64) - b.weights[n]) <= ulp)


def test_exact_sum_matches_rational_arithmetic() -> None:
    """The limbs hold the exact sum: its float64 is within 2**-52 of the rational value, and
    removing an add restores the previous sum exactly."""
    rng = np.random.default_rng(3)
    rows = [_values(rng, (50,), True) for _ in range(9)]
    rows[0][:4] = [np.float32(1e-45), np.float32(-3e38), np.float32(3e38), np.float32(0.0)]
    weights = [int(w) for w in rng.integers(1, 2**29, 9)]
    acc = ExactSum(50)
    for v, w in zip(rows, weights, strict=True):
        acc.add(v, w)
    got = acc.to_float64()
    for j in range(50):
        exact = sum(
            (Fraction(float(v[j])) * w for v, w in zip(rows, weights, strict=True)), Fraction(0)
        )
        assert abs(Fraction(float(got[j])) - exact) <= abs(exact) * Fraction(1, 2**52)
    before = ExactSum(50)
    for v, w in zip(rows[1:], weights[1:], strict=True):
        before.add(v, w)
    acc.add(rows[0], -weights[0])
    assert acc.to_float64().tobytes() == before.to_float64().tobytes()


def test_remove_takes_back_an_uncounted_device() -> None:
    """A worker that accepted a device the coordinator does not count subtracts it exactly."""
    strategy, model, results = _setup("feddst", 5, 4, wild=True)
    acc = Accumulator.for_model("feddst", model)
    for r in results:
        acc.add(r)
    acc.remove(results[2])
    other, _, _ = _setup("feddst", 5, 4, wild=True)
    expected = aggregate_exact(other, 1, model, [r for i, r in enumerate(results) if i != 2])
    assert _same(acc.finish(strategy, 1, model), expected)


def test_serialised_partial_finishes_identically() -> None:
    """The handover file carries the exact state: from_bytes(to_bytes(a)) finishes like a."""
    strategy, model, results = _setup("prunefl", 9, 4, wild=True)
    acc = Accumulator.for_model("prunefl", model)
    for r in results:
        acc.add(r)
    copy = Accumulator.from_bytes(acc.to_bytes())
    other, _, _ = _setup("prunefl", 9, 4, wild=True)
    assert _same(copy.finish(strategy, 1, model), acc.finish(other, 1, model))
    with pytest.raises(ValueError, match="not a serialised accumulator"):
        Accumulator.from_bytes(b"garbage")


def test_a_device_counts_once() -> None:
    """Adding a device twice, or merging shards that share one, is refused."""
    _, model, results = _setup("fedavg", 1, 2, wild=False)
    a = Accumulator.for_model("fedavg", model)
    a.add(results[0])
    with pytest.raises(ValueError, match="already in this accumulator"):
        a.add(results[0])
    b = Accumulator.for_model("fedavg", model)
    b.add(results[0])
    with pytest.raises(ValueError, match="in both accumulators"):
        a.merge(b)
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        Accumulator.for_model("fedprox", model)
    assert math.isfinite(float(a.means(model)["fc.bias"][0]))

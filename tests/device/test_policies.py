"""Prune-and-regrow invariants (RigL/SET update) and the FedDST schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from device.errors import ConfigError
from device.sparse.policies import (
    drop_scores_magnitude_active,
    grow_scores_gradient,
    grow_scores_random,
    n_to_readjust,
    readjust_mask,
    zero_entries,
)
from device.sparse.schedule import ConstantAlpha, CosineAlpha, FedDSTSchedule

torch.set_num_threads(1)


@st.composite
def layers(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A random mask, weight and gradient of one layer, and a requested n (possibly too big).

    Scores come from a small integer range so that ties are frequent.
    """
    rows = draw(st.integers(1, 8))
    cols = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < draw(st.floats(0.0, 1.0))
    weight = torch.randint(-3, 4, (rows, cols), generator=g).float() * mask
    grad = torch.randint(-3, 4, (rows, cols), generator=g).float()
    n = draw(st.integers(0, rows * cols + 2))
    return mask, weight, grad, n


@given(layers())
@settings(max_examples=300, deadline=None)
def test_readjust_keeps_nnz_and_its_sets_are_disjoint_and_well_placed(
    layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """The density budget survives every readjustment: as many grow as drop, from the right sets."""
    mask, weight, grad, n = layer
    result = readjust_mask(
        mask, drop_scores_magnitude_active(weight, mask), grow_scores_gradient(grad), n
    )
    active = int(mask.sum())
    expected_n = min(n, active, mask.numel() - active)
    assert int(result.new_mask.sum()) == active
    assert int(result.dropped.sum()) == int(result.grown.sum()) == expected_n
    assert not (result.dropped & result.grown).any()
    assert not (result.dropped & ~mask).any(), "only active entries can be dropped"
    assert not (result.grown & mask).any(), "only entries inactive before the drop can grow"
    assert torch.equal(result.new_mask, (mask & ~result.dropped) | result.grown)


@given(layers())
@settings(max_examples=300, deadline=None)
def test_readjust_drops_the_smallest_magnitudes_and_grows_the_largest_gradients(
    layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    """RigL's rule: no surviving active weight is smaller than a dropped one, and no inactive
    entry left behind has a larger gradient than a grown one."""
    mask, weight, grad, n = layer
    result = readjust_mask(
        mask, drop_scores_magnitude_active(weight, mask), grow_scores_gradient(grad), n
    )
    survivors = mask & ~result.dropped
    if result.dropped.any() and survivors.any():
        assert weight.abs()[result.dropped].max() <= weight.abs()[survivors].min()
    left_out = ~mask & ~result.grown
    if result.grown.any() and left_out.any():
        assert grad.abs()[result.grown].min() >= grad.abs()[left_out].max()


def _reference_readjust(
    mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule spelled out with full sorts: drop the n lowest drop scores among the active
    entries, grow the n highest grow scores among the inactive ones, NaN counting as -inf,
    ties to the lower flat index."""
    flat = mask.reshape(-1)
    active = torch.nonzero(flat).reshape(-1)
    inactive = torch.nonzero(~flat).reshape(-1)
    d = torch.nan_to_num(drop.reshape(-1)[active], nan=float("-inf"))
    g = torch.nan_to_num(grow.reshape(-1)[inactive], nan=float("-inf"))
    dropped = torch.zeros_like(flat)
    dropped[active[torch.argsort(d, stable=True)[:n]]] = True
    grown = torch.zeros_like(flat)
    grown[inactive[torch.argsort(g, descending=True, stable=True)[:n]]] = True
    return dropped.reshape(mask.shape), grown.reshape(mask.shape)


@st.composite
def scored_layers(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A mask with drop and grow scores full of ties, NaNs and infinities, and a valid n."""
    size = draw(st.integers(2, 64))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(size, generator=g) < draw(st.floats(0.05, 0.95))
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])

    def scores() -> torch.Tensor:
        values = torch.randint(-2, 3, (size,), generator=g).float()
        pick = torch.rand(size, generator=g) < 0.3
        values[pick] = specials[torch.randint(0, 4, (int(pick.sum()),), generator=g)]
        return values

    active = int(mask.sum())
    n = draw(st.integers(0, max(0, min(active, size - active))))
    return mask, scores(), scores(), n


@given(scored_layers())
@settings(max_examples=400, deadline=None)
def test_readjust_picks_exactly_what_a_full_sort_picks(
    layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
) -> None:
    mask, drop, grow, n = layer
    result = readjust_mask(mask, drop[mask], grow, n)
    dropped, grown = _reference_readjust(mask, drop, grow, n)
    assert torch.equal(result.dropped, dropped)
    assert torch.equal(result.grown, grown)


def test_readjust_leaves_the_callers_scores_unchanged() -> None:
    mask = torch.tensor([True, False, True, False])
    drop = torch.tensor([float("nan"), 2.0])  # the active entries'
    grow = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    before = (drop.clone(), grow.clone())
    readjust_mask(mask, drop, grow, 1)
    assert torch.equal(drop.isnan(), before[0].isnan())
    assert torch.equal(torch.nan_to_num(drop), torch.nan_to_num(before[0]))
    assert torch.equal(torch.nan_to_num(grow), torch.nan_to_num(before[1]))


def test_nothing_grows_where_it_was_just_dropped() -> None:
    """A just-dropped weight with the largest gradient must not come straight back."""
    mask = torch.tensor([True, True, False, False])
    weight = torch.tensor([0.1, 5.0, 0.0, 0.0])
    grad = torch.tensor([100.0, 0.0, 1.0, 2.0])
    result = readjust_mask(
        mask, drop_scores_magnitude_active(weight, mask), grow_scores_gradient(grad), 1
    )
    assert result.dropped.tolist() == [True, False, False, False]
    assert result.grown.tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    ("mask", "expected"),
    [([True, True, True], 0), ([False, False, False], 0), ([True, False, False], 1)],
)
def test_n_is_clipped_by_the_active_and_inactive_counts(mask: list[bool], expected: int) -> None:
    """A full or empty layer has nothing to swap; the request must not break the count."""
    m = torch.tensor(mask)
    result = readjust_mask(m, torch.ones(int(m.sum())), torch.ones(3), 5)
    assert int(result.grown.sum()) == int(result.dropped.sum()) == expected
    assert int(result.new_mask.sum()) == int(m.sum())


def test_an_infinite_weight_never_lets_an_inactive_entry_be_dropped() -> None:
    """Selection is among the active indices, not by sentinel scores that an inf could tie."""
    mask = torch.tensor([False, True, True])
    weight = torch.tensor([0.0, float("inf"), float("inf")])
    result = readjust_mask(mask, weight.abs()[mask], torch.tensor([1.0, 0.0, 0.0]), 1)
    assert result.dropped.tolist() == [False, True, False]
    assert result.grown.tolist() == [True, False, False]


def test_readjust_rejects_mismatched_shapes_and_negative_n() -> None:
    """Scores for another layer, or a negative count, are caller bugs reported by name."""
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ConfigError, match="must have the mask's shape"):
        readjust_mask(mask, torch.ones(4), torch.ones(4), 1)
    with pytest.raises(ConfigError, match=">= 0"):
        readjust_mask(mask, torch.ones(4), torch.ones(2, 2), -1)


def test_zero_entries_starts_grown_weights_and_momentum_at_zero() -> None:
    """Grown weights start at zero in the weight and the momentum, other entries untouched."""
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    momentum = torch.tensor([4.0, 5.0, 6.0])
    zero_entries(torch.tensor([False, True, False]), weight, momentum, None)
    assert weight.tolist() == [1.0, 0.0, 3.0]
    assert momentum.tolist() == [4.0, 0.0, 6.0]
    grid = torch.nn.Parameter(torch.arange(1.0, 7.0).reshape(2, 3))
    zero_entries(torch.tensor([0, 4]), grid)  # flat positions, row-major
    assert grid.tolist() == [[0.0, 2.0, 3.0], [4.0, 0.0, 6.0]]


def test_random_grow_scores_are_reproducible_from_the_generator() -> None:
    """SET's random growth must be replayable from the round's seed."""
    a = grow_scores_random((3, 4), torch.Generator().manual_seed(7))
    b = grow_scores_random((3, 4), torch.Generator().manual_seed(7))
    c = grow_scores_random((3, 4), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 4) and bool(((a >= 0) & (a < 1)).all())


@pytest.mark.parametrize(("alpha", "active", "n"), [(0.3, 10, 3), (0.0, 10, 0), (1.0, 7, 7)])
def test_n_to_readjust_is_alpha_times_nnz(alpha: float, active: int, n: int) -> None:
    """FedDST swaps round(alpha_r * nnz_l) entries per layer."""
    assert n_to_readjust(alpha, active) == n


def test_n_to_readjust_refuses_alpha_outside_zero_one() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        n_to_readjust(1.5, 10)


# --- schedule ------------------------------------------------------------------------------


def test_cosine_alpha_follows_the_formula_and_ends_at_zero() -> None:
    """alpha_r = alpha/2 (1 + cos(pi r / T_end)); held at 0 from T_end on, not rising again."""
    schedule = CosineAlpha(0.4, 100)
    for r in (0, 1, 25, 50, 99):
        assert schedule(r) == pytest.approx(0.2 * (1 + math.cos(math.pi * r / 100)))
    assert schedule(0) == pytest.approx(0.4)
    assert schedule(50) == pytest.approx(0.2)
    assert schedule(100) == 0.0
    assert schedule(150) == 0.0


def test_constant_alpha_is_constant() -> None:
    assert ConstantAlpha(0.05)(1) == ConstantAlpha(0.05)(500) == 0.05


def test_feddst_schedule_readjusts_on_rounds_one_plus_multiples_of_r_adj_before_t_end() -> None:
    """Rounds 1, 1+R_adj, ... strictly before T_end, as in FedDST."""
    schedule = FedDSTSchedule(CosineAlpha(0.05, 20), readjust_every=5, t_end=20)
    assert [r for r in range(0, 40) if schedule.is_readjust_round(r)] == [1, 6, 11, 16]
    assert schedule.alpha(6) == CosineAlpha(0.05, 20)(6)


def test_feddst_schedule_can_start_later() -> None:
    schedule = FedDSTSchedule(ConstantAlpha(0.1), readjust_every=3, t_end=12, first_round=4)
    assert [r for r in range(0, 20) if schedule.is_readjust_round(r)] == [4, 7, 10]


@pytest.mark.parametrize(
    "build",
    [
        lambda: CosineAlpha(1.5, 10),
        lambda: CosineAlpha(0.1, 0),
        lambda: ConstantAlpha(-0.1),
        lambda: FedDSTSchedule(ConstantAlpha(0.1), readjust_every=0, t_end=10),
        lambda: FedDSTSchedule(ConstantAlpha(0.1), readjust_every=1, t_end=10, first_round=0),
    ],
)
def test_schedules_refuse_impossible_settings(build: Callable[[], object]) -> None:
    """A schedule that can never be right is a configuration error when it is built."""
    with pytest.raises(ConfigError):
        build()


def test_readjust_result_unpacks_as_new_mask_and_positions_and_gives_masks_too() -> None:
    """Callers may unpack the result positionally, in the documented order; ``dropped`` and
    ``grown`` read as bool masks of the weight's shape."""
    new_mask, dropped_at, grown_at = result = readjust_mask(
        torch.tensor([[True, False], [True, False]]), torch.ones(2), torch.ones(2, 2), 1
    )
    assert new_mask.tolist() == [[False, True], [True, False]]
    assert (dropped_at.tolist(), grown_at.tolist()) == ([0], [1])
    assert result.dropped.tolist() == [[True, False], [False, False]]
    assert result.grown.tolist() == [[False, True], [False, False]]


def test_readjust_of_a_layer_of_many_chunks_matches_a_full_sort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keys and the radix histograms are built chunk by chunk: a layer of many chunks."""
    import device.sparse.policies as policies

    monkeypatch.setattr(policies, "_CHUNK", 64)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        size = int(torch.randint(200, 2000, (1,), generator=g))
        mask = torch.rand(size, generator=g) < 0.2
        drop = torch.randint(-4, 5, (size,), generator=g).float()
        grow = torch.randint(-4, 5, (size,), generator=g).float()
        drop[torch.rand(size, generator=g) < 0.05] = float("nan")
        n = int(torch.randint(1, int(mask.sum()) + 1, (1,), generator=g))
        result = readjust_mask(mask, drop[mask], grow, n)
        dropped, grown = _reference_readjust(mask, drop, grow, n)
        assert torch.equal(result.dropped, dropped)
        assert torch.equal(result.grown, grown)


@pytest.mark.parametrize("chunk", [64, 1 << 18])
def test_scratch_scores_give_the_same_readjustment_and_only_they_are_overwritten(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """``scratch_scores`` only saves the copies: same masks; without it the caller's scores are
    left as they were (NaN included)."""
    import device.sparse.policies as policies

    monkeypatch.setattr(policies, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(11)
    for _ in range(30):
        size = int(torch.randint(200, 2000, (1,), generator=g))
        mask = torch.rand(size, generator=g) < 0.3
        drop = torch.randint(-4, 5, (size,), generator=g).float()
        grow = torch.randn(size, generator=g)
        drop[torch.rand(size, generator=g) < 0.05] = float("nan")
        n = int(torch.randint(1, int(mask.sum()) + 1, (1,), generator=g))
        drop = drop[mask]  # the active entries'
        kept_drop, kept_grow = drop.clone(), grow.clone()
        copied = readjust_mask(mask, drop, grow, n)
        assert torch.equal(drop.nan_to_num(0.5), kept_drop.nan_to_num(0.5))
        assert torch.equal(grow, kept_grow)
        scratch = readjust_mask(mask, drop, grow, n, scratch_scores=True)
        assert not torch.equal(grow, kept_grow), "the scratch scores were copied after all"
        for a, b in zip(copied, scratch, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_drop_scores_of_the_active_entries_only_give_the_same_readjustment(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """``[nnz]`` magnitudes of the active entries in flat order select what a full sort of the
    whole tensor's magnitudes selects, ties (to the lower flat index) and NaN (dropped first)
    included; a score of the wrong length is refused with both shapes named."""
    import device.sparse.policies as policies

    monkeypatch.setattr(policies, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(12)
    for _ in range(40):
        size = int(torch.randint(50, 1500, (1,), generator=g))
        mask = torch.rand(size, generator=g) < 0.3
        if not mask.any():
            continue
        weight = torch.randint(-4, 5, (size,), generator=g).float() * mask
        weight[torch.rand(size, generator=g) < 0.03] = float("nan")
        grow = torch.randn(size, generator=g)
        n = int(torch.randint(1, int(mask.sum()) + 1, (1,), generator=g))
        result = readjust_mask(mask, drop_scores_magnitude_active(weight, mask), grow, n)
        dropped, grown = _reference_readjust(mask, weight.abs(), grow, n)
        assert torch.equal(result.dropped, dropped)
        assert torch.equal(result.grown, grown)
    mask = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ConfigError, match=r"drop score \(2,\).*\(3,\), one per active entry"):
        readjust_mask(mask, torch.ones(2), torch.ones(2, 2), 1)

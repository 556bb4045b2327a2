"""Masks outside the model: exact kept counts, deterministic top-k, zeroing in place."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from device.errors import ConfigError
from device.sparse.density import kept_count
from device.sparse.masks import (
    apply_masks,
    clear_outside,
    count_nonzero,
    flat_positions,
    flat_positions32,
    initial_masks,
    mask_density,
    masks_equal,
    positions_of_ranks,
    topk_mask,
)

torch.set_num_threads(1)


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_topk_breaks_ties_by_lower_flat_index() -> None:
    """Equal scores (e.g. all-zero gradients) must select the same entries on every machine."""
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    assert topk_mask(scores, 3).tolist() == [[False, True, True], [True, False, False]]


def test_topk_ranks_nan_below_every_number() -> None:
    """A NaN weight must never be chosen over a real one."""
    scores = torch.tensor([float("nan"), -5.0, 1.0])
    assert topk_mask(scores, 2).tolist() == [False, True, True]


@pytest.mark.parametrize(("k", "expected"), [(-3, 0), (0, 0), (99, 4)])
def test_topk_clips_k_to_the_tensor(k: int, expected: int) -> None:
    """An out-of-range k keeps nothing or everything instead of failing mid-round."""
    assert int(topk_mask(torch.arange(4.0), k).sum()) == expected


@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=100, deadline=None)
def test_magnitude_masks_keep_exactly_the_largest_weights(
    rows: int, cols: int, density: float, seed: int
) -> None:
    """FedDST's initial mask keeps round(d * n) entries, all at least as large as any pruned one."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = initial_masks({"w": weight}, {"w": density})["w"]
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert int(mask.sum()) == kept_count(density, weight.numel())
    if mask.any() and (~mask).any():
        assert weight.abs()[mask].min() >= weight.abs()[~mask].max()


def test_random_masks_are_reproducible_from_the_generator_and_exact_in_count() -> None:
    """Random init draws only from the given generator: same seed, same mask."""
    weights = {"a": torch.zeros(20, 30), "b": torch.zeros(7)}
    densities = {"a": 0.25, "b": 0.5}

    def draw(seed: int) -> dict[str, torch.Tensor]:
        return initial_masks(
            weights, densities, method="random", generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = draw(1), draw(1), draw(2)
    assert masks_equal(first, again)
    assert not masks_equal(first, other)
    assert count_nonzero(first) == {"a": 150, "b": 4}


def test_random_masks_without_a_generator_are_refused() -> None:
    """An unseeded draw would make a run irreproducible."""
    with pytest.raises(ConfigError, match="Generator"):
        initial_masks({"a": torch.zeros(3)}, {"a": 0.5}, method="random")


def test_initial_masks_reject_an_unknown_method_listing_the_known_ones() -> None:
    """Registries say what they accept."""
    with pytest.raises(
        ValueError, match="unknown mask init method 'snip'; known: magnitude, random"
    ):
        initial_masks({"a": torch.zeros(3)}, {"a": 0.5}, method="snip")  # type: ignore[arg-type]


def test_initial_masks_reject_a_density_for_a_missing_weight() -> None:
    """A density for a tensor the model lacks is a configuration mistake, named in the message."""
    with pytest.raises(ConfigError, match="'ghost'"):
        initial_masks({"a": torch.zeros(3)}, {"ghost": 0.5})


def test_apply_masks_zeroes_exactly_the_masked_weights_and_keeps_state_dict_keys() -> None:
    """Masks live outside the model: applying them changes values, never the state_dict layout."""
    model = tiny_model()
    keys = list(model.state_dict())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    masks = initial_masks({"0.weight": model.get_parameter("0.weight")}, {"0.weight": 0.3})
    apply_masks(model, masks)
    after = model.state_dict()
    assert list(after) == keys
    mask = masks["0.weight"]
    assert torch.all(after["0.weight"][~mask] == 0)
    assert torch.equal(after["0.weight"][mask], before["0.weight"][mask])
    for name in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(after[name], before[name])
    weight = model.get_parameter("0.weight")
    assert weight.requires_grad and weight.grad is None  # still a trainable leaf


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"9.weight": torch.ones(5, 6, dtype=torch.bool)}, "names no parameter"),
        ({"0.weight": torch.ones(6, 5, dtype=torch.bool)}, r"shape \(6, 5\)"),
        ({"0.weight": torch.ones(5, 6)}, "must be bool"),
    ],
)
def test_apply_masks_refuses_masks_that_do_not_fit_the_model(
    masks: dict[str, torch.Tensor], message: str
) -> None:
    """A mask for another model must fail loudly, not broadcast or silently skip."""
    with pytest.raises(ConfigError, match=message):
        apply_masks(tiny_model(), masks)


def test_density_and_counts_add_up_over_layers() -> None:
    """mask_density is kept entries over all entries, across layers of different sizes."""
    masks = {
        "a": torch.tensor([True, False, False, False]),
        "b": torch.tensor([[True, True], [True, False], [False, False]]),
    }
    assert count_nonzero(masks) == {"a": 1, "b": 3}
    assert mask_density(masks) == pytest.approx(4 / 10)
    assert mask_density({}) == 1.0


@pytest.mark.parametrize("slice_", [5, 1 << 18])
def test_positions_of_ranks_index_the_kept_entries_in_flat_order(
    monkeypatch: pytest.MonkeyPatch, slice_: int
) -> None:
    """``positions_of_ranks(mask, ranks) == flat_positions(mask)[ranks]``, in the ranks' order
    (unsorted, repeated), over many slices of the mask and one; a rank past the last kept
    entry is an error, not a wrong position."""
    import device.sparse.masks as masks_module

    monkeypatch.setattr(masks_module, "_SLICE", slice_)
    g = torch.Generator().manual_seed(4)
    for _ in range(40):
        size = int(torch.randint(1, 400, (1,), generator=g))
        mask = torch.rand(size, generator=g) < float(torch.rand(1, generator=g))
        kept = int(mask.sum())
        if kept == 0:
            continue
        ranks = torch.randint(0, kept, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        assert torch.equal(positions_of_ranks(mask, ranks), flat_positions(mask)[ranks])
    with pytest.raises(IndexError, match="3 kept entries"):
        positions_of_ranks(torch.tensor([True, False, True, True]), torch.tensor([0, 3]))


@pytest.mark.parametrize("slice_", [3, 1 << 18])
def test_clear_outside_writes_exact_positive_zeros_off_the_mask_whatever_was_there(
    monkeypatch: pytest.MonkeyPatch, slice_: int
) -> None:
    """Off the mask: +0.0, where multiplying by the mask would leave NaN (inf * 0) or -0.0;
    on it: untouched, NaN included."""
    import device.sparse.masks as masks_module

    monkeypatch.setattr(masks_module, "_SLICE", slice_)
    values = torch.tensor([[float("inf"), -2.0, float("nan")], [-1.0, float("nan"), 3.0]])
    mask = torch.tensor([[False, False, True], [True, False, True]])
    clear_outside(values, mask)
    assert values[~mask].tolist() == [0.0, 0.0, 0.0]
    assert not torch.signbit(values[~mask]).any()
    assert torch.isnan(values[0, 2]) and values[1, 0] == -1.0 and values[1, 2] == 3.0


@pytest.mark.parametrize("slice_", [7, 1 << 18])
def test_flat_positions32_are_the_positions_as_int32(
    monkeypatch: pytest.MonkeyPatch, slice_: int
) -> None:
    """The same positions as ``flat_positions``, int32, over many slices and one."""
    import device.sparse.masks as masks_module

    monkeypatch.setattr(masks_module, "_SLICE", slice_)
    g = torch.Generator().manual_seed(8)
    for shape in [(0,), (1,), (5, 9), (30, 41), (3, 4, 5)]:
        mask = torch.rand(shape, generator=g) < 0.3
        positions = flat_positions32(mask)
        assert positions.dtype == torch.int32
        assert torch.equal(positions.long(), flat_positions(mask))

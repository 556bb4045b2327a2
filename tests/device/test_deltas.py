"""RoundStart: a round's start kept small, and ``final - start`` taken from it."""

from __future__ import annotations

import pytest
import torch

from device.deltas import RoundStart
from device.errors import ConfigError

torch.set_num_threads(1)


def state_and_masks() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    sparse_mask = torch.rand(40, 30, generator=g) < 0.2  # below 1/3: kept on its mask
    dense_mask = torch.rand(10, 30, generator=g) < 0.6  # above: kept whole
    state = {
        "sparse": torch.randn(40, 30, generator=g) * sparse_mask,
        "dense": torch.randn(10, 30, generator=g) * dense_mask,
        "bias": torch.randn(10, generator=g),
        "steps": torch.tensor(7),
    }
    return state, {"sparse": sparse_mask, "dense": dense_mask}


def trained(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Change every entry on the masks (and the unmasked ones), in place, as a round does."""
    g = torch.Generator().manual_seed(9)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=g) * masks.get(name, True))
        else:
            tensor.add_(3)


def test_deltas_in_place_are_the_same_and_live_in_the_final_tensors() -> None:
    """``in_place``: every float delta, the on-mask-start ones included, is computed in the
    final tensor's own memory (no model-sized copy at the end of a round) and equals the
    delta computed into new tensors; without it the final state is left as it was."""
    state, masks = state_and_masks()
    start = {name: tensor.clone() for name, tensor in state.items()}
    kept_a = RoundStart.of(state, masks)
    kept_b = RoundStart.of({n: t.clone() for n, t in state.items()}, masks)
    assert set(kept_a.on_mask) == {"sparse"} and set(kept_a.whole) == {"dense", "bias", "steps"}
    trained(state, masks)
    final = {name: tensor.clone() for name, tensor in state.items()}
    copied = kept_b.deltas(final, masks)
    for name, tensor in final.items():
        assert torch.equal(tensor, state[name]), f"{name} of the final state was written"
    in_place = kept_a.deltas(state, masks, in_place=True)
    for name, delta in in_place.items():
        expected = (final[name] - start[name]).float()
        if name in masks:
            expected = expected * masks[name]
        assert torch.equal(delta, copied[name])
        torch.testing.assert_close(delta, expected)
        if state[name].is_floating_point():
            assert delta.data_ptr() == state[name].data_ptr(), f"{name}'s delta is a copy"


def test_start_values_held_on_the_mask_are_used_not_copied_and_checked() -> None:
    """``held_on_mask``: the caller's kept values are the start (the same memory), the deltas
    the same as from a start the round took itself; values that do not fit the mask are a
    ConfigError naming the tensor, before anything is trained."""
    state, masks = state_and_masks()
    values = state["sparse"][masks["sparse"]].clone()
    own = RoundStart.of({n: t.clone() for n, t in state.items()}, masks)
    given = RoundStart.of(state, masks, held_on_mask={"sparse": values})
    assert given.on_mask["sparse"][1].data_ptr() == values.data_ptr()
    trained(state, masks)
    final = {name: tensor.clone() for name, tensor in state.items()}
    expected = own.deltas(final, masks)
    for name, delta in given.deltas(state, masks).items():
        assert torch.equal(delta, expected[name])
    with pytest.raises(ConfigError, match=r"'sparse' on its mask: \(3,\)"):
        RoundStart.of(state, masks, held_on_mask={"sparse": torch.zeros(3)})

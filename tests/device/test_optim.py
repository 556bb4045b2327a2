"""The device's own SGD: torch's arithmetic bit for bit, without torch.optim's import cost."""

from __future__ import annotations

import pytest
import torch

from device.optim import MomentumSGD, move_to_support, register_step_pre_hook


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(7, 5, generator=g).requires_grad_(),
        "b": torch.randn(11, generator=g).requires_grad_(),
        "c": torch.randn(3, 3, generator=g).requires_grad_(),
    }


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.5, 0.0), (0.9, 1e-3)])
def test_steps_equal_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    """Swapping torch.optim.SGD for MomentumSGD must not change a single trained weight."""
    ours, theirs = _tensors(0), _tensors(0)
    sgd = MomentumSGD(ours, lr=0.03, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(
        list(theirs.values()), lr=0.03, momentum=momentum, weight_decay=weight_decay
    )
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        for name in ours:
            if name == "c" and step % 2:  # a tensor without a gradient is skipped by both
                ours[name].grad = theirs[name].grad = None
                continue
            grad = torch.randn(ours[name].shape, generator=g)
            ours[name].grad, theirs[name].grad = grad.clone(), grad.clone()
        sgd.step()
        reference.step()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (step, name)
    for name, tensor in theirs.items():
        expected = reference.state.get(tensor, {}).get("momentum_buffer")
        got = sgd.momentum_buffer(ours[name])
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got is not None and torch.equal(got, expected)


def test_seeded_momentum_continues_where_it_was() -> None:
    """Rebuilding the optimiser mid-round (new value tensors after a readjust) with the old
    buffers must continue the momentum, not restart it."""
    one, two = _tensors(2), _tensors(2)
    first = MomentumSGD(one, lr=0.1, momentum=0.9)
    whole = MomentumSGD(two, lr=0.1, momentum=0.9)
    for _ in range(2):
        for name in one:
            one[name].grad = torch.ones_like(one[name])
            two[name].grad = torch.ones_like(two[name])
        first.step()
        whole.step()
    second = MomentumSGD(one, lr=0.1, momentum=0.9, momenta=first.momenta)
    for name in one:
        one[name].grad = torch.ones_like(one[name])
        two[name].grad = torch.ones_like(two[name])
    second.step()
    whole.step()
    for name in one:
        assert torch.equal(one[name], two[name])


def test_bad_settings_and_mismatched_momentum_are_rejected() -> None:
    tensors = _tensors(3)
    with pytest.raises(ValueError, match="lr must be > 0"):
        MomentumSGD(tensors, lr=0.0, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        MomentumSGD(tensors, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        MomentumSGD(tensors, lr=0.1, momentum=0.9, weight_decay=-1e-3)
    with pytest.raises(ValueError, match="momentum of 'a' has shape"):
        MomentumSGD(tensors, lr=0.1, momentum=0.9, momenta={"a": torch.zeros(3)})


def test_zero_grad_clears_every_gradient() -> None:
    tensors = _tensors(4)
    for tensor in tensors.values():
        tensor.grad = torch.ones_like(tensor)
    MomentumSGD(tensors, lr=0.1, momentum=0.9).zero_grad()
    assert all(t.grad is None for t in tensors.values())


def test_pre_hooks_see_every_step_until_removed() -> None:
    tensors = _tensors(5)
    sgd = MomentumSGD(tensors, lr=0.1, momentum=0.0)
    seen: list[MomentumSGD] = []
    handle = register_step_pre_hook(seen.append)
    sgd.step()
    sgd.step()
    handle.remove()
    sgd.step()
    assert seen == [sgd, sgd]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_momentum_on_a_support_equals_a_dense_buffer_bit_for_bit(
    weight_decay: float, dtype: torch.dtype
) -> None:
    """A tensor whose gradient and value are zero off its support (int64 or int32 positions)
    trains exactly as with a dense momentum buffer, which the support keeps in k floats; the
    buffer reads back dense."""
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(40, 30, generator=g) < 0.15
    support = mask.reshape(-1).nonzero().squeeze(1).to(dtype)
    start = torch.randn(40, 30, generator=g) * mask
    dense_w, sparse_w = start.clone().requires_grad_(), start.clone().requires_grad_()
    dense = MomentumSGD({"w": dense_w}, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    sparse = MomentumSGD(
        {"w": sparse_w}, lr=0.05, momentum=0.9, weight_decay=weight_decay, supports={"w": support}
    )
    for _ in range(5):
        grad = torch.randn(40, 30, generator=g) * mask
        dense_w.grad, sparse_w.grad = grad.clone(), grad.clone()
        dense.step()
        sparse.step()
        assert torch.equal(dense_w, sparse_w)
    assert sparse.momenta["w"].shape == support.shape
    assert torch.equal(sparse.momentum_buffer(sparse_w), dense.momentum_buffer(dense_w))


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_a_support_momentum_moves_to_a_new_mask_as_zeroing_a_dense_one_would(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Kept where both masks hold, 0 where grown, gone where dropped: what the readjustment
    does to a dense buffer (zero the dropped and grown entries, then it is zero off the mask).
    The new positions are taken a chunk at a time: many chunks, and one."""
    import device.optim

    monkeypatch.setattr(device.optim, "_MOVE_CHUNK", chunk)
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        old = torch.rand(300, generator=g) < 0.2
        new = (old & (torch.rand(300, generator=g) < 0.7)) | (torch.rand(300, generator=g) < 0.1)
        dense = torch.randn(300, generator=g) * old
        old_at, new_at = old.nonzero().squeeze(1), new.nonzero().squeeze(1)
        expected = dense.masked_fill(~(old & new), 0.0)[new_at]
        for dtype in (torch.int64, torch.int32):
            moved = move_to_support(dense[old_at], old_at.to(dtype), new_at.to(dtype))
            assert torch.equal(moved, expected)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(move_to_support(torch.zeros(0), empty, torch.tensor([2, 5])), torch.zeros(2))

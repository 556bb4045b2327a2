"""Weight gradients into persistent buffers: the same numbers as autograd, one tensor per layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import device.gradbuffers as gradbuffers
from device.errors import ConfigError
from device.gradbuffers import buffered_names, weight_grad_buffers
from device.models import create_model
from device.sparse.kernels import attach

torch.set_num_threads(1)

BIG = (512, 640)  # 1.25 MiB of float32: above MIN_BYTES
assert BIG[0] * BIG[1] * 4 >= gradbuffers.MIN_BYTES


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(BIG[1], BIG[0]), nn.ReLU(), nn.Linear(BIG[0], 10))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_shape", [(7, BIG[1]), (3, 5, BIG[1])])
@pytest.mark.parametrize("input_grad", [True, False])
def test_gradients_are_bit_for_bit_those_of_autograd(
    bias: bool, input_shape: tuple[int, ...], input_grad: bool
) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(BIG[1], BIG[0], bias=bias)
    plain = copy.deepcopy(layer)
    x = torch.randn(input_shape)
    xa, xb = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    _loss(plain, xa).backward()
    with weight_grad_buffers(layer) as names:
        assert names == {"weight"}
        out = layer(xb)
        assert torch.equal(out, plain(x))
        out.square().mean().backward()
    assert layer.weight.grad is not None and plain.weight.grad is not None
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    if bias:
        assert layer.bias.grad is not None and plain.bias.grad is not None
        assert torch.equal(layer.bias.grad, plain.bias.grad)
    if input_grad:
        assert xb.grad is not None and xa.grad is not None
        assert torch.equal(xb.grad, xa.grad)
    else:
        assert xb.grad is None


def test_every_step_writes_into_the_same_buffer() -> None:
    """What saves the memory: cleared (None) between steps, the gradient comes back in the one
    buffer the layer was given, and holds that step's gradient."""
    model, plain = _net(), _net()
    big = model[0].weight
    with weight_grad_buffers(model) as names:
        assert names == {"0.weight"}
        held = []
        for step in range(3):
            x = torch.randn(4, BIG[1], generator=torch.Generator().manual_seed(step))
            model.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
            _loss(model, x).backward()
            _loss(plain, x).backward()
            assert big.grad is not None
            assert torch.equal(big.grad, plain[0].weight.grad)
            held.append(big.grad)  # held: a new gradient could not reuse its memory
    assert all(grad is held[0] for grad in held)


def test_gradients_accumulate_like_autograd_when_not_cleared() -> None:
    """Without clearing, a second backward adds to the gradient, as autograd does, and so does a
    layer used twice in one graph."""
    torch.manual_seed(2)
    layer = nn.Linear(BIG[0], BIG[0])
    plain = copy.deepcopy(layer)
    x, x2 = torch.randn(4, BIG[0]), torch.randn(4, BIG[0])
    _loss(plain, x).backward()
    _loss(plain, x2).backward()
    plain(plain(x)).sum().backward()
    with weight_grad_buffers(layer):
        _loss(layer, x).backward()
        _loss(layer, x2).backward()
        layer(layer(x)).sum().backward()
    assert layer.weight.grad is not None and plain.weight.grad is not None
    assert torch.allclose(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(layer.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-7)


def test_only_large_trainable_linear_weights_outside_exclude_are_buffered() -> None:
    model = nn.Sequential(
        nn.Linear(BIG[1], BIG[0]),  # buffered
        nn.Linear(BIG[0], BIG[1]),  # excluded below
        nn.Linear(BIG[1], 4),  # small
        nn.Conv2d(64, 64, 9),  # large, but not a linear layer
        nn.Linear(BIG[1], BIG[0]),  # frozen
    )
    model[4].weight.requires_grad_(False)
    assert buffered_names(model) == {"0.weight", "1.weight"}
    assert buffered_names(model, frozenset({"1.weight"})) == {"0.weight"}
    assert buffered_names(model[0]) == {"weight"}


def test_exit_restores_the_layers_and_a_second_override_is_refused() -> None:
    model = _net()
    with weight_grad_buffers(model):
        assert "forward" in model[0].__dict__
        refused = pytest.raises(ConfigError, match=r"'0\.weight' already has an overridden")
        with refused, weight_grad_buffers(model):
            pass
        masks = {"0.weight": torch.ones(BIG, dtype=torch.bool)}
        with pytest.raises(ConfigError, match="already has an overridden forward"):
            attach(model, masks, frozenset({"0.weight"}))
        assert "forward" in model[0].__dict__  # the refused attempts left ours in place
    assert all("forward" not in m.__dict__ for m in model.modules())
    with weight_grad_buffers(model, exclude=frozenset({"0.weight"})) as names:
        assert names == frozenset()
        handle = attach(model, masks, frozenset({"0.weight"}))
        handle.detach()


def test_changing_the_weight_between_forward_and_backward_is_an_error() -> None:
    """The saved weight shares the parameter's version counter, so a stale backward fails
    loudly instead of computing a gradient for weights that no longer exist."""
    model = _net()
    with weight_grad_buffers(model):
        loss = _loss(model, torch.randn(2, BIG[1]))
        with torch.no_grad():
            model[0].weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [("femnist_cnn", {"fc1.weight"}), ("cifar_cnn", {"fc1.weight"}), ("mnist_cnn", set())],
)
def test_the_registered_models_buffer_their_large_linear_layers(
    model_name: str, expected: set[str]
) -> None:
    """femnist_cnn's fc1 (25.7 MB) is the gradient whose per-step allocation pushed dense
    rounds past 400 MB; mnist_cnn's fc1 (1.02 MB) is just under the threshold."""
    assert buffered_names(create_model(model_name, seed=0)) == expected

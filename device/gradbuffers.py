"""Weight gradients of large linear layers, computed into one persistent buffer per layer.

Why: autograd gives each step's weight gradient a new tensor, and the trainer clears it before
the next step (``grad = None``). For ``femnist_cnn``'s fc1 (2048 x 3136) that is 25.7 MB
allocated and freed every step. glibc serves it from the heap; when the next forward's
activations are placed in the hole the previous gradient left, the next gradient no longer fits
there and the heap grows by another 25.7 MB. With 2 torch threads a quarter to a third of dense
``femnist_cnn`` rounds peaked 24-50 MB higher than the rest (411-442 MB against 387 MB; a 1 GB
Raspberry Pi has 400 MB for a round). With the gradient written into one buffer per layer,
allocated once, the same round peaked at 368-372 MB in 20 of 20 runs, at the same step time
(docs/benchmarks.md, "Device step").

What a buffered layer computes is exactly what ``F.linear`` and its autograd backward compute,
bit for bit (the same ``mm`` products); only where the weight gradient lives differs. Semantics,
as autograd's own accumulation (``AccumulateGrad``):

* when the backward reaches the layer and ``weight.grad`` is None, the gradient is written into
  the layer's buffer, which becomes ``weight.grad``;
* otherwise it is added to ``weight.grad`` in place (gradients accumulated over several
  backward passes, or a layer used twice in one graph).

So a gradient stays valid until the next backward after its ``grad`` was cleared: a caller that
keeps one beyond that copies it (the trainer's optimiser clones it into its momentum buffer on
the first step). Not supported on a buffered weight: ``Tensor.register_hook`` hooks (autograd
never sees the weight's gradient) and double backward.

Only ``nn.Linear`` layers of at least :data:`MIN_BYTES` are buffered: smaller gradients come
from glibc's bins without growing the heap, and convolutions on a device are small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from device.forwards import ForwardOverrides

__all__ = ["MIN_BYTES", "buffered_names", "weight_grad_buffers"]

#: Weights of at least this many bytes get a buffer (1 MiB).
MIN_BYTES = 1 << 20


def buffered_names(model: nn.Module, exclude: frozenset[str] = frozenset()) -> frozenset[str]:
    """The weights (state_dict names) :func:`weight_grad_buffers` buffers: every trainable
    ``nn.Linear`` weight of at least :data:`MIN_BYTES` whose name is not in ``exclude``."""
    return frozenset(_buffered_layers(model, exclude))


def _buffered_layers(model: nn.Module, exclude: frozenset[str]) -> dict[str, nn.Linear]:
    layers: dict[str, nn.Linear] = {}
    for module_name, module in model.named_modules():
        if type(module) is not nn.Linear or not module.weight.requires_grad:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        weight = module.weight
        if name not in exclude and weight.numel() * weight.element_size() >= MIN_BYTES:
            layers[name] = module
    return layers


class _LinearIntoBufferFn(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient goes into ``layer``'s buffer.

    The backward sets or accumulates ``layer.weight.grad`` itself (module docstring) and
    returns None for ``weight``, so autograd makes no gradient tensor of its own; ``weight`` is
    still an input (the output needs a ``grad_fn`` even when neither ``x`` nor a bias requires
    grad). The input and bias gradients are what autograd's linear backward computes.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: nn.Linear,
        buffer: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.buffer, ctx.has_bias = layer, buffer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, weight.shape[0])
        x2 = x.reshape(-1, weight.shape[1])
        param = ctx.layer.weight
        if param.grad is None:
            torch.mm(g.t(), x2, out=ctx.buffer)
            param.grad = ctx.buffer
        else:
            param.grad.addmm_(g.t(), x2)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).view(x.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, None, grad_b, None, None


def _buffered_forward(buffer: torch.Tensor) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    """A linear layer's ``forward`` that computes its weight gradient into ``buffer``."""

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _LinearIntoBufferFn.apply(  # type: ignore[no-untyped-call]
            x, self.weight, self.bias, self, buffer
        )
        return out

    return forward


@contextmanager
def weight_grad_buffers(
    model: nn.Module, exclude: frozenset[str] = frozenset()
) -> Iterator[frozenset[str]]:
    """Within the block, the weights :func:`buffered_names` lists get their gradients in
    persistent buffers (module docstring); yields their names.

    The buffers (one weight's size each, allocated here) are released on exit, and each layer's
    own ``forward`` is back; a gradient that is still set stays valid (it is the buffer).
    ``exclude`` names layers another override computes (the sparse kernels' plan).
    """
    layers = _buffered_layers(model, exclude)
    overrides = ForwardOverrides()
    try:
        for name, layer in sorted(layers.items()):
            buffer = torch.empty_like(layer.weight)
            overrides.install(layer, _buffered_forward(buffer), what=repr(name))
        yield frozenset(layers)
    finally:
        overrides.restore()

"""What the kernels' autograd Functions share: their weight inputs and their weight gradients.

A kernel takes the kept values of the weight (``[nnz]``, CSR order) and, when the dense weight
gradient is wanted, the weight itself as a "dense sink"; its backward returns the on-mask gradient
of the values and, for the sink, the dense ``g^T x`` (see :mod:`device.sparse.kernels`).
"""

from __future__ import annotations

from typing import Any

import torch

from device.sparse.kernels.csr import CsrStructure, gather_values

__all__ = ["input_grads", "trained_leaf", "values_grad", "weight_inputs"]


def values_grad(
    ctx: Any, structure: CsrStructure, g_t: torch.Tensor, x: torch.Tensor
) -> torch.Tensor | None:
    """The gradient of the values at the kept entries only (``[nnz]``, CSR value order).

    ``g_t`` is ``[rows, n]`` (output gradient, transposed), ``x`` is ``[n, cols]``. In values
    mode (``ctx.values_leaf``: the handle's trained tensor) it goes to the leaf here, as
    ``device.gradbuffers`` does for dense weights, and None goes to autograd: written into the
    structure's reused buffer when the leaf's ``grad`` is None (no allocation per step),
    added to it otherwise (a layer used twice, or gradients accumulated over backward passes).
    Gathered values (weight mode) get a new tensor, through autograd.
    """
    if structure.nnz == 0:
        return torch.zeros(0, dtype=g_t.dtype)
    leaf: torch.Tensor | None = ctx.values_leaf
    if leaf is None:
        return structure.sampled(g_t, x, reuse=False)
    if leaf.grad is None:
        leaf.grad = structure.sampled(g_t, x, reuse=True)
    else:
        leaf.grad.add_(structure.sampled(g_t, x, reuse=False))
    return None


def trained_leaf(values: torch.Tensor) -> torch.Tensor | None:
    """``values`` when it is a trained leaf (values mode), else None (weight mode's gathered
    values). Kept on ``ctx`` as is: a leaf has no ``grad_fn``, so this makes no cycle."""
    return values if values.is_leaf and values.requires_grad else None


def input_grads(
    ctx: Any, structure: CsrStructure, g_t: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the values (``[nnz]``) and of the dense weight sink (``g_t @ x``, shaped
    like the weight), each only where autograd asks for it (inputs 1 and 2 of the Function).

    A sink (``ctx.sink``, a leaf: the weight) whose ``grad`` is still set gets the product added
    to it in place, as autograd would add it (``AccumulateGrad``), without a new weight-sized
    tensor (a trainer summing FedDST's growth gradient there, ``device.growth``); None goes to
    autograd for it, and the values get their on-mask gradient as on any other step."""
    grad_values = grad_dense = None
    sink: torch.Tensor | None = ctx.sink
    held = sink.grad if sink is not None else None
    if ctx.needs_input_grad[2] and held is not None and held.is_contiguous():
        held.view(structure.shape).addmm_(g_t, x)
        if ctx.needs_input_grad[1]:
            grad_values = values_grad(ctx, structure, g_t, x)
    elif ctx.needs_input_grad[2]:
        dense = torch.mm(g_t, x)
        grad_dense = dense.view(ctx.weight_shape)
        if ctx.needs_input_grad[1]:
            grad_values = dense.view(-1).index_select(0, structure.flat_index)
    elif ctx.needs_input_grad[1]:
        grad_values = values_grad(ctx, structure, g_t, x)
    return grad_values, grad_dense


def weight_inputs(
    weight: torch.Tensor, structure: CsrStructure, full_weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight mode's ``(values, dense_sink)``: the values gathered from ``weight`` with autograd
    (their gradient scatters into a dense, exactly-zero-elsewhere weight gradient), or, for the
    full gradient, gathered without autograd and the weight itself as the dense sink."""
    if full_weight_grad:
        return gather_values(weight.detach(), structure), weight
    return gather_values(weight, structure), None

"""The sparse linear kernel: ``y = x (W*M)^T + b`` with CSR products.

Forward ``W_csr @ x^T``; input gradient ``W^T_csr @ g^T``; weight gradient at the mask's
positions only, with ``torch.sparse.sampled_addmm``.
"""

from __future__ import annotations

from typing import Any

import torch

from device.sparse.kernels.csr import CsrStructure
from device.sparse.kernels.grads import input_grads, trained_leaf, weight_inputs

__all__ = ["SparseLinearFn", "linear_sparse"]


class SparseLinearFn(torch.autograd.Function):
    """``y = x (W*M)^T + b`` with CSR products; see :func:`linear_sparse`.

    Inputs: ``x``, ``values`` (``[nnz]``, CSR order: gets the on-mask gradient), ``dense_sink``
    (the weight or None: gets the dense ``g^T x`` when given and requiring grad), ``bias``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        dense_sink: torch.Tensor | None,
        bias: torch.Tensor | None,
        structure: CsrStructure,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, structure.shape[1])
        y = torch.mm(structure.matrix(values), x2.t()).t()
        if bias is not None:
            y = y + bias
        ctx.structure = structure
        ctx.has_bias = bias is not None
        ctx.weight_shape = torch.Size(structure.shape)
        ctx.sink = dense_sink
        ctx.save_for_backward(x2, values)
        ctx.values_leaf = trained_leaf(values)
        return y.contiguous().view(*x.shape[:-1], structure.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, values = ctx.saved_tensors
        structure: CsrStructure = ctx.structure
        g = grad_out.reshape(-1, structure.shape[0])
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(structure.transposed(values), g.t()).t()
            grad_x = grad_x.contiguous().view(*grad_out.shape[:-1], structure.shape[1])
        grad_values, grad_dense = input_grads(ctx, structure, g.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(0)
        return grad_x, grad_values, grad_dense, grad_b, None


def linear_sparse(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    structure: CsrStructure,
    *,
    full_weight_grad: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` computed with CSR, ``structure`` being the mask's.

    ``x`` is ``[..., in_features]``; ``weight`` is ``[out_features, in_features]`` and
    ``structure.shape`` must equal it. The weight gradient is zero outside the mask unless
    ``full_weight_grad`` (then it is the dense ``g^T x``, as masked dense compute gives it).
    """
    values, sink = weight_inputs(weight, structure, full_weight_grad)
    out: torch.Tensor = SparseLinearFn.apply(  # type: ignore[no-untyped-call]
        x, values, sink, bias, structure
    )
    return out

"""The sparse conv2d kernel (``groups == 1``, zero padding): im2col plus CSR products.

``unfold`` turns the input into one ``[C*kh*kw, B*L]`` matrix, so the whole batch is one product
with the ``[O, C*kh*kw]`` CSR view of the weight; ``fold`` brings the input gradient back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from device.errors import ConfigError
from device.sparse.kernels.csr import CsrStructure
from device.sparse.kernels.grads import input_grads, trained_leaf, weight_inputs

__all__ = ["conv2d_from_values", "conv2d_sparse"]


@dataclass(frozen=True)
class _ConvGeometry:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


class _SparseConv2dFn(torch.autograd.Function):
    """``conv2d(x, W*M, b)`` as im2col + CSR products; see :func:`conv2d_sparse`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        dense_sink: torch.Tensor | None,
        bias: torch.Tensor | None,
        structure: CsrStructure,
        geometry: _ConvGeometry,
        weight_shape: torch.Size,
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        kh, kw = geometry.kernel_size
        out_h = (
            height + 2 * geometry.padding[0] - geometry.dilation[0] * (kh - 1) - 1
        ) // geometry.stride[0] + 1
        out_w = (
            width + 2 * geometry.padding[1] - geometry.dilation[1] * (kw - 1) - 1
        ) // geometry.stride[1] + 1
        cols = F.unfold(
            x, geometry.kernel_size, geometry.dilation, geometry.padding, geometry.stride
        )  # [B, C*kh*kw, L]
        length = cols.shape[2]
        # One [C*kh*kw, B*L] matrix so that the whole batch is one CSR product.
        cols_t = cols.transpose(0, 1).reshape(structure.shape[1], batch * length)
        out = torch.mm(structure.matrix(values), cols_t)  # [O, B*L]
        out = out.view(structure.shape[0], batch, length).transpose(0, 1)
        if bias is not None:
            out = out + bias.view(1, -1, 1)
        ctx.structure = structure
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        ctx.input_hw = (height, width)
        ctx.weight_shape = weight_shape
        ctx.sink = dense_sink
        ctx.save_for_backward(cols_t, values)
        ctx.values_leaf = trained_leaf(values)
        return out.reshape(batch, structure.shape[0], out_h, out_w)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cols_t, values = ctx.saved_tensors
        structure: CsrStructure = ctx.structure
        geometry: _ConvGeometry = ctx.geometry
        batch, out_channels = grad_out.shape[0], grad_out.shape[1]
        g = grad_out.reshape(batch, out_channels, -1).transpose(0, 1).reshape(out_channels, -1)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cols = torch.mm(structure.transposed(values), g)  # [C*kh*kw, B*L]
            grad_cols = grad_cols.view(structure.shape[1], batch, -1).transpose(0, 1)
            grad_x = F.fold(
                grad_cols,
                ctx.input_hw,
                geometry.kernel_size,
                geometry.dilation,
                geometry.padding,
                geometry.stride,
            )
        grad_values, grad_dense = input_grads(ctx, structure, g, cols_t.t())
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(1)
        return grad_x, grad_values, grad_dense, grad_b, None, None, None


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"sparse conv2d needs an integer pair for {what}, got {value!r}")


def conv2d_sparse(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    structure: CsrStructure,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    full_weight_grad: bool = False,
) -> torch.Tensor:
    """``F.conv2d(x, weight * mask, bias, stride, padding, dilation)`` (groups 1, zero padding).

    ``x`` is ``[B, C, H, W]`` (or unbatched ``[C, H, W]``); ``weight`` is ``[O, C, kh, kw]`` and
    ``structure`` is the CSR structure of the mask viewed as ``[O, C * kh * kw]``.
    """
    values, sink = weight_inputs(weight, structure, full_weight_grad)
    return conv2d_from_values(
        x, values, sink, bias, structure, weight.shape, stride, padding, dilation
    )


def conv2d_from_values(
    x: torch.Tensor,
    values: torch.Tensor,
    dense_sink: torch.Tensor | None,
    bias: torch.Tensor | None,
    structure: CsrStructure,
    weight_shape: torch.Size,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """The conv2d kernel on ``values`` (``[nnz]``, CSR order) and an optional ``dense_sink``
    (see :mod:`device.sparse.kernels.grads`); ``x`` is ``[B, C, H, W]`` or unbatched."""
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    geometry = _ConvGeometry(
        kernel_size=(int(weight_shape[2]), int(weight_shape[3])),
        stride=_pair(stride, "stride"),
        padding=_pair(padding, "padding"),
        dilation=_pair(dilation, "dilation"),
    )
    out: torch.Tensor = _SparseConv2dFn.apply(  # type: ignore[no-untyped-call]
        x, values, dense_sink, bias, structure, geometry, weight_shape
    )
    return out.squeeze(0) if unbatched else out

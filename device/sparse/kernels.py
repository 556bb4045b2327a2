"""Sparse kernels that compute only at a mask's kept positions, and the per-layer choice of them.

A masked layer's weight is zero outside its mask, so a dense forward/backward spends most of its
work multiplying zeros. The kernels here compute with CSR (``torch.sparse_csr``) instead:

* **Linear**: ``y = x W^T + b`` as ``W_csr @ x^T``; the input gradient as ``W^T_csr @ g^T``; the
  weight gradient only at the mask's positions with ``torch.sparse.sampled_addmm``.
* **Conv2d** (``groups == 1``, zero padding): im2col (``unfold``) plus the same three CSR products
  on the ``[out_channels, in_channels * kh * kw]`` view of the weight, and ``fold`` for the input
  gradient.

Whether a kernel is faster than masked dense compute depends on the layer's shape, its density
and the CPU (on the development machine, forward + backward in values mode, CSR wins only for
large linear layers: 2048 x 3136 is 0.5-0.6x dense at density 0.1, 0.3-0.4x at 0.05 and about
1.1x at 0.2; convolutions lose at every density, see docs/benchmarks.md), so
:func:`choose_plan` picks per layer from a measured :class:`~device.wire.messages.DeviceProfile`
(see :mod:`device.profile`) and falls back to dense wherever the profile does not show a clear
gain.

Two ways to train a planned layer:

* **Weight mode** (:func:`linear_sparse`, :func:`conv2d_sparse`, ``attach(...)``): the CSR values
  are gathered from the live ``nn.Parameter`` at every forward and the weight gradient comes back
  dense, exactly zero outside the mask (``full_weight_grad``: the dense ``g^T x`` everywhere).
* **Values mode** (``attach(..., train_values=True)``): the handle holds, per planned layer, a leaf
  tensor of the kept values (CSR order) that the optimiser trains instead of the weight. Its
  gradient and momentum have ``nnz`` entries, so a step neither writes a dense weight gradient
  nor updates or masks pruned entries (at density 0.1 a tenth of the memory and memory traffic).
  The values' gradient is computed into one buffer per layer and set on the leaf by the
  backward (as ``device.gradbuffers`` does for dense weights), so a step allocates none of its
  ``nnz``-sized tensors anew. The weight gets a dense gradient only while ``full_weight_grad``
  is set (for importance and growth, never used by the optimiser), and receives the trained
  values on :meth:`KernelHandle.write_back` and :meth:`KernelHandle.detach`.

Invariants:

* ``state_dict`` keys never change: :func:`attach` only overrides the module's ``forward``. In
  weight mode the parameter is the source of truth at every moment; in values mode it is after
  :meth:`KernelHandle.write_back`, and the values are (re)gathered from it on
  :meth:`KernelHandle.refresh`. The CSR structure changes only on refresh.
* A kernel computes ``f(x, W * M)``: the forward ignores weight entries outside the mask, and the
  weight gradient is exactly zero outside the mask (unless ``full_weight_grad`` is set, see
  :class:`KernelHandle`). Inside the mask it equals masked dense compute up to float rounding.
* "Density" is the kept fraction of a weight, in [0, 1]; density 0 and 1 both work.
* CPU tensors only (the devices are CPUs; CSR products run on MKL or torch's native kernels).
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from device.errors import ConfigError, NotFoundError
from device.forwards import ForwardOverrides, is_overridden
from device.wire.messages import DeviceProfile, LayerProfile

__all__ = [
    "DEFAULT_MARGIN",
    "CsrStructure",
    "KernelHandle",
    "attach",
    "choose_plan",
    "conv2d_sparse",
    "csr_structure",
    "interpolate_point",
    "layer_cost",
    "linear_sparse",
    "supports_sparse",
]

# torch warns once per process that CSR support is "in beta"; the kernels are tested against
# dense compute here, so the warning carries no information for our users.
warnings.filterwarnings(
    "ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning
)

#: A sparse kernel is chosen only where it takes less than this fraction of the dense time, so that
#: measurement noise alone never makes a layer slower than masked dense.
DEFAULT_MARGIN = 0.9


@dataclass(frozen=True, eq=False)
class CsrStructure:
    """The CSR structure of a 2-D mask ``[rows, cols]`` and of its transpose.

    Attributes:
        shape: ``(rows, cols)`` of the weight's 2-D view.
        flat_index: int64 ``[nnz]``, row-major positions of the kept entries in the 2-D view,
            ascending (this is CSR value order).
        crow, col: int32 CSR row pointers ``[rows + 1]`` and column indices ``[nnz]``.
        t_crow, t_col: the same for the transposed ``[cols, rows]`` matrix.
        t_order: int32 ``[nnz]``; ``values[t_order]`` are the transposed matrix's CSR values.
    """

    shape: tuple[int, int]
    flat_index: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_order: torch.Tensor
    # Tensors made once per structure and reused by every step: (purpose, dtype) -> tensor.
    _cache: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        """Number of kept entries."""
        return int(self.flat_index.numel())

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``[rows, cols]`` holding ``values`` (CSR order) at the kept entries."""
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``[cols, rows]`` of the transpose, from the same ``values``.

        Its values live in one buffer per structure and dtype, rewritten by every call: the
        matrix is valid until the next call (the kernels use it at once, in a backward).
        """
        dtype = values.dtype
        permuted = self._cached("transposed", dtype, lambda: torch.empty(self.nnz, dtype=dtype))
        torch.index_select(values, 0, self.t_order, out=permuted)
        return torch.sparse_csr_tensor(
            self.t_crow, self.t_col, permuted, self.shape[::-1], check_invariants=False
        )

    def sampled(self, g_t: torch.Tensor, x: torch.Tensor, *, reuse: bool) -> torch.Tensor:
        """``(g_t @ x)`` at the kept entries, in CSR value order: ``[nnz]``.

        ``g_t`` is ``[rows, n]``, ``x`` is ``[n, cols]``. With ``reuse`` the result is a view of
        one buffer per structure and dtype that every such call rewrites; otherwise a new tensor.
        """
        dtype = g_t.dtype
        out = None
        if reuse:
            out = self._cached(
                "sampled", dtype, lambda: self.matrix(torch.empty(self.nnz, dtype=dtype))
            )
        result = torch.sparse.sampled_addmm(self.pattern(dtype), g_t, x, beta=0.0, out=out)
        values: torch.Tensor = result.values()
        return values

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """A CSR matrix of ones with this structure (``sampled_addmm``'s sampling pattern)."""
        return self._cached(
            "pattern", dtype, lambda: self.matrix(torch.ones(self.nnz, dtype=dtype))
        )

    def _cached(
        self, purpose: str, dtype: torch.dtype, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The structure's tensor for ``purpose`` and ``dtype``, made by ``make`` on first use."""
        key = (purpose, dtype)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _crow_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(torch.int32)


def csr_structure(mask2d: torch.Tensor) -> CsrStructure:
    """The :class:`CsrStructure` of a bool ``[rows, cols]`` mask (True = kept).

    int32 indices: MKL's sparse routines use them natively and they halve the index memory.
    Raises ``ConfigError`` if the mask is not 2-D bool or has more than 2**31 - 1 entries.
    """
    if mask2d.dtype != torch.bool or mask2d.dim() != 2:
        raise ConfigError(
            f"a CSR structure needs a 2-D bool mask, got {mask2d.dtype} of shape "
            f"{tuple(mask2d.shape)}"
        )
    rows, cols = (int(s) for s in mask2d.shape)
    if rows * cols >= 2**31:
        raise ConfigError(f"mask of shape {(rows, cols)} is too large for int32 CSR indices")
    mask2d = mask2d.detach().to("cpu")
    flat_index = mask2d.reshape(-1).nonzero().squeeze(1)
    # Row and column of each kept entry in int32 (rows * cols < 2**31): the temporaries of a
    # structure are a few times nnz, and it is built while the model is in memory.
    flat32 = flat_index.to(torch.int32)
    r = torch.div(flat32, cols, rounding_mode="floor")
    c = flat32 - r * cols
    del flat32
    # Transpose: sort the kept entries by (col, row); a stable sort by col keeps rows ascending.
    t_order = torch.sort(c, stable=True).indices.to(torch.int32)
    return CsrStructure(
        shape=(rows, cols),
        flat_index=flat_index,
        crow=_crow_from_rows(r, rows),
        col=c,
        t_crow=_crow_from_rows(c, cols),
        t_col=r.index_select(0, t_order),
        t_order=t_order,
    )


def _gather_values(weight: torch.Tensor, structure: CsrStructure) -> torch.Tensor:
    return weight.reshape(-1).index_select(0, structure.flat_index)


def _values_grad(
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


def _trained_leaf(values: torch.Tensor) -> torch.Tensor | None:
    """``values`` when it is a trained leaf (values mode), else None (weight mode's gathered
    values). Kept on ``ctx`` as is: a leaf has no ``grad_fn``, so this makes no cycle."""
    return values if values.is_leaf and values.requires_grad else None


def _input_grads(
    ctx: Any, structure: CsrStructure, g_t: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the values (``[nnz]``) and of the dense weight sink (``g_t @ x``, shaped
    like the weight), each only where autograd asks for it (inputs 1 and 2 of the Function)."""
    grad_values = grad_dense = None
    if ctx.needs_input_grad[2]:
        dense = torch.mm(g_t, x)
        grad_dense = dense.view(ctx.weight_shape)
        if ctx.needs_input_grad[1]:
            grad_values = dense.view(-1).index_select(0, structure.flat_index)
    elif ctx.needs_input_grad[1]:
        grad_values = _values_grad(ctx, structure, g_t, x)
    return grad_values, grad_dense


class _SparseLinearFn(torch.autograd.Function):
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
        ctx.save_for_backward(x2, values)
        ctx.values_leaf = _trained_leaf(values)
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
        grad_values, grad_dense = _input_grads(ctx, structure, g.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(0)
        return grad_x, grad_values, grad_dense, grad_b, None


def _weight_inputs(
    weight: torch.Tensor, structure: CsrStructure, full_weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight mode's ``(values, dense_sink)``: the values gathered from ``weight`` with autograd
    (their gradient scatters into a dense, exactly-zero-elsewhere weight gradient), or, for the
    full gradient, gathered without autograd and the weight itself as the dense sink."""
    if full_weight_grad:
        return _gather_values(weight.detach(), structure), weight
    return _gather_values(weight, structure), None


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
    values, sink = _weight_inputs(weight, structure, full_weight_grad)
    out: torch.Tensor = _SparseLinearFn.apply(  # type: ignore[no-untyped-call]
        x, values, sink, bias, structure
    )
    return out


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
        ctx.save_for_backward(cols_t, values)
        ctx.values_leaf = _trained_leaf(values)
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
        grad_values, grad_dense = _input_grads(ctx, structure, g, cols_t.t())
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
    values, sink = _weight_inputs(weight, structure, full_weight_grad)
    return _conv2d(x, values, sink, bias, structure, weight.shape, stride, padding, dilation)


def _conv2d(
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


def supports_sparse(module: nn.Module) -> bool:
    """True if :func:`attach` can give ``module`` a sparse kernel.

    That is an ``nn.Linear``, or an ``nn.Conv2d`` with ``groups == 1``, zero padding given as
    integers (not ``"same"``/``"valid"`` strings) and no custom padding mode.
    """
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def _matrix_view(weight: torch.Tensor) -> tuple[int, int]:
    return (int(weight.shape[0]), int(weight.numel() // max(int(weight.shape[0]), 1)))


def _module_of(model: nn.Module, weight_name: str) -> nn.Module:
    module_name, _, leaf = weight_name.rpartition(".")
    if leaf != "weight":
        raise ConfigError(f"sparse kernels apply to weights only, got {weight_name!r}")
    try:
        return model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise NotFoundError(
            f"the model has no layer {module_name!r} (for {weight_name!r})"
        ) from None


def _weight_of(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"{name!r} is not a tensor of the model")
    return weight


class KernelHandle:
    """The sparse kernels attached to one model by :func:`attach`.

    ``full_weight_grad`` (default False) makes attached layers return the dense weight gradient
    (what masked dense compute gives) while still computing the forward and the input gradient
    sparsely; set it while a trainer needs gradients at pruned positions (RigL/FedDST growth,
    PruneFL importance), at the cost of one dense ``g^T x`` product per layer. In values mode
    (``train_values``) that dense gradient goes to the weight and the values get theirs too.
    """

    def __init__(self, model: nn.Module, plan: frozenset[str], train_values: bool) -> None:
        self._model = model
        self._plan = plan
        self._train_values = train_values
        self._structures: dict[str, CsrStructure] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._overrides = ForwardOverrides()
        self._attached = False
        self.full_weight_grad = False

    @property
    def train_values(self) -> bool:
        """True in values mode: the optimiser trains :meth:`values`, not the weights."""
        return self._train_values

    def values(self, name: str) -> torch.Tensor:
        """Values mode: the leaf tensor (``[nnz]``, CSR order, ``requires_grad``) that holds the
        kept entries of weight ``name``; a new tensor after every :meth:`refresh`."""
        if not self._train_values:
            raise ConfigError("values() needs a handle attached with train_values=True")
        return self._values[name]

    def write_back(self) -> None:
        """Values mode: copy the trained values into the weights (no-op in weight mode).

        Entries outside the masks are left as they are (zero, for a masked model).
        """
        with torch.no_grad():
            for name, values in self._values.items():
                weight = _weight_of(_module_of(self._model, name), name)
                flat = self._structures[name].flat_index
                weight.view(-1).index_copy_(0, flat, values.detach())

    @property
    def plan(self) -> frozenset[str]:
        """The weight names that compute sparsely."""
        return self._plan

    @property
    def attached(self) -> bool:
        """True until :meth:`detach`."""
        return self._attached

    def structure(self, name: str) -> CsrStructure:
        """The CSR structure currently used for weight ``name`` (one in :attr:`plan`)."""
        return self._structures[name]

    def refresh(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the CSR structures of every planned layer from ``masks`` (after a mask change).

        Raises ``ConfigError`` if a planned name has no mask or the mask is not a bool tensor of
        the weight's shape.
        """
        structures: dict[str, CsrStructure] = {}
        for name in sorted(self._plan):
            weight = _weight_of(_module_of(self._model, name), name)
            if name not in masks:
                raise ConfigError(f"no mask for {name!r}, which the sparse kernel plan names")
            mask = masks[name]
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
                raise ConfigError(
                    f"mask {name!r} must be bool of shape {tuple(weight.shape)}, got "
                    f"{mask.dtype} of shape {tuple(mask.shape)}"
                )
            structures[name] = csr_structure(mask.reshape(_matrix_view(weight)))
        self._structures = structures
        if self._train_values:
            self._values = {
                name: _gather_values(
                    _weight_of(_module_of(self._model, name), name).detach(), structure
                ).requires_grad_()
                for name, structure in structures.items()
            }

    def _install(self) -> None:
        for name in sorted(self._plan):
            module = _module_of(self._model, name)
            self._overrides.install(module, self._forward_for(name, module), what=repr(name))
        self._attached = True

    def _inputs(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel's ``(values, dense_sink)`` for layer ``name`` at this step."""
        structure = self._structures[name]
        if not self._train_values:
            return _weight_inputs(weight, structure, self.full_weight_grad)
        return self._values[name], weight if self.full_weight_grad else None

    def _forward_for(self, name: str, module: nn.Module) -> Callable[..., torch.Tensor]:
        handle = self
        if isinstance(module, nn.Linear):

            def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
                values, sink = handle._inputs(name, self.weight)
                out: torch.Tensor = _SparseLinearFn.apply(  # type: ignore[no-untyped-call]
                    x, values, sink, self.bias, handle._structures[name]
                )
                return out

            return linear_forward

        def conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            values, sink = handle._inputs(name, self.weight)
            return _conv2d(
                x,
                values,
                sink,
                self.bias,
                handle._structures[name],
                self.weight.shape,
                self.stride,
                self.padding,
                self.dilation,
            )

        return conv_forward

    def detach(self) -> None:
        """Write the trained values back (values mode) and restore every attached module's own
        ``forward``; idempotent."""
        if not self._attached:
            return
        self.write_back()
        self._overrides.restore()
        self._attached = False


def attach(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    plan: frozenset[str],
    *,
    train_values: bool = False,
) -> KernelHandle:
    """Make every layer whose weight name is in ``plan`` compute with a sparse kernel.

    Only the module's ``forward`` is overridden (an instance attribute); parameters, buffers,
    ``state_dict`` keys and values are untouched. Call :meth:`KernelHandle.refresh` after a mask
    change and :meth:`KernelHandle.detach` to go back to dense compute. ``train_values`` selects
    values mode (module docstring): optimise ``handle.values(name)`` instead of the weights, and
    call :meth:`KernelHandle.write_back` before reading the weights (refresh regathers them).

    Raises:
        NotFoundError: a planned name is not a layer of ``model``.
        ConfigError: a planned layer is not supported (see :func:`supports_sparse`), is already
            attached, or its mask is missing or malformed.
    """
    for name in sorted(plan):
        module = _module_of(model, name)
        if not supports_sparse(module):
            raise ConfigError(
                f"no sparse kernel for {name!r} ({type(module).__name__}); only nn.Linear and "
                "nn.Conv2d with groups=1 and integer zero padding are supported"
            )
        if is_overridden(module):
            raise ConfigError(f"{name!r} already has an overridden forward (attached twice?)")
    handle = KernelHandle(model, frozenset(plan), train_values)
    handle.refresh(masks)
    handle._install()
    return handle


def interpolate_point(layer: LayerProfile, density: float) -> tuple[float, float]:
    """``(dense_s, sparse_s)`` of ``layer`` at ``density``, linear between measured densities.

    Outside the measured range the nearest point is used (below the lowest measured density
    that over-estimates the sparse time, which errs towards dense). ``sparse_s`` is 0 when
    either neighbour has no sparse measurement (no kernel for that layer).
    """
    if not layer.points:
        raise ConfigError(f"profile of layer {layer.name!r} has no measured points")
    if not math.isfinite(density) or not 0.0 <= density <= 1.0:
        raise ConfigError(f"density of {layer.name!r} must be in [0, 1], got {density!r}")
    points = sorted(layer.points, key=lambda p: p.density)
    if density <= points[0].density:
        return points[0].dense_s, points[0].sparse_s
    if density >= points[-1].density:
        return points[-1].dense_s, points[-1].sparse_s
    for lo, hi in itertools.pairwise(points):
        if lo.density <= density <= hi.density:
            span = hi.density - lo.density
            t = 0.0 if span <= 0 else (density - lo.density) / span
            dense = lo.dense_s + t * (hi.dense_s - lo.dense_s)
            if lo.sparse_s <= 0 or hi.sparse_s <= 0:
                return dense, 0.0
            return dense, lo.sparse_s + t * (hi.sparse_s - lo.sparse_s)
    raise AssertionError("unreachable: density lies between the first and last point")


def _decision_costs(layer: LayerProfile, density: float) -> tuple[float, float]:
    """``(dense_s, sparse_s)`` that :func:`choose_plan` and :func:`layer_cost` decide on.

    Both are made robust to one noisy measurement, in the direction of choosing dense:

    * masked dense compute does the same work at every density, so the interpolated dense time
      is capped by the median of the layer's dense times (a load spike during one dense
      measurement cannot make the kernel look faster there);
    * sparse work only grows with density, so the sparse time at ``density`` is at least every
      sparse time measured at a lower density (a lucky fast sparse measurement cannot either).
    """
    dense_s, sparse_s = interpolate_point(layer, density)
    dense_s = min(dense_s, statistics.median(p.dense_s for p in layer.points))
    if sparse_s > 0:
        below = [p.sparse_s for p in layer.points if p.density <= density and p.sparse_s > 0]
        sparse_s = max([sparse_s, *below])
    return dense_s, sparse_s


def _sparse_wins(dense_s: float, sparse_s: float, margin: float) -> bool:
    return sparse_s > 0.0 and sparse_s < margin * dense_s


def _check_margin(margin: float) -> None:
    if not 0.0 < margin <= 1.0:
        raise ConfigError(f"margin must be in (0, 1], got {margin!r}")


def choose_plan(
    profile: DeviceProfile, densities: Mapping[str, float], *, margin: float = DEFAULT_MARGIN
) -> frozenset[str]:
    """The layers (weight names) that should compute sparsely at the given densities.

    A layer is chosen only if the profile has a sparse measurement for it and its sparse time is
    below ``margin`` times its dense time at that density: both interpolated between measured
    densities, the dense time capped by the median of the layer's dense times (dense work does
    not depend on density) and the sparse time raised to the largest measured at a lower density
    (sparse work only grows with density). Every other layer, and every name the profile does
    not know, stays masked dense.

    Args:
        profile: the device's measured profile.
        densities: weight name -> kept fraction in [0, 1] (e.g. from the current masks).
        margin: in (0, 1]; 0.9 demands a 10% gain before leaving dense compute.
    """
    _check_margin(margin)
    layers = {layer.name: layer for layer in profile.layers}
    chosen = set()
    for name, density in densities.items():
        layer = layers.get(name)
        if layer is None:
            continue
        dense_s, sparse_s = _decision_costs(layer, density)
        if _sparse_wins(dense_s, sparse_s, margin):
            chosen.add(name)
    return frozenset(chosen)


def layer_cost(
    profile: DeviceProfile, name: str, density: float, *, margin: float = DEFAULT_MARGIN
) -> float:
    """Seconds per minibatch (one training step: forward, backward, update) of layer ``name`` at
    ``density`` on this device.

    The time of the kernel :func:`choose_plan` would pick with the same ``margin``: the sparse
    time where it wins, the masked dense time otherwise. PruneFL's round-time model
    ``T = c_0 + sum_l c_l * nnz_l`` takes ``c_l = layer_cost(...) / nnz_l`` at the layer's current
    density (``nnz_l = density * numel``); ``c_0`` is ``profile.step_overhead_s``.

    Raises:
        NotFoundError: the profile has no layer ``name`` (the message lists the known ones).
    """
    _check_margin(margin)
    for layer in profile.layers:
        if layer.name == name:
            dense_s, sparse_s = _decision_costs(layer, density)
            return sparse_s if _sparse_wins(dense_s, sparse_s, margin) else dense_s
    known = ", ".join(layer.name for layer in profile.layers)
    raise NotFoundError(
        f"the profile of {profile.model_name!r} has no layer {name!r}; known: {known}"
    )

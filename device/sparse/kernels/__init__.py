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

The package, one concept per module (import from ``device.sparse.kernels``): ``csr`` (the CSR
structure of a mask and its per-step buffers), ``grads`` (the weight inputs and gradients the
kernels share), ``linear`` and ``conv`` (the two kernels), ``handle`` (:func:`attach`,
:class:`KernelHandle`) and ``plan`` (:func:`choose_plan`, :func:`layer_cost`).
"""

from __future__ import annotations

from device.sparse.kernels.conv import conv2d_sparse
from device.sparse.kernels.csr import CsrStructure, csr_structure
from device.sparse.kernels.handle import KernelHandle, attach, supports_sparse
from device.sparse.kernels.linear import linear_sparse
from device.sparse.kernels.plan import DEFAULT_MARGIN, choose_plan, interpolate_point, layer_cost

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

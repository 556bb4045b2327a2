"""Attaching the sparse kernels to a model: :func:`attach` and the :class:`KernelHandle`.

Only the planned modules' ``forward`` is overridden; the handle owns their CSR structures and, in
values mode, the leaf tensors of kept values that the optimiser trains instead of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from device.errors import ConfigError, NotFoundError
from device.forwards import ForwardOverrides, is_overridden
from device.sparse.kernels.conv import conv2d_from_values
from device.sparse.kernels.csr import CsrStructure, csr_structure, gather_values
from device.sparse.kernels.grads import weight_inputs
from device.sparse.kernels.linear import SparseLinearFn

__all__ = ["KernelHandle", "attach", "supports_sparse"]


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
                name: gather_values(
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
            return weight_inputs(weight, structure, self.full_weight_grad)
        return self._values[name], weight if self.full_weight_grad else None

    def _forward_for(self, name: str, module: nn.Module) -> Callable[..., torch.Tensor]:
        handle = self
        if isinstance(module, nn.Linear):

            def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
                values, sink = handle._inputs(name, self.weight)
                out: torch.Tensor = SparseLinearFn.apply(  # type: ignore[no-untyped-call]
                    x, values, sink, self.bias, handle._structures[name]
                )
                return out

            return linear_forward

        def conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            values, sink = handle._inputs(name, self.weight)
            return conv2d_from_values(
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

"""SGD with heavy-ball momentum, in place: what a device's local round optimises with.

``MomentumSGD`` computes exactly what ``torch.optim.SGD(lr=lr, momentum=m, weight_decay=wd)``
computes (no dampening, no Nesterov), bit for bit on the same gradients:

    g <- g + wd * w         in place, in the tensor's own ``grad`` (torch allocates a new one)
    v <- g                  on a tensor's first step with a gradient
    v <- m * v + g          afterwards
    w <- w - lr * v         (w <- w - lr * g when m == 0, and no buffer is kept)

Why not torch's own: constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (its
``add_param_group`` is wrapped by ``torch._disable_dynamo``), about 800 Python modules and 70 MB
of resident memory, for nothing a device uses: a fifth of the 400 MB a round may take on a 1 GB
Raspberry Pi. The loop here is the single-tensor path of torch's SGD, with no other state.

A tensor may have a *support* (``supports``: the sorted flat positions, int32 or int64, outside
which its gradient and its value are always zero, a sparse layer's mask): its momentum buffer
then holds the support's entries only, ``[k]`` floats instead of one per entry, with the same
arithmetic bit for bit (a dense buffer would be zero off the support; on it the same ``mul_``
and ``add_``; the step writes the momentum into the gradient's support and takes the same
dense ``add_``). For femnist_cnn's fc1 at density 0.1 that is 2.6 MB instead of 25.7 MB, and
its int32 support (the trainer's) 2.6 MB more.

``register_step_pre_hook`` mirrors ``torch.optim.optimizer.register_optimizer_step_pre_hook``:
a hook sees every optimiser right before its step (tests check invariants there, the device
step benchmark times steps with it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

StepHook = Callable[["MomentumSGD"], None]
_step_pre_hooks: dict[int, StepHook] = {}
_next_hook_id = 0


@dataclass(frozen=True)
class HookHandle:
    """Removes a hook added by ``register_step_pre_hook``."""

    key: int

    def remove(self) -> None:
        _step_pre_hooks.pop(self.key, None)


def register_step_pre_hook(hook: StepHook) -> HookHandle:
    """Call ``hook(optimizer)`` right before every ``MomentumSGD.step`` of every instance."""
    global _next_hook_id
    _next_hook_id += 1
    _step_pre_hooks[_next_hook_id] = hook
    return HookHandle(_next_hook_id)


class MomentumSGD:
    """In-place SGD with momentum over named tensors (leaf tensors with ``requires_grad``).

    ``lr`` > 0 is the step size; ``momentum`` in [0, 1); ``weight_decay`` >= 0 is added to the
    gradient in place (a step consumes the gradients). ``momenta`` seeds the momentum buffers
    (by name, shaped like their tensors, or ``[k]`` for a tensor with a support of ``k``
    positions), e.g. when the trained tensors are rebuilt mid-round. ``supports``: see the
    module docstring; the caller guarantees the zeros (the trainer masks the gradients before
    every step). A tensor whose ``grad`` is None is left alone for that step, as torch does.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
        momenta: Mapping[str, torch.Tensor] | None = None,
        supports: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.tensors = dict(tensors)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.supports = dict(supports or {})
        self.momenta: dict[str, torch.Tensor] = {}
        for name, buffer in (momenta or {}).items():
            support = self.supports.get(name)
            shape = self.tensors[name].shape if support is None else support.shape
            if buffer.shape != shape:
                raise ValueError(
                    f"momentum of {name!r} has shape {tuple(buffer.shape)}, expected "
                    f"{tuple(shape)} ({'the tensor' if support is None else 'its support'})"
                )
            self.momenta[name] = buffer

    def zero_grad(self) -> None:
        """Drop every trained tensor's gradient (set to None, as ``set_to_none=True``)."""
        for tensor in self.tensors.values():
            tensor.grad = None

    def momentum_buffer(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The momentum buffer of one of the trained tensors, shaped like it (None before its
        first step or without momentum). For a tensor with a support, a new dense tensor: the
        buffer scattered onto its support, zero elsewhere."""
        for name, trained in self.tensors.items():
            if trained is tensor:
                buffer = self.momenta.get(name)
                support = self.supports.get(name)
                if buffer is None or support is None:
                    return buffer
                dense = torch.zeros_like(tensor.detach())
                dense.view(-1).index_put_((support,), buffer)
                return dense
        return None

    def step(self) -> None:
        """One update of every tensor that has a gradient, in place (see the module docstring)."""
        for hook in list(_step_pre_hooks.values()):
            hook(self)
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                grad = tensor.grad
                if grad is None:
                    continue
                if self.weight_decay > 0:
                    grad.add_(tensor, alpha=self.weight_decay)
                if self.momentum > 0:
                    support = self.supports.get(name)
                    if support is not None:
                        grad = self._on_support(name, grad, support)
                    else:
                        buffer = self.momenta.get(name)
                        if buffer is None:
                            buffer = self.momenta[name] = grad.detach().clone()
                        else:
                            buffer.mul_(self.momentum).add_(grad)
                        grad = buffer
                tensor.add_(grad, alpha=-self.lr)

    def _on_support(self, name: str, grad: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """The momentum step of a tensor with a support: the buffer updated from the gradient's
        support entries, then written back there; returns the gradient, now the momentum."""
        grad = grad if grad.is_contiguous() else grad.contiguous()
        flat = grad.view(-1)
        entries = flat.index_select(0, support)
        buffer = self.momenta.get(name)
        if buffer is None:
            buffer = self.momenta[name] = entries
        else:
            buffer.mul_(self.momentum).add_(entries)
        flat.index_put_((support,), buffer)  # index_copy_ would need int64 positions
        return grad


def move_to_support(buffer: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``buffer``, the values at the sorted flat positions ``old``, moved to the sorted
    positions ``new`` (a mask changed): a position in both keeps its value, a position only in
    ``new`` starts at 0, a position only in ``old`` is gone. What zeroing the dropped and grown
    entries of a dense buffer does, in memory proportional to the support: the result, plus
    temporaries for :data:`_MOVE_CHUNK` positions at a time (whole, they were 22 bytes per
    position: 15 MB at the peak of a femnist_cnn readjustment at density 0.1)."""
    moved = torch.zeros(new.shape, dtype=buffer.dtype)
    if old.numel() == 0:
        return moved
    last = old.numel() - 1
    for first in range(0, new.numel(), _MOVE_CHUNK):
        wanted = new[first : first + _MOVE_CHUNK]
        at = torch.searchsorted(old, wanted).clamp_(max=last)
        found = old[at] == wanted
        moved[first : first + _MOVE_CHUNK][found] = buffer[at[found]]
    return moved


#: Positions per step of :func:`move_to_support` (about 1.4 MB of temporaries).
_MOVE_CHUNK = 1 << 16

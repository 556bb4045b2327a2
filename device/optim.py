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
    (by name, shaped like their tensors), e.g. when the trained tensors are rebuilt mid-round.
    A tensor whose ``grad`` is None is left alone for that step, as torch does.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
        momenta: Mapping[str, torch.Tensor] | None = None,
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
        self.momenta: dict[str, torch.Tensor] = {}
        for name, buffer in (momenta or {}).items():
            tensor = self.tensors[name]
            if buffer.shape != tensor.shape:
                raise ValueError(
                    f"momentum of {name!r} has shape {tuple(buffer.shape)}, "
                    f"the tensor {tuple(tensor.shape)}"
                )
            self.momenta[name] = buffer

    def zero_grad(self) -> None:
        """Drop every trained tensor's gradient (set to None, as ``set_to_none=True``)."""
        for tensor in self.tensors.values():
            tensor.grad = None

    def momentum_buffer(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The momentum buffer of one of the trained tensors (None before its first step or
        without momentum)."""
        for name, trained in self.tensors.items():
            if trained is tensor:
                return self.momenta.get(name)
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
                    buffer = self.momenta.get(name)
                    if buffer is None:
                        buffer = self.momenta[name] = grad.detach().clone()
                    else:
                        buffer.mul_(self.momentum).add_(grad)
                    grad = buffer
                tensor.add_(grad, alpha=-self.lr)

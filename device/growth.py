"""FedDST's growth gradient: the dense gradients of a round's growth window, summed per weight.

A readjustment grows the inactive entries with the largest ``|sum of the window's gradients|``
(``device.sparse.policies.grow_scores_gradient``). The sum needs one float per entry of every
pruned weight, kept for the whole window (the last local epoch). Where it lives:

* **In the weight's own gradient** (``in_gradient``): a large linear layer whose gradient goes
  into its round-long buffer (``device.gradbuffers``, where a backward adds to a gradient that is
  still set) and whose optimiser reads its gradient on the mask only (momentum on a support, or
  no momentum). Its gradient is not cleared between the window's steps: off the mask it sums
  the window's gradients, on the mask it holds the step's gradient, as the optimiser needs. After
  each step :meth:`GrowthGradient.settle` clears both halves of what the step left: the weight off
  the mask (the dense update subtracted ``lr`` times the sum there) and the gradient on the mask.
  No separate sum: 25.7 MB less for femnist_cnn's fc1 (docs/hardware.md).
  A layer that sparse kernels train through its kept values (``untrained``: the optimiser never
  reads the weight's gradient, which exists for growth alone) sums its whole dense gradient
  there, the kernels adding each step's product in place (``device.sparse.kernels.grads``);
  nothing to settle.
* **In a separate tensor** for every other pruned weight, allocated at the window's first step.

Either way the score is the same sum up to float rounding (``addmm_`` accumulates in a
different order than a separate ``add_``), over the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from device.sparse.masks import clear_outside

__all__ = ["GrowthGradient"]


class GrowthGradient:
    """The growth window's summed dense gradients of the pruned weights ``params``, read as
    grow scores by :meth:`take`.

    ``in_gradient``: the names whose sum lives in their own gradient (module docstring; the
    caller guarantees the conditions, :meth:`eligible` names them). Call :meth:`add` with every
    window step's gradients before they are masked, leave the gradients of :attr:`in_gradient`
    set between window steps (:meth:`kept`), and call :meth:`settle` after each window step's
    optimiser step.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        in_gradient: frozenset[str],
        untrained: frozenset[str] = frozenset(),
    ) -> None:
        unknown = in_gradient - set(params)
        if unknown:
            raise ValueError(f"GrowthGradient: {sorted(unknown)} are not pruned weights")
        self.in_gradient = in_gradient
        self._settled = in_gradient - untrained
        self._separate: dict[str, torch.Tensor | None] = {
            name: None for name in params if name not in in_gradient
        }

    @staticmethod
    def eligible(
        params: Mapping[str, nn.Parameter],
        buffered: frozenset[str],
        supports: Mapping[str, torch.Tensor],
        momentum: float,
        untrained: frozenset[str] = frozenset(),
    ) -> frozenset[str]:
        """The pruned weights whose sum can live in their gradient: gradient in a round-long
        buffer (``buffered``) and read on the mask only by the optimiser (a ``support``, or no
        momentum), or not read by the optimiser at all (``untrained``: kernels' values mode).
        The caller excludes the rounds where every step's gradient is read whole (importance,
        FedProx)."""
        return frozenset(
            name
            for name in params
            if name in untrained or (name in buffered and (momentum == 0 or name in supports))
        )

    def kept(self, step: int, window: tuple[int, int]) -> frozenset[str]:
        """The gradients to keep when clearing them before ``step``: those holding a sum, from
        the window's second step to its last."""
        return self.in_gradient if window[0] < step <= window[1] else frozenset()

    def add(self, params: Mapping[str, nn.Parameter]) -> None:
        """Add this window step's dense gradients to the separate sums (before masking)."""
        with torch.no_grad():
            for name, total in self._separate.items():
                grad = params[name].grad
                if grad is None:
                    continue
                if total is None:
                    self._separate[name] = grad.detach().clone()
                else:
                    total.add_(grad)

    def settle(
        self,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, torch.Tensor],
        supports: Mapping[str, torch.Tensor],
    ) -> None:
        """After a window step's optimiser step: the weights of :attr:`in_gradient` that it
        trained back to exactly 0 off their masks, their gradients to 0 on them (the sum stays
        off the mask).
        ``supports``: the masks' flat positions where the optimiser has them (faster)."""
        with torch.no_grad():
            for name in self._settled:
                param, mask = params[name], masks[name]
                clear_outside(param, mask)
                grad = param.grad
                if grad is None:
                    continue
                support = supports.get(name)
                if support is not None and grad.is_contiguous():
                    grad.view(-1).index_put_((support,), torch.zeros((), dtype=grad.dtype))
                else:
                    grad.masked_fill_(mask, 0.0)

    def take(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """``name``'s sum, for the caller to turn into its grow score in place (it leaves this
        object, and a sum held in the gradient leaves ``param.grad``): the window's summed
        gradients off the mask, where growth reads them (on the mask, for a sum held in the
        gradient, what the last step left there). Zeros where the window had no gradient."""
        if name in self.in_gradient:
            total = param.grad
            param.grad = None
        else:
            total = self._separate.pop(name, None)
        return torch.zeros_like(param.detach()) if total is None else total.detach()

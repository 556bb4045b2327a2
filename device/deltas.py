"""The state a local round starts from, kept small, and the deltas ``final - start`` taken from it.

A round must send ``final - start`` for every state_dict entry, so it keeps its start; a 1 GB Pi
training a 26 MB model cannot afford a second dense copy of a sparse model, hence
:class:`RoundStart` keeps a sparse tensor's start only on its mask, and reuses the caller's copy
of the start (the received global model) where there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from device.errors import ConfigError
from device.sparse.masks import Masks, flat_positions, zero_outside

__all__ = ["RoundStart"]


@dataclass(frozen=True)
class RoundStart:
    """The state a round starts from, kept small: a pruned tensor below density 1/3 keeps only
    its values on the start mask (zero elsewhere), every other entry a whole copy.

    Why 1/3: the on-mask form costs 4 bytes per kept entry for the round and 8 more (int64 flat
    positions) while the deltas are built; a whole copy costs 4 bytes per entry. Deltas are
    ``final - start`` exactly as with a dense copy: off the start mask the start value is 0 and
    ``x - 0 == x``; on it ``x + (-1) * s == x - s``.
    """

    on_mask: dict[str, tuple[torch.Tensor, torch.Tensor]]
    whole: dict[str, torch.Tensor]
    held: frozenset[str] = frozenset()  # whole entries that are the caller's: never written

    @classmethod
    def of(
        cls,
        state: Mapping[str, torch.Tensor],
        masks: Masks,
        *,
        held: Mapping[str, torch.Tensor] | None = None,
        held_on_mask: Mapping[str, torch.Tensor] | None = None,
    ) -> RoundStart:
        """The start of ``state``. ``held``: the caller's copy of it, for all entries or some
        (nothing is copied of those; they must name entries of ``state``, with its shapes).
        ``held_on_mask``: the caller's copy of pruned entries' start values on their ``masks``
        (one float per kept entry, in flat order; the received model's kept values), used
        where the entry is kept on its mask instead of copying them."""
        whole = _checked_start(state, held) if held is not None else {}
        given = held_on_mask or {}
        on_mask: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in state.items():
            if name in whole:
                continue
            mask = masks.get(name)
            kept = int(torch.count_nonzero(mask)) if mask is not None else 0
            if mask is not None and 3 * kept < mask.numel():
                values = given.get(name)
                if values is None:
                    values = tensor.detach().reshape(-1).index_select(0, flat_positions(mask))
                elif tuple(values.shape) != (kept,) or values.dtype != tensor.dtype:
                    raise ConfigError(
                        f"start values of {name!r} on its mask: {tuple(values.shape)} "
                        f"{values.dtype}, expected ({kept},) {tensor.dtype}"
                    )
                on_mask[name] = (mask, values.detach())
            else:
                whole[name] = tensor.detach().clone()
        return cls(on_mask, whole, frozenset(held or ()))

    def dense(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The start state as dense tensors shaped like ``like`` (FedProx's default reference)."""
        dense = dict(self.whole)
        for name, (mask, values) in self.on_mask.items():
            tensor = torch.zeros_like(like[name])
            tensor.view(-1).index_copy_(0, flat_positions(mask), values)
            dense[name] = tensor
        return dense

    def deltas(
        self, final: Mapping[str, torch.Tensor], masks: Masks, *, in_place: bool = False
    ) -> dict[str, torch.Tensor]:
        """``final - start`` per state_dict entry (float32 for integer entries), zero off
        ``masks`` (the final masks). Consumes this object: float deltas of the whole copies it
        made are computed in place of the copy (no further model-sized buffer); held entries
        (the caller's) get new tensors, or, ``in_place``, overwrite ``final``'s float tensors."""
        deltas: dict[str, torch.Tensor] = {}
        for name, value in final.items():
            if name in self.on_mask:
                start_mask, values = self.on_mask[name]
                writable = in_place and value.is_floating_point() and value.is_contiguous()
                delta = value.detach() if writable else value.detach().clone()
                delta.view(-1).index_add_(0, flat_positions(start_mask), values, alpha=-1)
            elif in_place and value.is_floating_point():
                delta = value.detach().sub_(self.whole[name])
            elif (
                value.is_floating_point()
                and self.whole[name].dtype == value.dtype
                and name not in self.held
            ):
                start = self.whole[name]
                delta = torch.sub(value.detach(), start, out=start)
            elif value.is_floating_point():
                delta = value.detach() - self.whole[name]
            else:
                delta = value.detach().to(torch.float32) - self.whole[name].to(torch.float32)
            if name in masks:
                zero_outside(delta, masks[name])
            deltas[name] = delta
        return deltas


def _checked_start(
    state: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``held`` as the start of those entries of ``state``: names of ``state`` with its shapes,
    else ``ConfigError``."""
    extra = set(held) - set(state)
    if extra:
        raise ConfigError(f"start weights name entries the model lacks: {sorted(extra)}")
    for name, tensor in held.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ConfigError(
                f"start weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the model {tuple(state[name].shape)}"
            )
    return {name: tensor.detach() for name, tensor in held.items()}

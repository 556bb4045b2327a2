"""Masks of pruned tensors, kept outside the model.

``Masks`` maps state_dict names of pruned weights to bool tensors of the weight's shape (True =
kept). The model itself is never re-parametrised, so its state_dict keys never change; masked
weights are simply held at zero (``apply_masks``) and the trainer zeroes their gradients and
optimiser state every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from device.errors import ConfigError
from device.sparse.density import kept_count

Masks = dict[str, torch.Tensor]

InitMethod = Literal["magnitude", "random"]


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """Row-major positions of a mask's kept entries, ascending (int64 ``[nnz]``); a 1-D
    ``nonzero`` needs half the index memory of indexing with the bool mask itself."""
    return mask.reshape(-1).nonzero().squeeze(1)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape, True at the ``k`` largest scores.

    Ties are broken by flat (row-major) index, lower index first, so the result is deterministic
    on every platform. NaN ranks below every number (a NaN weight is the first to be dropped).
    ``k`` is clipped to [0, numel].
    """
    flat = scores.detach().reshape(-1)
    k = min(max(int(k), 0), flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        ranked = torch.nan_to_num(flat.float(), nan=float("-inf"))
        order = torch.argsort(ranked, descending=True, stable=True)
        mask[order[:k]] = True
    return mask.reshape(scores.shape)


def initial_masks(
    weights: Mapping[str, torch.Tensor],
    densities: Mapping[str, float],
    *,
    method: InitMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> Masks:
    """Initial mask of every tensor in ``densities``, keeping exactly ``kept_count(d, numel)``.

    ``method="magnitude"`` keeps the largest ``|w|`` of the (random) initialisation, which is
    FedDST's default; ``"random"`` keeps a uniformly random subset drawn from ``generator``
    (required then, so that the draw is reproducible).
    """
    if method not in ("magnitude", "random"):
        raise ValueError(f"unknown mask init method {method!r}; known: magnitude, random")
    if method == "random" and generator is None:
        raise ConfigError("random initial masks need a seeded torch.Generator, got None")
    masks: Masks = {}
    for name, density in densities.items():
        if name not in weights:
            raise ConfigError(f"density given for {name!r}, which is not among the weights")
        if not 0.0 <= density <= 1.0:
            raise ConfigError(f"density of {name!r} must be in [0, 1], got {density!r}")
        weight = weights[name].detach()
        k = kept_count(density, weight.numel())
        if method == "magnitude":
            scores = weight.abs()
        else:
            scores = torch.rand(weight.shape, generator=generator)
        masks[name] = topk_mask(scores, k)
    return masks


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The model's parameters named in ``masks``; raises ``ConfigError`` on a mismatch.

    Every mask must name a parameter of the model, be bool and have the parameter's shape.
    """
    params = dict(model.named_parameters())
    found: dict[str, nn.Parameter] = {}
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(
                f"mask {name!r} names no parameter of the model; parameters: {sorted(params)}"
            )
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask {name!r} must be bool, got {mask.dtype}")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"mask {name!r} has shape {tuple(mask.shape)}, "
                f"the weight has {tuple(params[name].shape)}"
            )
        found[name] = params[name]
    return found


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place and outside autograd, every weight entry its mask does not keep."""
    params = check_masks(model, masks)
    with torch.no_grad():
        for name, param in params.items():
            clear_outside(param, masks[name])


_SLICE = 1 << 18  # entries per slice of ``zero_outside``: a 1 MiB float temporary, cache-sized


def zero_outside(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """``tensor *= mask`` in place (exact zeros off the mask for finite entries).

    Multiplying a float tensor by a bool one makes torch cast the whole mask to a float
    temporary first (26 MB for ``femnist_cnn``'s fc1, every step); slices of ``_SLICE`` entries
    bound it to 1 MiB and, staying in cache, are faster than one whole-tensor multiply. A
    multiply beats ``masked_fill_(~mask, 0)``, which must first build the inverted mask.
    """
    if not tensor.is_contiguous() or not mask.is_contiguous():
        tensor.mul_(mask)
        return
    flat, keep = tensor.view(-1), mask.view(-1)
    for first in range(0, flat.numel(), _SLICE):
        flat[first : first + _SLICE].mul_(keep[first : first + _SLICE])


def clear_outside(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """``tensor[~mask] = 0`` in place: exactly +0.0 off the mask whatever was there (infinities
    and NaN included, unlike :func:`zero_outside`). One ``where`` into the tensor itself: no
    temporary (``masked_fill_(~mask, 0)`` would invert the whole mask first), and faster than
    that or than slices (5.8 ms against 8.2 ms for femnist_cnn's fc1 on 2 x86 cores)."""
    torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype), out=tensor)


def flat_positions32(mask: torch.Tensor) -> torch.Tensor:
    """:func:`flat_positions` as int32 (``mask.numel() < 2**31``), built one slice of
    ``_SLICE`` entries at a time: 4 bytes per kept entry and no int64 array of them all
    (femnist_cnn's fc1 at density 0.1: 2.6 MB where ``nonzero`` makes 5.1)."""
    flat = mask.reshape(-1)
    if flat.numel() >= 2**31:
        raise ValueError(f"a mask of {flat.numel()} entries has positions beyond int32")
    out = torch.empty(int(torch.count_nonzero(flat)), dtype=torch.int32)
    done = 0
    for first in range(0, flat.numel(), _SLICE):
        local = flat[first : first + _SLICE].nonzero().squeeze(1)
        out[done : done + local.numel()] = local.add_(first)
        done += local.numel()
    return out


def positions_of_ranks(flat_mask: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The flat positions of the kept entries of a 1-D bool mask with the given ranks (0 = the
    first kept entry in flat order), in the order of ``ranks`` (int64).

    What ``flat_positions(flat_mask)[ranks]`` gives, one slice of ``_SLICE`` entries at a time:
    no int64 position for every kept entry (5.3 MB for femnist_cnn's fc1 at density 0.1).
    """
    out = torch.empty_like(ranks)
    order = torch.argsort(ranks)
    wanted = ranks[order]
    done = 0
    counted = 0  # kept entries before the slice
    for first in range(0, flat_mask.numel(), _SLICE):
        if done == wanted.numel():
            break
        piece = flat_mask[first : first + _SLICE]
        kept = int(torch.count_nonzero(piece))
        end = done + int(torch.searchsorted(wanted[done:], counted + kept))
        if end > done:
            local = piece.nonzero().squeeze(1)
            out[order[done:end]] = local[wanted[done:end] - counted] + first
            done = end
        counted += kept
    if done != wanted.numel():
        raise IndexError(f"ranks up to {int(wanted[-1])} of a mask with {counted} kept entries")
    return out


def count_nonzero(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per-tensor number of non-zero (for masks: kept) entries."""
    return {name: int(torch.count_nonzero(t)) for name, t in tensors.items()}


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Overall kept fraction of ``masks``: kept entries / all entries, in [0, 1] (1.0 if empty)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    return sum(count_nonzero(masks).values()) / total


def masks_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """True when both name the same tensors and every mask is identical."""
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

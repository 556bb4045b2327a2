"""Prune-and-regrow of one tensor's mask: two score functions plus one shared update (RigL).

A readjustment drops the ``n`` active entries with the smallest drop score (magnitude) and grows
``n`` inactive entries with the largest grow score (gradient magnitude for RigL/FedDST, uniform
random for SET). Entries dropped in this readjustment cannot be regrown in it, and grown entries
start at zero (weight and optimiser momentum), so a readjustment never changes a tensor's
number of kept entries and never changes what the model computes at the moment it happens except
through the dropped weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from device.errors import ConfigError


def drop_scores_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """Drop score: ``|w|``; the smallest active ones are dropped."""
    return weight.detach().abs()


def grow_scores_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Grow score (RigL): ``|g|`` of the dense gradient; the largest inactive ones grow."""
    return grad.detach().abs()


def grow_scores_random(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Grow score (SET): independent uniform [0, 1) draws from ``generator``."""
    return torch.rand(shape, generator=generator)


class Readjustment(NamedTuple):
    """The outcome of one tensor's readjustment; all three are bool tensors of the weight's shape.

    A named tuple, so ``new_mask, dropped, grown = readjust_mask(...)`` works too.

    Invariants: ``dropped`` and ``grown`` are disjoint and have the same number of True entries;
    ``new_mask = (old_mask & ~dropped) | grown``.
    """

    new_mask: torch.Tensor
    dropped: torch.Tensor
    grown: torch.Tensor


def readjust_mask(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int
) -> Readjustment:
    """Drop the ``n`` lowest-``drop_score`` active entries and grow ``n`` inactive entries.

    Growth picks the largest ``grow_score`` among the entries inactive before the drop, so an
    entry dropped now cannot grow back now. ``n`` is clipped to the number of active and of
    inactive entries, so the number of kept entries never changes. Ties go to the lower flat index.
    """
    if mask.dtype != torch.bool:
        raise ConfigError(f"readjust_mask needs a bool mask, got {mask.dtype}")
    if drop_score.shape != mask.shape or grow_score.shape != mask.shape:
        raise ConfigError(
            f"readjust_mask: mask {tuple(mask.shape)}, drop score {tuple(drop_score.shape)} and "
            f"grow score {tuple(grow_score.shape)} must have the same shape"
        )
    if n < 0:
        raise ConfigError(f"readjust_mask: the number to drop and grow must be >= 0, got {n}")
    active = int(mask.sum())
    n = min(n, active, mask.numel() - active)
    if n == 0:
        empty = torch.zeros_like(mask)
        return Readjustment(new_mask=mask.clone(), dropped=empty, grown=empty.clone())
    flat_mask = mask.reshape(-1)
    # A NaN weight is the first to drop; a NaN grow score is the last to grow. Candidates are
    # chosen by mask, not by +-inf sentinels alone, so an infinite score never lets an inactive
    # entry be "dropped" or an active one be "grown".
    drop_pick = _select(drop_score, flat_mask, n, largest=False, nan=float("-inf"))
    grow_pick = _select(grow_score, ~flat_mask, n, largest=True, nan=float("-inf"))
    dropped = torch.zeros_like(flat_mask)
    dropped[drop_pick] = True
    grown = torch.zeros_like(flat_mask)
    grown[grow_pick] = True
    dropped = dropped.reshape(mask.shape)
    grown = grown.reshape(mask.shape)
    new_mask = (mask & ~dropped) | grown
    return Readjustment(new_mask=new_mask, dropped=dropped, grown=grown)


def _select(
    score: torch.Tensor, candidates: torch.Tensor, n: int, *, largest: bool, nan: float
) -> torch.Tensor:
    """Flat indices of the ``n`` candidates with the largest (or smallest) ``score``, ties to
    the lower flat index; ``NaN`` scores count as ``nan``. ``1 <= n <= candidates.sum()``.

    Memory in proportion to ``n`` beyond one float32 copy of the scores: a threshold (the n-th
    best value, :func:`_nth_best`), then every candidate strictly better plus the lowest-index
    candidates equal to it. Sorting every candidate (``nonzero`` + ``argsort``) held several
    int64 and float arrays of the candidates' size: +195 MB for femnist_cnn's fc1 at density 0.1
    (docs/benchmarks.md, "Footprint").
    """
    worst = float("-inf") if largest else float("inf")
    values = score.detach().reshape(-1).to(torch.float32, copy=True)
    values.nan_to_num_(nan=nan)
    values.masked_fill_(~candidates, worst)
    threshold = _nth_best(values, n, largest=largest)
    better = (values > threshold) if largest else (values < threshold)
    better &= candidates
    picked = torch.nonzero(better).reshape(-1)
    ties = torch.nonzero((values == threshold) & candidates).reshape(-1)
    return torch.cat([picked, ties[: n - picked.numel()]])


_CHUNK = 1 << 18  # elements per topk call in _nth_best: 1 MB of float32


def _nth_best(values: torch.Tensor, n: int, *, largest: bool) -> torch.Tensor:
    """The ``n``-th largest (or smallest) of the 1-D ``values``, as a 0-d tensor.

    ``topk`` over the whole tensor copies all of it with an int64 index on CPU (12 bytes per
    element); taking each chunk's best ``n`` first bounds that copy by the chunk, and the n-th
    best of all is the n-th best of the chunks' bests."""
    if values.numel() > _CHUNK and n < values.numel() // 2:
        chunks = (values[i : i + _CHUNK] for i in range(0, values.numel(), _CHUNK))
        best = [
            torch.topk(chunk, min(n, chunk.numel()), largest=largest, sorted=False).values
            for chunk in chunks
        ]
        values = torch.cat(best)
    return torch.topk(values, n, largest=largest, sorted=True).values[-1]


def n_to_readjust(alpha: float, active: int) -> int:
    """FedDST's per-layer readjust count: ``round(alpha * nnz_l)``, ``alpha`` in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"readjust alpha must be in [0, 1], got {alpha!r}")
    return round(alpha * active)


def zero_entries(positions: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """Set ``tensors[positions] = 0`` in place, outside autograd (None entries are skipped).

    Used to start grown entries at zero in both the weight and the optimiser's momentum buffer,
    and to zero dropped entries.
    """
    with torch.no_grad():
        for tensor in tensors:
            if tensor is not None:
                tensor.masked_fill_(positions, 0.0)

"""Prune-and-regrow of one tensor's mask: two score functions plus one shared update (RigL).

A readjustment drops the ``n`` active entries with the smallest drop score (magnitude) and grows
``n`` inactive entries with the largest grow score (gradient magnitude for RigL/FedDST, uniform
random for SET). Entries dropped in this readjustment cannot be regrown in it, and grown entries
start at zero (weight and optimiser momentum), so a readjustment never changes a tensor's
number of kept entries and never changes what the model computes at the moment it happens except
through the dropped weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from device.errors import ConfigError
from device.sparse.masks import positions_of_ranks


def drop_scores_magnitude_active(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Drop score: ``|w|`` at the ``mask``'s kept entries, in flat (row-major) order
    (``[nnz]``); the smallest are dropped. What :func:`readjust_mask` takes, in ``nnz`` floats
    instead of one per entry."""
    return weight.detach()[mask].abs_()


def grow_scores_gradient(grad: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """Grow score (RigL): ``|g|`` of the dense gradient; the largest inactive ones grow.

    ``in_place``: ``grad`` becomes its own score (no copy), for a caller that is done with it
    (the trainer's summed growth gradient: one layer's worth of float32 less at the peak).
    """
    return grad.detach().abs_() if in_place else grad.detach().abs()


def grow_scores_random(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Grow score (SET): independent uniform [0, 1) draws from ``generator``."""
    return torch.rand(shape, generator=generator)


class Readjustment(NamedTuple):
    """The outcome of one tensor's readjustment: the new bool mask, and the flat (row-major)
    positions dropped and grown (int64, ascending). ``dropped`` and ``grown`` give the same as
    bool masks of the weight's shape, built on access.

    Positions rather than masks: three bool masks of femnist_cnn's fc1 held 19 MB at the peak of
    a readjustment, the positions ``2 n`` int64 (1.8 MB at density 0.1).

    Invariants: ``dropped_at`` and ``grown_at`` are disjoint and have the same length;
    ``new_mask = (old_mask & ~dropped) | grown``.
    """

    new_mask: torch.Tensor
    dropped_at: torch.Tensor
    grown_at: torch.Tensor

    @property
    def dropped(self) -> torch.Tensor:
        return _mask_at(self.new_mask, self.dropped_at)

    @property
    def grown(self) -> torch.Tensor:
        return _mask_at(self.new_mask, self.grown_at)


def _mask_at(like: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(like, dtype=torch.bool)
    mask.view(-1)[positions] = True
    return mask


def readjust_mask(
    mask: torch.Tensor,
    drop_score: torch.Tensor,
    grow_score: torch.Tensor,
    n: int,
    *,
    scratch_scores: bool = False,
) -> Readjustment:
    """Drop the ``n`` lowest-``drop_score`` active entries and grow ``n`` inactive entries.

    Growth picks the largest ``grow_score`` among the entries inactive before the drop, so an
    entry dropped now cannot grow back now. ``n`` is clipped to the number of active and of
    inactive entries, so the number of kept entries never changes. Ties go to the lower flat index.

    ``drop_score`` holds the active entries' scores only (``[nnz]``, in flat order:
    :func:`drop_scores_magnitude_active`); ``grow_score`` has the mask's shape (its values at
    active entries are never read).

    ``scratch_scores``: the scores are the caller's to lose; float32 scores then serve as the
    selection's working memory (overwritten) instead of being copied, one float32 copy of the
    tensor less at the peak (25.7 MB for femnist_cnn's fc1). The result is the same.
    """
    if mask.dtype != torch.bool:
        raise ConfigError(f"readjust_mask needs a bool mask, got {mask.dtype}")
    active = int(torch.count_nonzero(mask))  # a bool sum would make an int64 copy first
    if tuple(drop_score.shape) != (active,) or grow_score.shape != mask.shape:
        raise ConfigError(
            f"readjust_mask: mask {tuple(mask.shape)}, drop score {tuple(drop_score.shape)} "
            f"and grow score {tuple(grow_score.shape)}: the grow score must have the mask's "
            f"shape and the drop score ({active},), one per active entry"
        )
    if n < 0:
        raise ConfigError(f"readjust_mask: the number to drop and grow must be >= 0, got {n}")
    n = min(n, active, mask.numel() - active)
    if n == 0:
        none = torch.zeros(0, dtype=torch.int64)
        return Readjustment(new_mask=mask.clone(), dropped_at=none, grown_at=none.clone())
    flat_mask = mask.reshape(-1)
    # A NaN weight is the first to drop; a NaN grow score is the last to grow. Candidates are
    # chosen by mask, not by +-inf sentinels alone, so an infinite score never lets an inactive
    # entry be "dropped" or an active one be "grown".
    nan = float("-inf")
    everyone = torch.zeros(active, dtype=torch.bool)  # every score is a candidate's
    ranks = _select(drop_score, everyone, n, largest=False, nan=nan, scratch=scratch_scores)
    drop_pick = positions_of_ranks(flat_mask, ranks)
    grow_pick = _select(grow_score, flat_mask, n, largest=True, nan=nan, scratch=scratch_scores)
    new_mask = mask.clone()
    new_mask.view(-1)[drop_pick] = False
    new_mask.view(-1)[grow_pick] = True
    return Readjustment(
        new_mask=new_mask, dropped_at=drop_pick.sort().values, grown_at=grow_pick.sort().values
    )


def _select(
    score: torch.Tensor,
    excluded: torch.Tensor,
    n: int,
    *,
    largest: bool,
    nan: float,
    scratch: bool = False,
) -> torch.Tensor:
    """Flat indices of the ``n`` entries not ``excluded`` (the candidates) with the largest (or
    smallest) ``score``, ties to the lower flat index; ``NaN`` scores count as ``nan``.
    ``1 <= n <= number of candidates``.

    Memory: one float32 copy of the scores (none with ``scratch``: a float32 ``score`` is then
    overwritten) plus one bool temporary at a time and the ``n`` picks. The scores become int32
    keys in their own memory (:func:`_order_keys`), excluded entries the worst key; the n-th best
    key is found by radix selection (:func:`_nth_largest`), then every entry strictly better is
    picked plus the lowest-index candidates equal to it. Sorting every candidate held several
    int64 and float arrays of the candidates' size (+195 MB for femnist_cnn's fc1 at density
    0.1), and a threshold from chunked ``topk`` still +45 MB (docs/benchmarks.md, "Footprint").
    """
    worst = float("-inf") if largest else float("inf")
    values = score.detach().reshape(-1)
    if not (scratch and values.dtype == torch.float32):
        values = values.to(torch.float32, copy=True)
    values.nan_to_num_(nan=nan)
    values.masked_fill_(excluded, worst)
    keys = _order_keys(values, largest=largest)
    threshold = _nth_largest(keys, n)
    # An excluded entry holds the worst key, never above the n-th best candidate's.
    picked = _positions_where(keys, lambda chunk: chunk > threshold)
    ties = _positions_where(keys, lambda chunk: chunk == threshold)
    if threshold == _order_keys(torch.tensor([worst]), largest=largest).item():
        ties = ties[~excluded[ties]]  # candidates scored as badly as excluded entries
    return torch.cat([picked, ties[: n - picked.numel()]])


def _positions_where(
    keys: torch.Tensor, test: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Ascending positions of the 1-D ``keys`` where ``test`` (elementwise, on a chunk) holds,
    one chunk at a time: a bool temporary of :data:`_CHUNK` entries, not one of every key."""
    found = [
        torch.nonzero(test(keys[first : first + _CHUNK])).reshape(-1).add_(first)
        for first in range(0, keys.numel(), _CHUNK)
    ]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)


#: Elements per step of the chunked passes below: 4 MB of int32 keys, a few such temporaries.
#: Fewer, larger steps matter where threads wait on each other (each op is a parallel region).
_CHUNK = 1 << 20


def _order_keys(values: torch.Tensor, *, largest: bool) -> torch.Tensor:
    """``values`` (1-D float32 without NaN) turned, in their own memory, into int32 keys whose
    integer order is the values' order (reversed unless ``largest``), so that the best values
    have the largest keys. ``-0.0`` counts as ``+0.0``; infinities order as they should.

    IEEE-754 bits read as int32 already order the non-negative floats; flipping the 31 low
    bits of a negative one reverses the order among the negatives and keeps them below.
    """
    values.add_(0.0)  # -0.0 + 0.0 == +0.0: equal floats get equal keys
    keys = values.view(torch.int32)
    for first in range(0, keys.numel(), _CHUNK):
        chunk = keys[first : first + _CHUNK]
        chunk.bitwise_xor_(chunk.bitwise_right_shift(31).bitwise_and_(0x7FFFFFFF))
        if not largest:
            chunk.bitwise_not_()  # ~k == -k - 1: the order reversed, within int32
    return keys


def _nth_largest(keys: torch.Tensor, n: int) -> int:
    """The ``n``-th largest of the 1-D int32 ``keys`` (``1 <= n <= keys.numel()``), exactly.

    Radix selection in two passes over the keys, one chunk at a time: a histogram of the high
    16 bits finds the bucket that holds the n-th largest, a histogram of the low 16 bits of the
    keys in that bucket finds it within. No copy of the keys (``topk`` or ``kthvalue`` on CPU
    hold 12 bytes per element), a few MB of temporaries."""
    high = _histogram(keys, lambda chunk: chunk.bitwise_right_shift(16).add_(1 << 15))
    bucket, rank = _from_the_top(high, n)
    in_bucket = bucket - (1 << 15)  # the signed high half, as the keys hold it

    def low_of_bucket(chunk: torch.Tensor) -> torch.Tensor:
        return chunk[chunk.bitwise_right_shift(16) == in_bucket].bitwise_and(0xFFFF)

    low, _ = _from_the_top(_histogram(keys, low_of_bucket), rank)
    return in_bucket * (1 << 16) + low


def _histogram(keys: torch.Tensor, digit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Counts of ``digit(chunk)`` (values in [0, 65536)) over the chunks of ``keys``."""
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    for first in range(0, keys.numel(), _CHUNK):
        counts += torch.bincount(digit(keys[first : first + _CHUNK]), minlength=1 << 16)
    return counts


def _from_the_top(counts: torch.Tensor, n: int) -> tuple[int, int]:
    """The digit holding the ``n``-th largest element of a histogram, and that element's rank
    among the ones with this digit (1 = its largest)."""
    at_or_above = counts.flip(0).cumsum(0)  # [i]: elements with digit >= 65535 - i
    i = int(torch.searchsorted(at_or_above, n))
    above = int(at_or_above[i - 1]) if i > 0 else 0
    return (1 << 16) - 1 - i, n - above


def n_to_readjust(alpha: float, active: int) -> int:
    """FedDST's per-layer readjust count: ``round(alpha * nnz_l)``, ``alpha`` in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"readjust alpha must be in [0, 1], got {alpha!r}")
    return round(alpha * active)


def zero_entries(positions: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """Set ``tensors[positions] = 0`` in place, outside autograd (None entries are skipped);
    ``positions`` is a bool mask of the tensors' shape or int64 flat (row-major) positions.

    Used to start grown entries at zero in both the weight and the optimiser's momentum buffer,
    and to zero dropped entries.
    """
    with torch.no_grad():
        for tensor in tensors:
            if tensor is None:
                continue
            if positions.dtype == torch.bool:
                tensor.masked_fill_(positions, 0.0)
            else:
                tensor.view(-1).index_fill_(0, positions, 0.0)

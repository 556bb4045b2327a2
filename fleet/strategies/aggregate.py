"""Aggregation maths of every strategy, as pure numpy functions.

Nothing here knows about devices, rounds or the wire: inputs are arrays (float weights, bool
masks, positive example counts), outputs are new arrays; no input is modified. Sums are
accumulated in float64 and results returned as float32 (weights) so that the order of devices
changes a result by at most float32 rounding. Masks are bool with True = kept; "density" is the
kept fraction. Ties in every top-k are broken by flat (row-major) index, lower index first, so
results are the same on every platform.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "apply_masks",
    "masked_weighted_mean",
    "momentum_step",
    "sparse_vote_merge",
    "sum_arrays",
    "topk_mask",
    "topk_per_layer",
    "union_masks",
    "vote_counts",
    "weighted_mean",
]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


def _check_weights(count: int, weights: Sequence[float]) -> Float64Array:
    if count == 0:
        raise ValueError("aggregation needs at least one array")
    if len(weights) != count:
        raise ValueError(f"got {count} arrays but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"aggregation weights must be finite and > 0, got {list(weights)}")
    return w


def _check_shapes(arrays: Sequence[npt.NDArray[np.generic]], what: str) -> tuple[int, ...]:
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"{what} {i} has shape {a.shape}, expected {shape}")
    return shape


def weighted_mean(
    arrays: Sequence[npt.NDArray[np.floating]], weights: Sequence[float]
) -> FloatArray:
    """``sum_i w_i x_i / sum_i w_i`` elementwise (FedAvg with ``w_i`` = examples of device i).

    ``arrays`` all have one shape; ``weights`` are finite and > 0. Returns float32.
    """
    w = _check_weights(len(arrays), weights)
    _check_shapes(arrays, "array")
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    scaled = np.empty_like(total)  # one scratch buffer instead of a temporary per device
    for wi, a in zip(w, arrays, strict=True):
        np.multiply(a, wi, out=scaled)
        total += scaled
    out: FloatArray = (total / float(w.sum())).astype(np.float32)
    return out


def masked_weighted_mean(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray],
    weights: Sequence[float],
    fallback: npt.NDArray[np.floating],
) -> FloatArray:
    """Per coordinate, the weighted mean over the arrays whose mask holds it.

    ``out[j] = sum_i w_i m_ij x_ij / sum_i w_i m_ij`` where some mask holds ``j``, else
    ``fallback[j]`` (FedDST: the global value, so a coordinate nobody trained keeps its value).
    Values of ``arrays`` outside their masks are ignored. Returns float32.
    """
    w = _check_weights(len(arrays), weights)
    shape = _check_shapes(arrays, "array")
    if len(masks) != len(arrays):
        raise ValueError(f"got {len(arrays)} arrays but {len(masks)} masks")
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(f"mask {i} has shape {m.shape}, the arrays {shape}")
    if fallback.shape != shape:
        raise ValueError(f"fallback has shape {fallback.shape}, the arrays {shape}")
    num = np.zeros(shape, dtype=np.float64).reshape(-1)
    den = np.zeros_like(num)
    for wi, a, m in zip(w, arrays, masks, strict=True):
        # Gather the held positions: only they are read, so values outside a mask (even NaN)
        # cannot leak in, and at FedDST's densities this is the cheapest pass over the data.
        idx = np.flatnonzero(m)
        num[idx] += wi * a.reshape(-1)[idx].astype(np.float64)
        den[idx] += wi
    out = fallback.astype(np.float64, copy=True).reshape(-1)
    held = np.flatnonzero(den)
    out[held] = num[held] / den[held]
    result: FloatArray = out.reshape(shape).astype(np.float32)
    return result


def vote_counts(masks: Sequence[BoolArray]) -> IntArray:
    """How many masks hold each coordinate (int64, in [0, len(masks)])."""
    if not masks:
        raise ValueError("vote_counts needs at least one mask")
    _check_shapes(masks, "mask")
    votes = np.zeros(masks[0].shape, dtype=np.int64)
    for m in masks:
        votes += m
    return votes


def union_masks(masks: Sequence[BoolArray], min_votes: int = 1) -> BoolArray:
    """Coordinates held by at least ``min_votes`` (>= 1) masks; ``min_votes=1`` is the union."""
    if min_votes < 1:
        raise ValueError(f"min_votes must be >= 1, got {min_votes}")
    return vote_counts(masks) >= min_votes


def topk_mask(
    scores: npt.NDArray[np.floating],
    k: int,
    priority: npt.NDArray[np.integer] | None = None,
) -> BoolArray:
    """Bool mask of ``scores``' shape, True at the ``k`` best coordinates.

    Best means: highest ``priority`` first (all equal when None), then highest score, then lowest
    flat index. NaN scores rank below every number. ``k`` is clipped to [0, size].
    """
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = min(max(int(k), 0), flat.size)
    out = np.zeros(flat.size, dtype=np.bool_)
    if k == 0:
        return out.reshape(np.shape(scores))
    ranked = np.where(np.isnan(flat), -np.inf, flat)
    if priority is None:
        out[_best_k(np.arange(flat.size), ranked, k)] = True
        return out.reshape(np.shape(scores))
    pri = np.asarray(priority, dtype=np.int64).reshape(-1)
    if pri.size != flat.size:
        raise ValueError(f"priority has {pri.size} entries, scores {flat.size}")
    # Fill from the highest priority level down; usually the first level already holds k.
    remaining = k
    level = pri.max()
    while remaining > 0:
        taken = _best_k(np.flatnonzero(pri == level), ranked, remaining)
        out[taken] = True
        remaining -= taken.size
        lower = pri[pri < level]
        if lower.size == 0:
            break
        level = lower.max()
    return out.reshape(np.shape(scores))


def _best_k(idx: npt.NDArray[np.intp], ranked: Float64Array, k: int) -> npt.NDArray[np.intp]:
    """The ``k`` entries of ``idx`` (ascending) with the largest ``ranked``, ties to lower index.

    Linear time: a partition finds the k-th largest value, then ties at it go by position.
    """
    if k >= idx.size:
        return idx
    if k <= 0:
        return idx[:0]
    values = ranked[idx]
    threshold = np.partition(values, idx.size - k)[idx.size - k]  # the k-th largest
    above = idx[values > threshold]
    tied = idx[values == threshold]
    return np.concatenate([above, tied[: k - above.size]])


def topk_per_layer(
    scores: Mapping[str, npt.NDArray[np.floating]],
    budgets: Mapping[str, int],
    priority: Mapping[str, npt.NDArray[np.integer]] | None = None,
) -> dict[str, BoolArray]:
    """``topk_mask`` of every tensor in ``budgets`` with its own kept count ``budgets[name]``."""
    out: dict[str, BoolArray] = {}
    for name, k in budgets.items():
        if name not in scores:
            raise ValueError(f"budget given for {name!r}, which has no scores")
        pri = None if priority is None else priority[name]
        out[name] = topk_mask(scores[name], k, pri)
    return out


def momentum_step(
    global_weights: npt.NDArray[np.floating],
    average: npt.NDArray[np.floating],
    momentum: npt.NDArray[np.floating],
    beta: float,
    server_lr: float,
) -> tuple[FloatArray, FloatArray]:
    """One FedAvgM server step (Hsu et al. 2019): returns ``(new_weights, new_momentum)``.

    With the pseudo-gradient ``delta = global - average``: ``v' = beta * v + delta`` and
    ``w' = global - server_lr * v'``. ``beta = 0, server_lr = 1`` gives FedAvg's ``average``.
    Both results are float32; the new weights are computed from the float32-rounded ``v'`` that
    is stored, so a run resumed from the stored momentum continues bit for bit.
    """
    _check_shapes([global_weights, average, momentum], "global, average or momentum")
    g = global_weights.astype(np.float64, copy=False)
    delta = g - average.astype(np.float64, copy=False)
    v = (beta * momentum.astype(np.float64, copy=False) + delta).astype(np.float32)
    w = (g - server_lr * v.astype(np.float64)).astype(np.float32)
    return w, v


def sum_arrays(arrays: Sequence[npt.NDArray[np.floating]]) -> Float64Array:
    """Elementwise sum in float64 (PruneFL: importance summed over devices)."""
    if not arrays:
        raise ValueError("sum_arrays needs at least one array")
    _check_shapes(arrays, "array")
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for a in arrays:
        total += a
    return total


def apply_masks(
    weights: Mapping[str, npt.NDArray[np.floating]], masks: Mapping[str, BoolArray]
) -> dict[str, FloatArray]:
    """Copies of ``weights`` (float32) with every entry outside its tensor's mask set to zero."""
    out: dict[str, FloatArray] = {}
    for name, w in weights.items():
        w32 = np.array(w, dtype=np.float32, copy=True)
        if name in masks:
            if masks[name].shape != w32.shape:
                raise ValueError(f"mask of {name!r} has shape {masks[name].shape}, not {w32.shape}")
            w32[~masks[name]] = 0.0
        out[name] = w32
    return out


def sparse_vote_merge(
    global_weights: Mapping[str, npt.NDArray[np.floating]],
    global_masks: Mapping[str, BoolArray],
    client_weights: Sequence[Mapping[str, npt.NDArray[np.floating]]],
    client_masks: Sequence[Mapping[str, BoolArray]],
    num_examples: Sequence[int],
    budgets: Mapping[str, int],
    *,
    min_votes: int = 1,
    fill_to_budget: bool = True,
    combine: Callable[
        [Sequence[FloatArray], Sequence[BoolArray] | None, Sequence[float], FloatArray],
        FloatArray,
    ]
    | None = None,
) -> tuple[dict[str, FloatArray], dict[str, BoolArray]]:
    """FedDST's server step: masked mean, mask voting, per-layer top-k back to the budget.

    For a masked tensor ``n``: the value of each coordinate is the example-weighted mean over the
    devices whose mask holds it (the global value where nobody does); the candidates are the
    coordinates held by at least ``min_votes`` devices; the new mask keeps the ``budgets[n]``
    candidates of largest ``|value|``. With ``fill_to_budget`` (the paper's fixed budget), when
    fewer than ``budgets[n]`` coordinates have enough votes, the rest is filled first from
    coordinates with fewer votes, then from the others, each by ``|value|``, so the kept count is
    exactly the budget; without it (the reference code) the mask just keeps fewer. Everything
    outside the new mask is zero. Unmasked tensors get the plain example-weighted mean.

    ``client_masks[i]`` must hold a mask for every masked tensor. ``combine(values, masks or
    None, num_examples, global)`` replaces the (masked) weighted mean, e.g. by a robust
    statistic (``fleet.strategies.robust``); None keeps the mean. Returns ``(weights, masks)``.
    """
    if not client_weights:
        raise ValueError("sparse_vote_merge needs at least one client")
    if not (len(client_weights) == len(client_masks) == len(num_examples)):
        raise ValueError("client weights, masks and example counts differ in length")
    weights_out: dict[str, FloatArray] = {}
    masks_out: dict[str, BoolArray] = {}
    for name, g in global_weights.items():
        values = [cw[name] for cw in client_weights]
        if name not in global_masks:
            if combine is None:
                weights_out[name] = weighted_mean(values, num_examples)
            else:
                weights_out[name] = combine(values, None, num_examples, np.asarray(g, np.float32))
            continue
        masks = [cm[name] for cm in client_masks]
        if combine is None:
            mean = masked_weighted_mean(values, masks, num_examples, fallback=g)
        else:
            mean = combine(values, masks, num_examples, np.asarray(g, np.float32))
        votes = vote_counts(masks)
        eligible = votes >= max(min_votes, 1)
        if fill_to_budget:
            k = budgets[name]
            # Tier 2: enough votes; tier 1: held by someone; tier 0: nobody (global value).
            priority = np.where(eligible, 2, np.where(votes > 0, 1, 0))
        else:
            k = min(budgets[name], int(np.count_nonzero(eligible)))
            priority = eligible.astype(np.int64)
        mask = topk_mask(np.abs(mean), k, priority)
        weights_out[name] = np.where(mask, mean, np.float32(0.0)).astype(np.float32)
        masks_out[name] = mask
    return weights_out, masks_out

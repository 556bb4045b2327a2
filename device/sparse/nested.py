"""Nested subnetworks: a device's share of the global mask under a density budget.

A device that cannot train the whole sparse model in time (or in memory) trains a *nested*
subnetwork: in each pruned layer, the largest-magnitude subset of the global mask's kept
weights. Every device's positions are then a subset of the same global mask, so the server's
aggregation stays a masked average with per-position counts (docs/heterogeneity.md).

Both sides compute the subnetwork from the same global weights and the same budget, so it
never travels: the round command carries only the budget (``RoundCommand.density_budget``),
and the fleet manager recomputes the subnetwork to validate the device's update.

Definition (``nested_masks``): with the global density ``D`` (kept fraction over all masked
tensors) and a budget ``d`` in (0, 1], layer ``l`` with ``k_l`` kept weights keeps
``nested_count(k_l, d, D) = min(k_l, max(1, round(k_l * d / D)))`` of them (every non-empty
layer keeps at least one weight; ``d >= D`` keeps the global mask unchanged): those of largest
``|w|``, ties broken by the lower flat (row-major) index, so the result is the same on every
platform and on both sides. Invariants: ``nested[l] <= global[l]`` elementwise, and a smaller
budget gives a subset of a larger one's subnetwork (nested in the strict sense).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]

__all__ = ["global_density", "largest_first", "nested_count", "nested_densities", "nested_masks"]


def global_density(masks: Mapping[str, npt.NDArray[np.bool_]]) -> float:
    """Kept fraction over all masked tensors, in [0, 1]; 1.0 when nothing is masked."""
    total = sum(int(m.size) for m in masks.values())
    if total == 0:
        return 1.0
    return sum(int(np.count_nonzero(m)) for m in masks.values()) / total


def nested_count(kept: int, budget: float, density: float) -> int:
    """Weights a layer with ``kept`` global weights keeps under ``budget`` (module docstring)."""
    if kept <= 0:
        return 0
    if not budget > 0.0 or budget >= density:
        return kept
    return min(kept, max(1, round(kept * budget / density)))


def nested_densities(masks: Mapping[str, BoolArray], budget: float) -> dict[str, float]:
    """Each layer's kept fraction in the nested subnetwork at ``budget`` (``nested_masks``'s
    counts over the layer's size), without ranking any weights: what a device's kernel plan is
    chosen at."""
    density = global_density(masks)
    return {
        name: nested_count(int(np.count_nonzero(m)), budget, density) / max(1, int(m.size))
        for name, m in masks.items()
    }


def largest_first(magnitude: npt.NDArray[np.floating], keep: int) -> npt.NDArray[np.intp]:
    """Indices of the ``keep`` largest entries of ``magnitude`` (1-D, no NaN), ties broken by
    the lower index: the first ``keep`` of a stable sort by decreasing value, in O(n).

    ``np.partition`` finds the ``keep``-th largest value; everything above it is kept, and of
    the entries equal to it the lowest indices fill the rest. Returned in increasing order.
    """
    n = int(magnitude.size)
    if keep >= n:
        return np.arange(n)
    if keep <= 0:
        return np.arange(0)
    threshold = np.partition(magnitude, n - keep)[n - keep]
    above = np.flatnonzero(magnitude > threshold)
    ties = np.flatnonzero(magnitude == threshold)[: keep - above.size]
    return np.sort(np.concatenate([above, ties]))


def nested_masks(
    weights: Mapping[str, npt.NDArray[np.floating]],
    masks: Mapping[str, BoolArray],
    budget: float,
) -> dict[str, BoolArray]:
    """The nested subnetwork of ``masks`` at density ``budget`` (module docstring).

    ``weights`` are the global weights (the ranking is by their magnitude at the kept
    positions); a ``budget`` of 0 or at least the global density returns the global masks
    themselves (not copies). New arrays otherwise; nothing passed in is modified.
    """
    if not budget > 0.0:
        return dict(masks)
    density = global_density(masks)
    if budget >= density:
        return dict(masks)
    out: dict[str, BoolArray] = {}
    for name, mask in masks.items():
        flat_mask = np.asarray(mask, dtype=bool).reshape(-1)
        slots = np.flatnonzero(flat_mask)
        keep = nested_count(int(slots.size), budget, density)
        nested = np.zeros(flat_mask.shape, dtype=bool)
        if keep >= slots.size:
            nested[slots] = True
        elif keep > 0:
            magnitude = np.abs(np.asarray(weights[name], dtype=np.float32).reshape(-1)[slots])
            nested[slots[largest_first(magnitude, keep)]] = True
        out[name] = nested.reshape(mask.shape)
    return out

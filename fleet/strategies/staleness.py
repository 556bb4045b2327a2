"""Stale updates in buffered asynchronous rounds (FedBuff, Nguyen et al. 2022): their weight,
and how a sparse delta trained against an older model lands in the current one.

Every update names the model version it trained from (``DeviceUpdate.model_version``, with
that version's digest); its staleness is ``s = current version - that version`` (>= 0).

- **Weight** (``staleness_weight``): ``1 / sqrt(1 + s)``, applied to the update's *delta*:
  the mapped result is ``current + w(s) * (trained - base)``. The strategy's example-weighted
  mean of mapped results is then ``current + sum_i n_i w_i delta_i / sum_i n_i``, FedBuff's
  server step with server learning rate 1 (a fresh update, s = 0, is taken unchanged).
- **Mask mapping** (``map_to_current``): a FedDST or PruneFL readjustment since the update's
  version may have moved the global mask. For a pruned tensor, the positions the device held
  that are still in the current global mask *survive* and carry ``current + w * delta``; the
  positions that left the mask are *dropped* (their delta is discarded: the weight they would
  update is now pruned to zero, and reviving it would break the mask's budget); positions that
  joined the mask since are not held by this update (it had no vote there). Dense tensors take
  ``current + w * delta`` everywhere. For a fresh update (same mask) nothing is dropped, except
  FedDST's grown positions outside the mask, which survive only at s = 0 (they are the device's
  vote for the next mask).

The result's masks are the surviving positions; the aggregation treats them as a restricted
device (``fleet.strategies.nested.aggregate_nested``): it had a vote only where it holds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fleet.strategies.base import BoolArray, ClientResult, FloatArray, GlobalModel

__all__ = ["map_to_current", "staleness_weight"]


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness weight ``1 / sqrt(1 + s)`` for ``s >= 0`` versions."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0 versions, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def map_to_current(
    result: ClientResult, trained_from: GlobalModel, current: GlobalModel, weight: float
) -> tuple[ClientResult, int]:
    """``result`` (weights the device trained from ``trained_from``) moved onto ``current``
    with its delta scaled by ``weight`` (module docstring). Returns the mapped result and the
    number of positions dropped because they left the global mask."""
    stale = trained_from.version != current.version
    weights: dict[str, FloatArray] = {}
    masks: dict[str, BoolArray] = {}
    dropped = 0
    for name, now in current.weights.items():
        base = trained_from.weights[name]
        trained = result.weights[name]
        if name not in current.masks:
            dense = now.astype(np.float64) + weight * (
                trained.astype(np.float64) - base.astype(np.float64)
            )
            weights[name] = dense.astype(np.float32)
            continue
        held = result.masks.get(name, trained_from.masks[name])
        surviving = held & current.masks[name] if stale else held
        dropped += int(np.count_nonzero(held)) - int(np.count_nonzero(surviving))
        out = np.zeros(now.shape, dtype=np.float32)
        delta = trained[surviving].astype(np.float64) - base[surviving].astype(np.float64)
        out[surviving] = (now[surviving].astype(np.float64) + weight * delta).astype(np.float32)
        weights[name] = out
        masks[name] = surviving
    mapped = dataclasses.replace(result, weights=weights, masks=masks)
    return mapped, dropped

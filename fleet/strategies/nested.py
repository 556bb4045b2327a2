"""Budgeted updates: validation against the assigned nested subnetwork, and their aggregation.

A device with a density budget ``b`` (``fleet.strategies.budgets``) trains the nested
subnetwork ``A = nested_masks(global weights, global masks, b)`` (``device.sparse.nested``).
The fleet manager recomputes ``A`` from the same global model to judge its update
(``check_budgeted``):

- ``over_budget``: a layer keeps more weights than ``A`` has in it (the device trained denser
  than its budget);
- ``outside_subnetwork``: a position outside ``A``. In a FedDST readjustment round a device
  may move up to ``round(alpha * |A_l|)`` positions of layer ``l`` (drop and regrow, the
  trainer's count), anywhere; outside those rounds, and always for FedAvg/FedAvgM/PruneFL (whose
  devices do not move masks), every position must lie in ``A``.

An unbudgeted device (budget 0 or at least the global density) gets the strategy's own check.

Aggregation (``aggregate_budgeted``) stays a masked average with per-position counts: each
coordinate is the example-weighted mean over the devices that hold it (``per_position_counts``
says how many), the global value where nobody does.

- FedDST (``nested_vote_merge``): mask voting counts a device only where it *had a vote*: an
  unbudgeted device everywhere, a budgeted one on its assigned subnetwork and the positions it
  grew. A coordinate is a candidate when it has at least ``min(min_votes, voters)`` votes; a
  coordinate of the global mask on which nobody had a vote (every device that could have
  trained it was budgeted below it) keeps its place and value, as an abstention, not a vote
  against. Then per-layer top-k back to FedDST's budget ``k_l``, as ``sparse_vote_merge``.
- FedAvg, FedAvgM, PruneFL (``fill_unheld``): each budgeted result is completed to the global
  mask with the masked mean over the holders at the coordinates it did not train; the
  strategy's own (plain weighted) mean of completed results *is* the masked mean (for every
  coordinate, ``sum_held w x + sum_unheld w * mean = mean * sum w``), so the strategy's own
  aggregation (momentum, PruneFL's reconfiguration) runs unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from device.errors import ValidationError
from device.sparse.nested import global_density, nested_masks
from device.sparse.policies import n_to_readjust
from device.wire.messages import Readjust
from fleet.strategies.aggregate import masked_weighted_mean, topk_mask, weighted_mean
from fleet.strategies.base import (
    BoolArray,
    ClientResult,
    FloatArray,
    GlobalModel,
    Strategy,
    check_result_tensors,
    require_dense_or_full_masks,
)
from fleet.strategies.budgets import as_f32
from fleet.strategies.feddst import FedDST
from fleet.strategies.prunefl import PruneFL, require_importance_complete
from fleet.strategies.robust import clip_results

__all__ = [
    "aggregate_budgeted",
    "aggregate_nested",
    "assigned_masks",
    "budget_assignments",
    "check_budgeted",
    "fill_unheld",
    "is_budgeted",
    "nested_vote_merge",
    "per_position_counts",
    "trained_density",
]

IntArray = npt.NDArray[np.int64]


def is_budgeted(model: GlobalModel, budget: float) -> bool:
    """Whether ``budget`` makes a device train less than the global mask."""
    return budget > 0.0 and budget < global_density(model.masks)


def assigned_masks(model: GlobalModel, budget: float) -> dict[str, BoolArray]:
    """The nested subnetwork a device with ``budget`` trains (the global masks if none)."""
    return nested_masks(model.weights, model.masks, budget)


def trained_density(model: GlobalModel, result: ClientResult) -> float:
    """The density a device trained at: its kept fraction over the model's masked tensors."""
    total = sum(m.size for m in model.masks.values())
    if total == 0:
        return 1.0
    kept = sum(int(np.count_nonzero(result.masks.get(n, g))) for n, g in model.masks.items())
    return kept / total


def _reject(device_id: str, reason: str, what: str) -> ValidationError:
    return ValidationError(f"update from device {device_id!r}: {what}", reason=reason)


def check_budgeted(
    strategy: Strategy,
    model: GlobalModel,
    result: ClientResult,
    budget: float,
    readjust: Readjust | None,
) -> None:
    """``strategy.check_result`` for an unbudgeted device; otherwise the common checks, then
    ``over_budget`` and ``outside_subnetwork`` (module docstring). Raises ``ValidationError``."""
    if not is_budgeted(model, budget):
        strategy.check_result(model, result)
        return
    check_result_tensors(model, result)
    require_dense_or_full_masks(model, result)
    moves = readjust if isinstance(strategy, FedDST) else None
    assigned = assigned_masks(model, budget)
    for name, allowed in assigned.items():
        mask = result.masks[name]
        have, limit = int(np.count_nonzero(mask)), int(np.count_nonzero(allowed))
        if have > limit:
            raise _reject(
                result.device_id,
                "over_budget",
                f"mask of {name!r} keeps {have} entries, its budget ({budget:g}) allows {limit}",
            )
        outside = int(np.count_nonzero(mask & ~allowed))
        # The device got alpha as a float32 (RoundCommand): count with the value it used.
        may_move = 0 if moves is None else n_to_readjust(as_f32(moves.alpha), limit)
        if outside > may_move:
            raise _reject(
                result.device_id,
                "outside_subnetwork",
                f"mask of {name!r} has {outside} positions outside its assigned subnetwork "
                f"(budget {budget:g}; {may_move} may move this round)",
            )
    if isinstance(strategy, PruneFL):
        require_importance_complete(model, result.device_id, result.importance)


def per_position_counts(model: GlobalModel, results: Sequence[ClientResult]) -> dict[str, IntArray]:
    """For each masked tensor, how many results hold each coordinate."""
    counts: dict[str, IntArray] = {}
    for name, g in model.masks.items():
        total = np.zeros(g.shape, dtype=np.int64)
        for r in results:
            total += r.masks.get(name, g)
        counts[name] = total
    return counts


def fill_unheld(model: GlobalModel, results: Sequence[ClientResult]) -> list[ClientResult]:
    """Results completed to the global mask (module docstring: FedAvg, FedAvgM, PruneFL)."""
    filled_by: dict[str, FloatArray] = {}
    for name, g in model.masks.items():
        filled_by[name] = masked_weighted_mean(
            [r.weights[name] for r in results],
            [r.masks.get(name, g) for r in results],
            [r.num_examples for r in results],
            fallback=model.weights[name],
        )
    out: list[ClientResult] = []
    for r in results:
        weights = dict(r.weights)
        masks = dict(r.masks)
        for name, g in model.masks.items():
            mine = r.masks.get(name, g)
            if mine is g or np.array_equal(mine, g):
                continue
            weights[name] = np.where(mine, r.weights[name], filled_by[name]).astype(np.float32)
            weights[name][~g] = 0.0
            masks[name] = g
        out.append(dataclasses.replace(r, weights=weights, masks=masks))
    return out


def budget_assignments(
    model: GlobalModel, results: Sequence[ClientResult], budgets: Mapping[str, float]
) -> dict[str, dict[str, BoolArray]]:
    """The assigned subnetwork of each budgeted device among ``results`` (others: absent)."""
    return {
        r.device_id: assigned_masks(model, budgets.get(r.device_id, 0.0))
        for r in results
        if is_budgeted(model, budgets.get(r.device_id, 0.0))
    }


def nested_vote_merge(
    model: GlobalModel,
    results: Sequence[ClientResult],
    assigned: Mapping[str, Mapping[str, BoolArray]],
    kept: Mapping[str, int],
    *,
    min_votes: int = 1,
    fill_to_budget: bool = True,
) -> tuple[dict[str, FloatArray], dict[str, BoolArray]]:
    """FedDST's server step with restricted devices (module docstring). ``assigned`` maps a
    device id to the positions it could train (a budgeted device's subnetwork; an async stale
    update's surviving positions, ``fleet.runtime.staleness``); a device absent from it had a
    vote everywhere. ``kept`` is FedDST's ``k_l``."""
    counts = [r.num_examples for r in results]
    weights_out: dict[str, FloatArray] = {}
    masks_out: dict[str, BoolArray] = {}
    for name, g in model.weights.items():
        values = [r.weights[name] for r in results]
        if name not in model.masks:
            weights_out[name] = weighted_mean(values, counts)
            continue
        global_mask = model.masks[name]
        masks = [r.masks[name] for r in results]
        mean = masked_weighted_mean(values, masks, counts, fallback=g)
        votes = np.zeros(global_mask.shape, dtype=np.int64)
        voters = np.zeros(global_mask.shape, dtype=np.int64)
        for r, mask in zip(results, masks, strict=True):
            votes += mask
            if r.device_id in assigned:
                voters += assigned[r.device_id][name] | mask
            else:
                voters += 1
        eligible = (votes > 0) & (votes >= np.minimum(max(min_votes, 1), voters))
        abstained = (voters == 0) & global_mask
        if fill_to_budget:
            k = kept[name]
            priority = np.where(eligible | abstained, 2, np.where(votes > 0, 1, 0))
        else:
            k = min(kept[name], int(np.count_nonzero(eligible | abstained)))
            priority = (eligible | abstained).astype(np.int64)
        mask = topk_mask(np.abs(mean), k, priority)
        weights_out[name] = np.where(mask, mean, np.float32(0.0)).astype(np.float32)
        masks_out[name] = mask
    return weights_out, masks_out


def aggregate_budgeted(
    strategy: Strategy,
    round_: int,
    model: GlobalModel,
    results: Sequence[ClientResult],
    budgets: Mapping[str, float],
) -> GlobalModel:
    """The next global model from a round with budgeted devices (module docstring). The
    results were judged by ``check_budgeted``; ``strategy`` keeps its own state (FedDST's
    ``k_l``, FedAvgM's momentum, PruneFL's schedule)."""
    assigned = budget_assignments(model, results, budgets)
    return aggregate_nested(strategy, round_, model, results, assigned)


def aggregate_nested(
    strategy: Strategy,
    round_: int,
    model: GlobalModel,
    results: Sequence[ClientResult],
    assigned: Mapping[str, Mapping[str, BoolArray]],
) -> GlobalModel:
    """``aggregate_budgeted`` with the restricted devices' positions given (``assigned``, as
    ``nested_vote_merge`` takes them); every result's masks lie within the global masks except
    where FedDST devices grew positions."""
    if not results:
        raise ValueError("aggregate needs at least one result")
    if isinstance(strategy, FedDST):
        options = strategy.options
        clipped = clip_results(model, results, options.robust.clip_norm)
        weights, masks = nested_vote_merge(
            model,
            clipped,
            assigned,
            strategy.budgets,
            min_votes=options.min_votes,
            fill_to_budget=options.fill_to_budget,
        )
        return GlobalModel(model.version + 1, weights, masks, model.model_name)
    return strategy.aggregate(round_, model, fill_unheld(model, results))

"""PruneFL's reconfiguration rule, in pure numpy: which parameters to keep for the next rounds.

PruneFL (Jiang et al., TNNLS 2022) chooses the mask M that maximises the expected loss reduction
per unit of round time, ``Delta(M) / T(M)`` with ``Delta(M) = sum_{j in M} g_j^2`` (summed squared
gradients, the "importance") and ``T(M) = c0 + sum_l c_l * nnz_l`` (a fixed per-round time plus a
per-parameter time ``c_l`` of each layer). Part of the current model is protected: the
``(1 - d)`` fraction of each layer's active weights with the largest magnitude always stays. The
rest of the parameters (all layers, pruned positions included) are added in decreasing order of
``g_j^2 / c_l`` while that exceeds the current ratio ``sum g^2 / T``. For a fixed protected set this
greedy prefix is exactly the maximum of the ratio (a parameter raises the ratio iff its own
``g^2 / c`` exceeds it, and the candidates come in decreasing order of that), which
``exhaustive_reconfigure`` checks on small problems.

Both the fleet manager (adaptive pruning) and the device (initial pruning) call ``reconfigure``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from device.errors import ConfigError

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.floating]


def _check_inputs(
    importance: Mapping[str, FloatArray],
    weights: Mapping[str, FloatArray],
    masks: Mapping[str, BoolArray],
    cost_per_param: Mapping[str, float],
    c0: float,
    protect_fraction: float,
) -> list[str]:
    if not masks:
        raise ConfigError("PruneFL reconfiguration needs at least one pruned tensor, got none")
    if not (0.0 <= protect_fraction <= 1.0):
        raise ConfigError(f"PruneFL protect fraction d must be in [0, 1], got {protect_fraction!r}")
    if not (c0 >= 0.0 and math.isfinite(c0)):
        raise ConfigError(f"PruneFL c0 (fixed round time) must be finite and >= 0, got {c0!r}")
    names = list(masks)
    for name in names:
        for what, table in (("importance", importance), ("weights", weights)):
            if name not in table:
                raise ConfigError(f"PruneFL reconfiguration: {what} has no entry for {name!r}")
            if np.shape(table[name]) != np.shape(masks[name]):
                raise ConfigError(
                    f"PruneFL reconfiguration: {what}[{name!r}] has shape "
                    f"{np.shape(table[name])}, its mask has {np.shape(masks[name])}"
                )
        if name not in cost_per_param:
            raise ConfigError(f"PruneFL reconfiguration: no cost per parameter for {name!r}")
        cost = cost_per_param[name]
        if not (cost > 0.0 and math.isfinite(cost)):
            raise ConfigError(
                f"cost per parameter of {name!r} must be finite and > 0, got {cost!r}"
            )
        if not np.all(np.isfinite(importance[name])) or np.any(np.asarray(importance[name]) < 0):
            raise ConfigError(f"importance of {name!r} must be finite and >= 0")
    return names


def protected_masks(
    weights: Mapping[str, FloatArray], masks: Mapping[str, BoolArray], protect_fraction: float
) -> dict[str, BoolArray]:
    """Per layer, the ``round((1 - d) * nnz_l)`` active weights of largest magnitude.

    Ties go to the lower flat index. ``d = protect_fraction`` is PruneFL's d: 0 keeps every
    active weight, 1 protects nothing.
    """
    out: dict[str, BoolArray] = {}
    for name, mask in masks.items():
        flat_mask = np.asarray(mask, dtype=bool).reshape(-1)
        active = np.flatnonzero(flat_mask)
        keep = round((1.0 - protect_fraction) * active.size)
        magnitude = np.abs(np.asarray(weights[name], dtype=np.float64).reshape(-1)[active])
        order = np.argsort(-magnitude, kind="stable")
        protected = np.zeros(flat_mask.size, dtype=bool)
        protected[active[order[:keep]]] = True
        out[name] = protected.reshape(np.shape(mask))
    return out


def round_time(
    masks: Mapping[str, BoolArray], cost_per_param: Mapping[str, float], c0: float
) -> float:
    """PruneFL's time model ``T = c0 + sum_l c_l * nnz_l`` (units of ``c0`` and ``c_l``)."""
    return c0 + sum(cost_per_param[n] * int(np.count_nonzero(m)) for n, m in masks.items())


def objective(
    importance: Mapping[str, FloatArray],
    masks: Mapping[str, BoolArray],
    cost_per_param: Mapping[str, float],
    c0: float,
) -> float:
    """``sum_{j in M} g_j^2 / T(M)``, the quantity the reconfiguration maximises (0 when T = 0)."""
    gain = sum(
        float(np.sum(np.asarray(importance[n], dtype=np.float64)[m])) for n, m in masks.items()
    )
    time = round_time(masks, cost_per_param, c0)
    return gain / time if time > 0 else 0.0


def reconfigure(
    importance: Mapping[str, FloatArray],
    weights: Mapping[str, FloatArray],
    masks: Mapping[str, BoolArray],
    cost_per_param: Mapping[str, float],
    c0: float,
    protect_fraction: float,
) -> dict[str, BoolArray]:
    """PruneFL's new masks (bool, same shapes) for the tensors in ``masks``.

    ``importance[l]`` are summed squared gradients (>= 0, dense, pruned positions included),
    ``weights[l]`` the current weights (for the protected set), ``masks[l]`` the current masks,
    ``cost_per_param[l] > 0`` the time per kept parameter of layer l and ``c0 >= 0`` the fixed
    time per round, ``protect_fraction`` PruneFL's d in [0, 1]. Deterministic: equal scores are
    taken in (layer order, flat index) order.
    """
    names = _check_inputs(importance, weights, masks, cost_per_param, c0, protect_fraction)
    protected = protected_masks(weights, masks, protect_fraction)
    gain0 = 0.0
    time0 = float(c0)
    gains: list[npt.NDArray[np.float64]] = []
    costs: list[npt.NDArray[np.float64]] = []
    owners: list[npt.NDArray[np.intp]] = []
    for layer, name in enumerate(names):
        g2 = np.asarray(importance[name], dtype=np.float64).reshape(-1)
        prot = protected[name].reshape(-1)
        gain0 += float(g2[prot].sum())
        time0 += cost_per_param[name] * int(prot.sum())
        free = np.flatnonzero(~prot)
        gains.append(g2[free])
        costs.append(np.full(free.size, float(cost_per_param[name])))
        owners.append(np.stack([np.full(free.size, layer, dtype=np.intp), free]))
    gain = np.concatenate(gains)
    cost = np.concatenate(costs)
    owner = np.concatenate(owners, axis=1)
    order = np.argsort(-(gain / cost), kind="stable")
    gain, cost, owner = gain[order], cost[order], owner[:, order]
    # Sums over the candidates taken before candidate k (exclusive cumulative sums).
    gain_before = gain0 + np.concatenate(([0.0], np.cumsum(gain)[:-1]))
    time_before = time0 + np.concatenate(([0.0], np.cumsum(cost)[:-1]))
    # g^2/c > G/T, multiplied out (c > 0, T >= 0); with T = 0 (c0 = 0, nothing protected) any
    # positive gain raises the ratio from its undefined start.
    take = (gain * time_before > gain_before * cost) | ((time_before == 0.0) & (gain > 0.0))
    stop = int(np.argmin(take)) if not take.all() else take.size
    chosen = owner[:, :stop]
    new = {n: protected[n].reshape(-1).copy() for n in names}
    for layer, name in enumerate(names):
        new[name][chosen[1][chosen[0] == layer]] = True
    return {n: new[n].reshape(np.shape(masks[n])) for n in names}


def exhaustive_reconfigure(
    importance: Mapping[str, FloatArray],
    weights: Mapping[str, FloatArray],
    masks: Mapping[str, BoolArray],
    cost_per_param: Mapping[str, float],
    c0: float,
    protect_fraction: float,
    *,
    max_candidates: int = 16,
) -> tuple[dict[str, BoolArray], float]:
    """Reference for tests: try every subset of the unprotected parameters; best masks and ratio.

    Exponential in the number of candidates, so refused above ``max_candidates``. Among subsets
    with the same ratio the first found (fewest parameters) is returned.
    """
    names = _check_inputs(importance, weights, masks, cost_per_param, c0, protect_fraction)
    protected = protected_masks(weights, masks, protect_fraction)
    candidates = [
        (name, int(i)) for name in names for i in np.flatnonzero(~protected[name].reshape(-1))
    ]
    if len(candidates) > max_candidates:
        raise ConfigError(
            f"exhaustive reconfiguration over {len(candidates)} candidates refused "
            f"(max {max_candidates})"
        )
    best_masks = {n: protected[n].copy() for n in names}
    best = objective(importance, best_masks, cost_per_param, c0)
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            trial = {n: protected[n].reshape(-1).copy() for n in names}
            for name, index in subset:
                trial[name][index] = True
            shaped = {n: trial[n].reshape(np.shape(masks[n])) for n in names}
            ratio = objective(importance, shaped, cost_per_param, c0)
            if ratio > best * (1.0 + 1e-12):
                best, best_masks = ratio, shaped
    return best_masks, best

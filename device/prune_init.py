"""PruneFL's initial pruning at one device: find a good starting mask from the device's own data.

PruneFL (Jiang et al., TNNLS 2022, "initial pruning") lets one selected device train the freshly
initialised model on its local data and reconfigure the mask every few local rounds with the same
rule as the server's adaptive pruning (``device.sparse.prunefl.reconfigure``: keep the ``1 - d``
largest active weights of each layer, add parameters by squared gradient per unit of time while
that beats the current ratio). It stops once the density has changed by at most
``stable_change`` (relative) for ``stable_count`` reconfigurations in a row, or after
``max_reconfigs``; the mask and weights it ends with start federated training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from device.errors import ConfigError
from device.seeding import derive_seed
from device.sparse.density import uniform
from device.sparse.masks import Masks, apply_masks, initial_masks, mask_density
from device.sparse.prunefl import reconfigure
from device.trainer import Examples, train_round
from device.wire.messages import LocalTraining


def _check(
    cost_per_param: Mapping[str, float],
    params: Mapping[str, nn.Parameter],
    rounds_per_reconfig: int,
    max_reconfigs: int,
    stable_change: float,
    stable_count: int,
    start_density: float,
) -> None:
    if not cost_per_param:
        raise ConfigError("initial pruning needs the cost per parameter of each pruned tensor")
    unknown = sorted(set(cost_per_param) - set(params))
    if unknown:
        raise ConfigError(f"initial pruning: {unknown} are not parameters of the model")
    checks = [
        (rounds_per_reconfig >= 1, f"rounds_per_reconfig must be >= 1, got {rounds_per_reconfig}"),
        (max_reconfigs >= 1, f"max_reconfigs must be >= 1, got {max_reconfigs}"),
        (stable_change >= 0, f"stable_change must be >= 0, got {stable_change}"),
        (stable_count >= 1, f"stable_count must be >= 1, got {stable_count}"),
        (0 < start_density <= 1, f"start_density must be in (0, 1], got {start_density}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"initial pruning: {message}")


def relative_change(before: float, after: float) -> float:
    """``|after - before| / before`` (inf when ``before`` is 0 and ``after`` is not)."""
    if before == 0.0:
        return 0.0 if after == 0.0 else math.inf
    return abs(after - before) / before


def initial_prune(
    model: nn.Module,
    data: Examples,
    settings: LocalTraining,
    *,
    cost_per_param: Mapping[str, float],
    c0: float,
    seed: int,
    rounds_per_reconfig: int = 5,
    max_reconfigs: int = 20,
    stable_change: float = 0.1,
    stable_count: int = 5,
    start_density: float = 1.0,
    protect_fraction: float = 0.3,
) -> tuple[dict[str, torch.Tensor], Masks, list[float]]:
    """Train ``model`` in place on ``data`` and prune it PruneFL-style; return weights and masks.

    The pruned tensors are the keys of ``cost_per_param`` (seconds, or any unit shared with ``c0``,
    per kept parameter per round; ``c0`` the fixed time per round). The model starts at
    ``start_density`` (uniform per layer, largest initial magnitudes kept). Each reconfiguration
    sums the importance of ``rounds_per_reconfig`` local rounds of ``settings`` and calls
    ``reconfigure`` with PruneFL's ``d = protect_fraction``.

    Returns the final state_dict (copies; zero outside the masks), the masks, and the overall
    density before the first reconfiguration followed by the density after each one (so
    ``len(history) - 1`` reconfigurations ran).
    """
    params = dict(model.named_parameters())
    _check(
        cost_per_param,
        params,
        rounds_per_reconfig,
        max_reconfigs,
        stable_change,
        stable_count,
        start_density,
    )
    names = list(cost_per_param)
    shapes = {n: tuple(params[n].shape) for n in names}
    weights = {n: params[n].detach() for n in names}
    masks = initial_masks(weights, uniform(shapes, start_density))
    apply_masks(model, masks)
    history = [mask_density(masks)]
    stable = 0
    local_round = 0
    for _ in range(max_reconfigs):
        importance = {n: np.zeros(shapes[n], dtype=np.float64) for n in names}
        for _ in range(rounds_per_reconfig):
            local_round += 1
            result = train_round(
                model,
                masks,
                data,
                settings,
                seed=derive_seed(seed, "initial-prune", local_round),
                report_importance=True,
            )
            for n in names:
                importance[n] += result.importance[n].double().numpy()
        new = reconfigure(
            importance,
            {n: params[n].detach().numpy() for n in names},
            {n: masks[n].numpy() for n in names},
            cost_per_param,
            c0,
            protect_fraction,
        )
        masks = {n: torch.from_numpy(new[n]) for n in names}
        # Newly pruned weights become zero; newly kept ones were already zero and start there.
        apply_masks(model, masks)
        history.append(mask_density(masks))
        stable = stable + 1 if relative_change(history[-2], history[-1]) <= stable_change else 0
        if stable >= stable_count:
            break
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return state, masks, history

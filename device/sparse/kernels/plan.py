"""The per-layer choice between a sparse kernel and masked dense compute, from a measured profile.

A layer computes sparsely only where its :class:`~device.wire.messages.DeviceProfile` shows a
clear gain at its density (:func:`choose_plan`); :func:`layer_cost` is the time of whichever
kernel that choice picks, the per-layer cost PruneFL's round-time model uses.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping

from device.errors import ConfigError, NotFoundError
from device.wire.messages import DeviceProfile, LayerProfile

__all__ = ["DEFAULT_MARGIN", "choose_plan", "interpolate_point", "layer_cost"]

#: A sparse kernel is chosen only where it takes less than this fraction of the dense time, so that
#: measurement noise alone never makes a layer slower than masked dense.
DEFAULT_MARGIN = 0.9


def interpolate_point(layer: LayerProfile, density: float) -> tuple[float, float]:
    """``(dense_s, sparse_s)`` of ``layer`` at ``density``, linear between measured densities.

    Outside the measured range the nearest point is used (below the lowest measured density
    that over-estimates the sparse time, which errs towards dense). ``sparse_s`` is 0 when
    either neighbour has no sparse measurement (no kernel for that layer).
    """
    if not layer.points:
        raise ConfigError(f"profile of layer {layer.name!r} has no measured points")
    if not math.isfinite(density) or not 0.0 <= density <= 1.0:
        raise ConfigError(f"density of {layer.name!r} must be in [0, 1], got {density!r}")
    points = sorted(layer.points, key=lambda p: p.density)
    if density <= points[0].density:
        return points[0].dense_s, points[0].sparse_s
    if density >= points[-1].density:
        return points[-1].dense_s, points[-1].sparse_s
    for lo, hi in itertools.pairwise(points):
        if lo.density <= density <= hi.density:
            span = hi.density - lo.density
            t = 0.0 if span <= 0 else (density - lo.density) / span
            dense = lo.dense_s + t * (hi.dense_s - lo.dense_s)
            if lo.sparse_s <= 0 or hi.sparse_s <= 0:
                return dense, 0.0
            return dense, lo.sparse_s + t * (hi.sparse_s - lo.sparse_s)
    raise AssertionError("unreachable: density lies between the first and last point")


def _decision_costs(layer: LayerProfile, density: float) -> tuple[float, float]:
    """``(dense_s, sparse_s)`` that :func:`choose_plan` and :func:`layer_cost` decide on.

    Both are made robust to one noisy measurement, in the direction of choosing dense:

    * masked dense compute does the same work at every density, so the interpolated dense time
      is capped by the median of the layer's dense times (a load spike during one dense
      measurement cannot make the kernel look faster there);
    * sparse work only grows with density, so the sparse time at ``density`` is at least every
      sparse time measured at a lower density (a lucky fast sparse measurement cannot either).
    """
    dense_s, sparse_s = interpolate_point(layer, density)
    dense_s = min(dense_s, statistics.median(p.dense_s for p in layer.points))
    if sparse_s > 0:
        below = [p.sparse_s for p in layer.points if p.density <= density and p.sparse_s > 0]
        sparse_s = max([sparse_s, *below])
    return dense_s, sparse_s


def _sparse_wins(dense_s: float, sparse_s: float, margin: float) -> bool:
    return sparse_s > 0.0 and sparse_s < margin * dense_s


def _check_margin(margin: float) -> None:
    if not 0.0 < margin <= 1.0:
        raise ConfigError(f"margin must be in (0, 1], got {margin!r}")


def choose_plan(
    profile: DeviceProfile, densities: Mapping[str, float], *, margin: float = DEFAULT_MARGIN
) -> frozenset[str]:
    """The layers (weight names) that should compute sparsely at the given densities.

    A layer is chosen only if the profile has a sparse measurement for it and its sparse time is
    below ``margin`` times its dense time at that density: both interpolated between measured
    densities, the dense time capped by the median of the layer's dense times (dense work does
    not depend on density) and the sparse time raised to the largest measured at a lower density
    (sparse work only grows with density). Every other layer, and every name the profile does
    not know, stays masked dense.

    Args:
        profile: the device's measured profile.
        densities: weight name -> kept fraction in [0, 1] (e.g. from the current masks).
        margin: in (0, 1]; 0.9 demands a 10% gain before leaving dense compute.
    """
    _check_margin(margin)
    layers = {layer.name: layer for layer in profile.layers}
    chosen = set()
    for name, density in densities.items():
        layer = layers.get(name)
        if layer is None:
            continue
        dense_s, sparse_s = _decision_costs(layer, density)
        if _sparse_wins(dense_s, sparse_s, margin):
            chosen.add(name)
    return frozenset(chosen)


def layer_cost(
    profile: DeviceProfile, name: str, density: float, *, margin: float = DEFAULT_MARGIN
) -> float:
    """Seconds per minibatch (one training step: forward, backward, update) of layer ``name`` at
    ``density`` on this device.

    The time of the kernel :func:`choose_plan` would pick with the same ``margin``: the sparse
    time where it wins, the masked dense time otherwise. PruneFL's round-time model
    ``T = c_0 + sum_l c_l * nnz_l`` takes ``c_l = layer_cost(...) / nnz_l`` at the layer's current
    density (``nnz_l = density * numel``); ``c_0`` is ``profile.step_overhead_s``.

    Raises:
        NotFoundError: the profile has no layer ``name`` (the message lists the known ones).
    """
    _check_margin(margin)
    for layer in profile.layers:
        if layer.name == name:
            dense_s, sparse_s = _decision_costs(layer, density)
            return sparse_s if _sparse_wins(dense_s, sparse_s, margin) else dense_s
    known = ", ".join(layer.name for layer in profile.layers)
    raise NotFoundError(
        f"the profile of {profile.model_name!r} has no layer {name!r}; known: {known}"
    )

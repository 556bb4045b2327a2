"""Per-layer density allocation: how a global density budget is spread over the pruned tensors.

A density is the kept fraction of a tensor, in [0, 1]. Every allocator returns, for each tensor
name, a density ``d_l`` such that the per-layer kept counts ``kept_count(d_l, numel_l)`` are whole
numbers summing to exactly ``round(density * total)``: the real-valued allocation is turned into
integer counts by largest-remainder apportionment, so the global budget is met within one
parameter however many layers there are (rounding each layer on its own could miss it by up to
half a parameter per layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from device.errors import ConfigError

Shapes = Mapping[str, Sequence[int]]


def kept_count(density: float, numel: int) -> int:
    """Number of kept entries of a tensor of ``numel`` entries at ``density``: ``round(d * n)``.

    The one rounding rule of the code base (Python's ``round``, ties to even); the densities the
    allocators return are ``k / n`` so this gives back exactly ``k``.
    """
    return min(numel, max(0, round(density * numel)))


def _check_density(density: float) -> None:
    if not (0.0 <= density <= 1.0) or math.isnan(density):
        raise ConfigError(f"density must be a kept fraction in [0, 1], got {density!r}")


def _numels(shapes: Shapes) -> dict[str, int]:
    if not shapes:
        raise ConfigError("density allocation needs at least one tensor shape, got none")
    numels: dict[str, int] = {}
    for name, shape in shapes.items():
        numel = math.prod(int(s) for s in shape)
        if numel <= 0 or any(int(s) <= 0 for s in shape):
            raise ConfigError(f"tensor {name!r} has shape {tuple(shape)}: every dim must be >= 1")
        numels[name] = numel
    return numels


def _apportion(
    ideal: Mapping[str, float], numels: Mapping[str, int], target: int
) -> dict[str, int]:
    """Integer counts near ``ideal`` (each in [0, numel]) summing exactly to ``target``.

    Largest remainder: floor every ideal count, then give the missing units to the layers with the
    largest fractional parts (ties: first layer first). When float error makes the floors overshoot,
    take units back from the smallest fractional parts.
    """
    names = list(ideal)
    counts = {n: min(numels[n], max(0, math.floor(ideal[n]))) for n in names}
    missing = target - sum(counts.values())
    if missing > 0:
        order = sorted(names, key=lambda n: (-(ideal[n] - counts[n]), names.index(n)))
        while missing > 0:
            progressed = False
            for n in order:
                if missing == 0:
                    break
                if counts[n] < numels[n]:
                    counts[n] += 1
                    missing -= 1
                    progressed = True
            if not progressed:  # pragma: no cover - target <= total is checked by the callers
                raise ConfigError(f"cannot keep {target} entries in {sum(numels.values())}")
    elif missing < 0:
        order = sorted(names, key=lambda n: (ideal[n] - counts[n], names.index(n)))
        while missing < 0:
            for n in order:
                if missing == 0:
                    break
                if counts[n] > 0:
                    counts[n] -= 1
                    missing += 1
    return counts


def _to_densities(counts: Mapping[str, int], numels: Mapping[str, int]) -> dict[str, float]:
    return {n: counts[n] / numels[n] for n in counts}


def uniform(shapes: Shapes, density: float) -> dict[str, float]:
    """The same density for every tensor (up to one entry per tensor, to meet the budget exactly).

    ``shapes`` maps tensor names to shapes (every dim >= 1); ``density`` is in [0, 1].
    """
    _check_density(density)
    numels = _numels(shapes)
    target = round(density * sum(numels.values()))
    ideal = {n: density * numels[n] for n in numels}
    return _to_densities(_apportion(ideal, numels, target), numels)


def erk_raw(shape: Sequence[int], power_scale: float = 1.0) -> float:
    """RigL's unnormalised Erdős–Rényi-Kernel density of one tensor: ``(sum(shape)/prod(shape))^p``.

    For a linear weight this is Erdős–Rényi's ``(n_in + n_out) / (n_in * n_out)``; a convolution
    adds its kernel dims to the sum and the product. Dim order does not matter.
    """
    return float((sum(shape) / math.prod(shape)) ** power_scale)


def erk(shapes: Shapes, density: float, *, power_scale: float = 1.0) -> dict[str, float]:
    """Erdős–Rényi-Kernel allocation as RigL's ``sparse_utils.get_sparsities_erdos_renyi`` does it.

    Each tensor gets ``eps * erk_raw(shape)`` where ``eps`` makes the kept counts add up to the
    budget. When that would exceed 1 for the tensor(s) with the largest raw density, those become
    dense, their entries leave the budget of the others, and ``eps`` is solved again, until no
    tensor exceeds 1. The real-valued result is then apportioned to whole counts (module docstring).
    """
    _check_density(density)
    if power_scale < 0 or math.isnan(power_scale):
        raise ConfigError(f"ERK power_scale must be >= 0, got {power_scale!r}")
    numels = _numels(shapes)
    total = sum(numels.values())
    target = round(density * total)
    if density >= 1.0:
        return dict.fromkeys(numels, 1.0)
    raw = {n: erk_raw(shapes[n], power_scale) for n in numels}
    dense: set[str] = set()
    while True:
        sparse = [n for n in numels if n not in dense]
        # Kept entries the sparse tensors must provide: the budget minus what dense tensors keep.
        rhs = density * total - sum(numels[n] for n in dense)
        divisor = sum(raw[n] * numels[n] for n in sparse)
        eps = rhs / divisor
        max_raw = max(raw[n] for n in sparse)
        if max_raw * eps <= 1.0:
            break
        dense.update(n for n in sparse if raw[n] == max_raw)
        if len(dense) == len(numels):  # pragma: no cover - only reachable with density >= 1
            break
    ideal = {n: float(numels[n]) if n in dense else eps * raw[n] * numels[n] for n in numels}
    return _to_densities(_apportion(ideal, numels, target), numels)


Allocator = Callable[[Shapes, float], dict[str, float]]

ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "erk": erk}


def allocate(name: str, shapes: Shapes, density: float) -> dict[str, float]:
    """Per-tensor densities by the allocator called ``name`` ("uniform" or "erk")."""
    try:
        allocator = ALLOCATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown density allocation {name!r}; known: {', '.join(sorted(ALLOCATORS))}"
        ) from None
    return allocator(shapes, density)


def total_kept(densities: Mapping[str, float], shapes: Shapes) -> int:
    """Total kept entries of an allocation: the sum of ``kept_count`` over the tensors."""
    return sum(kept_count(densities[n], math.prod(shapes[n])) for n in densities)

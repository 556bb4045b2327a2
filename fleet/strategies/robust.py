"""Robust aggregation, optional per run: per-update norm clipping and coordinate-wise trimmed mean
or median over the active coordinates.

Validation (``fleet.strategies.validate``) refuses malformed updates; a well-formed malicious one
(a device that scales its delta by 100, say) passes it. These functions bound what such an update
can do:

- **Clipping** (``clip_norm`` = C): each device's delta ``d_i = w_i - g`` on its own mask is scaled
  by ``min(1, C / ||d_i||)`` (L2 norm over all tensors together) before aggregation. With the
  "mean" method the new global model is a convex combination of clipped models, so
  ``||g' - g|| <= C`` whatever the devices send (FedAvg; FedDST before it re-prunes to the
  budget; FedAvgM's momentum sums clipped steps, so its step is at most
  ``server_lr * C / (1 - beta)``).
- **Coordinate-wise trimmed mean** (Yin et al., ICML 2018): per coordinate, over the ``k`` devices
  whose mask holds it, the ``floor(trim_fraction * k)`` largest and as many smallest values are
  dropped and the rest averaged. **Median**: the coordinate-wise median of the same values (the
  mean of the two middle ones for even ``k``). Both ignore example counts: a device's count is
  its own claim, and weighting by it would let one device outvote the rest. A coordinate nobody
  holds keeps ``fallback`` (FedDST: the global value). Each coordinate stays within the range of
  its holders' values; the L2 bound above is the mean's: a coordinate-wise median of clipped
  deltas can be longer than C (each coordinate may come from another device).

``RobustOptions`` is the ``robust`` option of the fedavg, fedavgm and feddst strategies
(``robust: {clip_norm: 5.0, method: trimmed_mean, trim_fraction: 0.1}`` in a run's
``strategy_options``); the default (no clipping, "mean") leaves aggregation bit for bit as it was.
The trimmed mean and the median are not sums, so sharded aggregation (``fleet.runtime.aggregator``)
cannot compute them. All functions are pure: inputs are not modified; sorting happens in float64,
results are float32. Memory: at most ``devices * BLOCK`` float64 values at a time per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import numpy.typing as npt

from device.errors import ConfigError

if TYPE_CHECKING:
    # Only for annotations: fleet.strategies imports this module for its options, so importing
    # the package here at run time would be circular.
    from fleet.strategies.base import ClientResult, GlobalModel

__all__ = [
    "BLOCK",
    "METHODS",
    "Combine",
    "Method",
    "RobustOptions",
    "clip_result",
    "clip_results",
    "clip_scale",
    "combine",
    "coordinate_median",
    "delta_norm",
    "trimmed_mean",
]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
Float64Array = npt.NDArray[np.float64]

Method = Literal["mean", "trimmed_mean", "median"]
METHODS: tuple[str, ...] = get_args(Method)

BLOCK = 1 << 16
"""Coordinates sorted at a time (bounds memory to ``devices * BLOCK`` float64 values)."""

Combine = Callable[
    [Sequence[npt.NDArray[np.floating]], Sequence[BoolArray] | None, Sequence[float], FloatArray],
    FloatArray,
]
"""``(arrays, masks or None, example counts, fallback) -> combined``: how one tensor's device
values become the global value (``aggregate.sparse_vote_merge``'s ``combine``)."""


@dataclass(frozen=True)
class RobustOptions:
    """A run's robust aggregation (module docstring).

    ``clip_norm``: the L2 bound C > 0 on each device's delta (all tensors together, in weight
    units), or None for no clipping. ``method``: "mean" (the strategy's example-weighted mean),
    "trimmed_mean" or "median". ``trim_fraction`` in [0, 0.5): the fraction of the holders of a
    coordinate dropped at each end by "trimmed_mean" (0.1 drops 1 of 10 at each end).
    """

    clip_norm: float | None = None
    method: Method = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not (
            isinstance(self.clip_norm, int | float) and 0 < self.clip_norm < math.inf
        ):
            raise ConfigError(
                f"robust: clip_norm must be a positive number or null, got {self.clip_norm!r}"
            )
        if self.method not in METHODS:
            raise ConfigError(
                f"robust: unknown method {self.method!r}; known: {', '.join(METHODS)}"
            )
        if not (isinstance(self.trim_fraction, int | float) and 0 <= self.trim_fraction < 0.5):
            raise ConfigError(
                f"robust: trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether aggregation differs from the plain strategy."""
        return self.clip_norm is not None or self.method != "mean"

    @classmethod
    def coerce(cls, value: object, strategy: str) -> RobustOptions:
        """Options from a config value: None (defaults), a mapping of the fields, or options.

        Raises ``ConfigError`` naming ``strategy`` for unknown fields or anything else.
        """
        if value is None:
            return cls()
        if isinstance(value, RobustOptions):
            return value
        if isinstance(value, Mapping):
            known = ("clip_norm", "method", "trim_fraction")
            unknown = sorted(str(k) for k in value if k not in known)
            if unknown:
                raise ConfigError(
                    f"{strategy}: unknown robust option(s) {unknown}; known: {', '.join(known)}"
                )
            try:
                return cls(**cast(Mapping[str, Any], value))
            except ConfigError as exc:
                raise ConfigError(f"{strategy}: {exc}") from None
        raise ConfigError(f"{strategy}: robust must be a mapping of options, got {value!r}")

    def combiner(self) -> Combine | None:
        """The per-tensor combination for ``method``; None for "mean" (the strategy's own
        example-weighted mean stays in charge)."""
        if self.method == "mean":
            return None
        return lambda arrays, masks, counts, fallback: combine(
            arrays, masks, counts, fallback, method=self.method, trim_fraction=self.trim_fraction
        )


# -- clipping ------------------------------------------------------------------------------------


def delta_norm(deltas: Mapping[str, npt.NDArray[np.floating]]) -> float:
    """The L2 norm of all tensors of ``deltas`` taken together (summed in float64)."""
    total = 0.0
    for d in deltas.values():
        flat = np.asarray(d, dtype=np.float64).reshape(-1)
        total += float(flat @ flat)
    return math.sqrt(total)


def clip_scale(norm: float, clip_norm: float) -> float:
    """``min(1, clip_norm / norm)``: the factor that brings a delta of ``norm`` within the bound
    (1 for a zero delta)."""
    if clip_norm <= 0 or math.isnan(clip_norm):
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def _device_mask(model: GlobalModel, result: ClientResult, name: str) -> BoolArray | None:
    """The positions a result holds for ``name`` (None: all of them)."""
    if name in model.masks:
        return result.masks[name]
    return result.masks.get(name)


def clip_result(model: GlobalModel, result: ClientResult, clip_norm: float) -> ClientResult:
    """``result`` with its delta from ``model`` clipped to ``clip_norm`` (module docstring).

    The delta is ``result.weights - model.weights`` on the result's own mask (a coordinate it
    grew counts from 0); weights outside its mask stay zero. A result within the bound is
    returned as it is, so clipping never changes an honest run bit for bit where it is not
    needed. Expects a result that passed ``strategy.check_result``.
    """
    deltas: dict[str, Float64Array] = {}
    for name, g in model.weights.items():
        w = result.weights[name].astype(np.float64)
        d = w - g.astype(np.float64)
        mask = _device_mask(model, result, name)
        if mask is not None:
            d[~mask] = 0.0
        deltas[name] = d
    scale = clip_scale(delta_norm(deltas), clip_norm)
    if scale == 1.0:
        return result
    weights: dict[str, FloatArray] = {}
    for name, g in model.weights.items():
        w64 = g.astype(np.float64) + scale * deltas[name]
        mask = _device_mask(model, result, name)
        if mask is not None:
            w64[~mask] = 0.0
        weights[name] = w64.astype(np.float32)
    metrics = {**result.metrics, "clip_scale": scale}
    return replace(result, weights=weights, metrics=metrics)


def clip_results(
    model: GlobalModel, results: Sequence[ClientResult], clip_norm: float | None
) -> list[ClientResult]:
    """``clip_result`` of every result (the results themselves when ``clip_norm`` is None)."""
    if clip_norm is None:
        return list(results)
    return [clip_result(model, r, clip_norm) for r in results]


# -- coordinate-wise statistics ------------------------------------------------------------------


def _check(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray] | None,
    fallback: npt.NDArray[np.floating] | None,
) -> tuple[int, ...]:
    if not arrays:
        raise ValueError("robust aggregation needs at least one array")
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"array {i} has shape {a.shape}, expected {shape}")
    if masks is not None:
        if len(masks) != len(arrays):
            raise ValueError(f"got {len(arrays)} arrays but {len(masks)} masks")
        for i, m in enumerate(masks):
            if m.shape != shape or m.dtype != np.bool_:
                raise ValueError(f"mask {i} must be bool of shape {shape}")
        if fallback is None:
            raise ValueError("masked robust aggregation needs a fallback for unheld coordinates")
    if fallback is not None and fallback.shape != shape:
        raise ValueError(f"fallback has shape {fallback.shape}, the arrays {shape}")
    return shape


def _blocks(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray] | None,
    size: int,
) -> Iterator[tuple[slice, Float64Array, npt.NDArray[np.int64]]]:
    """Per block of coordinates, one block at a time: the held values sorted ascending along
    axis 0 (unheld ones are NaN, which sorts last) and the number held per coordinate."""
    flat = [np.asarray(a).reshape(-1) for a in arrays]
    flat_masks = None if masks is None else [m.reshape(-1) for m in masks]
    for start in range(0, size, BLOCK):
        cols = slice(start, min(start + BLOCK, size))
        values = np.stack([f[cols] for f in flat]).astype(np.float64)
        if flat_masks is None:
            held = np.full(values.shape[1], len(flat), dtype=np.int64)
        else:
            holds = np.stack([m[cols] for m in flat_masks])
            values[~holds] = np.nan
            held = holds.sum(axis=0, dtype=np.int64)
        values.sort(axis=0)
        yield cols, values, held


def _finish(
    shape: tuple[int, ...],
    result: Float64Array,
    held: npt.NDArray[np.int64],
    fallback: npt.NDArray[np.floating] | None,
) -> FloatArray:
    if fallback is not None:
        nobody = held == 0
        result[nobody] = np.asarray(fallback, dtype=np.float64).reshape(-1)[nobody]
    out: FloatArray = result.reshape(shape).astype(np.float32)
    return out


def trimmed_mean(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray] | None = None,
    trim_fraction: float = 0.1,
    fallback: npt.NDArray[np.floating] | None = None,
) -> FloatArray:
    """Coordinate-wise trimmed mean over the arrays whose mask holds each coordinate.

    With ``k`` holders, ``t = floor(trim_fraction * k)`` values are dropped at each end and the
    other ``k - 2t >= 1`` averaged (the rule of ``scipy.stats.trim_mean``). ``masks`` None means
    every array holds every coordinate; with masks, ``fallback`` gives the value of coordinates
    nobody holds. ``trim_fraction`` in [0, 0.5). Returns float32.
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    shape = _check(arrays, masks, fallback)
    size = math.prod(shape)
    result = np.zeros(size, dtype=np.float64)
    held_all = np.zeros(size, dtype=np.int64)
    rank = np.arange(len(arrays), dtype=np.int64)[:, None]
    for cols, values, held in _blocks(arrays, masks, size):
        cut = np.floor(trim_fraction * held).astype(np.int64)
        keep = (rank >= cut) & (rank < held - cut)
        total = np.where(keep, values, 0.0).sum(axis=0)
        result[cols] = total / np.maximum(held - 2 * cut, 1)
        held_all[cols] = held
    return _finish(shape, result, held_all, fallback)


def coordinate_median(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray] | None = None,
    fallback: npt.NDArray[np.floating] | None = None,
) -> FloatArray:
    """Coordinate-wise median over the arrays whose mask holds each coordinate (for an even
    number of holders, the mean of the two middle values, as ``numpy.median``). ``masks`` and
    ``fallback`` as in ``trimmed_mean``. Returns float32."""
    shape = _check(arrays, masks, fallback)
    size = math.prod(shape)
    result = np.zeros(size, dtype=np.float64)
    held_all = np.zeros(size, dtype=np.int64)
    last = len(arrays) - 1
    for cols, values, held in _blocks(arrays, masks, size):
        # The middle of the k held values, which sort before the NaNs of the others.
        low = np.take_along_axis(values, (np.maximum(held - 1, 0) // 2)[None, :], axis=0)[0]
        high = np.take_along_axis(values, np.minimum(held // 2, last)[None, :], axis=0)[0]
        result[cols] = (low + high) / 2.0
        held_all[cols] = held
    return _finish(shape, result, held_all, fallback)


def combine(
    arrays: Sequence[npt.NDArray[np.floating]],
    masks: Sequence[BoolArray] | None,
    counts: Sequence[float],
    fallback: npt.NDArray[np.floating],
    *,
    method: Method,
    trim_fraction: float = 0.1,
) -> FloatArray:
    """One tensor's global value from the devices' values by a robust ``method``
    ("trimmed_mean" or "median"; "mean" is each strategy's own example-weighted mean, not
    computed here). ``counts`` are ignored (module docstring); ``fallback`` is used where no
    mask holds a coordinate."""
    del counts  # a device's example count is its own claim: robust statistics ignore it
    if method == "trimmed_mean":
        return trimmed_mean(arrays, masks, trim_fraction, fallback)
    if method == "median":
        return coordinate_median(arrays, masks, fallback)
    raise ValueError(f"no robust combination for method {method!r}; robust: trimmed_mean, median")

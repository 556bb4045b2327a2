"""Per-device density budgets: which density each device trains at (docs/heterogeneity.md).

A budget is a density (kept fraction of the pruned tensors) at most the global model's; the
device trains the nested subnetwork of the global mask at that density
(``device.sparse.nested``). This module only *chooses* the density; checking and aggregating
budgeted updates is ``fleet.strategies.nested``.

The run option ``budgets`` (``BudgetPolicy.parse``):

- ``none`` (default): every device trains the whole global mask (no budget is sent);
- ``auto``: from the device's reports, the largest density that fits both its memory
  (``memory_density``: the training footprint within ``memory_fraction`` of its
  ``Hardware.memory_bytes``) and its time (``time_density``: PruneFL's round-time model of its
  profile, ``T(d) = c0 + sum_l c_l * nnz_l(d)``, within ``deadline_fraction`` of the round
  timeout), never below ``min_fraction`` of the global density; a device that misses the
  deadline even at that floor gets the floor only if it predicts at least 10% less time than
  the global density (``TIME_GAIN``), else no budget (masked dense compute does not get
  faster with density, and shrinking it would then cost accuracy for nothing);
- ``{tag: density}``: a device carrying the tag (a registry tag selector: ``pi-zero-2w`` or
  ``class=pi4``) trains at that density (capped at the global one); the first matching tag in
  the mapping's order wins; others get the default.

A device that reports no profile, or absurd hardware (memory <= 0) or an absurd profile (a
negative, NaN or infinite time), gets the **default density** (the global one: no budget) and a
warning naming what was wrong; a device is never refused work because of its reports.
Budgets are rounded to float32, as the round command carries them, so both sides compute the
same nested subnetwork.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from device.errors import ConfigError
from device.sparse.nested import global_density, nested_count
from device.wire.messages import DeviceProfile, LocalTraining, ValueDType
from fleet.strategies.base import GlobalModel
from fleet.strategies.prunefl import device_cost

__all__ = [
    "BYTES_PER_DENSE_PARAM",
    "BYTES_PER_KEPT_PARAM",
    "RUNTIME_BYTES",
    "BudgetChoice",
    "BudgetPolicy",
    "as_f32",
    "memory_density",
    "profile_problem",
    "round_time",
    "time_density",
]

BYTES_PER_KEPT_PARAM = 20
"""Training bytes per kept weight of a pruned tensor: value, gradient, momentum (4 bytes each)
and its int64 position."""
BYTES_PER_DENSE_PARAM = 12
"""Training bytes per weight of a dense tensor: value, gradient, momentum."""
TIME_GAIN = 0.9
"""``auto`` gives a device that cannot meet the deadline at any budget the smallest budget only
when that predicts at most this fraction of its time at the global density."""
RUNTIME_BYTES = 160 * 2**20
"""What the agent's Python and torch runtime take before any model (measured on a Pi 4:
docs/arm64.md puts the agent's resident set at 150-170 MiB)."""


def as_f32(value: float) -> float:
    """``value`` as the float32 the round command carries (shortest decimal form)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class BudgetChoice:
    """A device's density for one round: ``density`` in (0, 1] (0.0: no budget, the whole
    global mask), what decided it (``by``: "none", "memory", "time", "tag", "default") and a
    warning when its reports could not be used."""

    density: float
    by: str
    warning: str = ""


@dataclass(frozen=True)
class BudgetPolicy:
    """The run's ``budgets`` option (module docstring). ``memory_fraction`` in (0, 1]: the share
    of a device's memory its training may use; ``deadline_fraction`` in (0, 1]: the share of the
    round timeout its job may take; ``min_fraction`` in (0, 1]: the smallest budget, as a
    fraction of the global density."""

    mode: Literal["none", "auto", "tags"] = "none"
    by_tag: Mapping[str, float] = field(default_factory=dict)
    memory_fraction: float = 0.5
    deadline_fraction: float = 0.8
    min_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("memory_fraction", "deadline_fraction", "min_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"budgets: {name} must be in (0, 1], got {value}")
        for tag, density in self.by_tag.items():
            if not isinstance(density, int | float) or not 0.0 < density <= 1.0:
                raise ConfigError(
                    f"budgets: the density of tag {tag!r} must be a kept fraction in (0, 1], "
                    f"got {density!r}"
                )

    @classmethod
    def parse(cls, value: Any) -> BudgetPolicy:
        """``"none"``, ``"auto"``, or a mapping ``{tag: density}``; ``ConfigError`` otherwise."""
        if value is None or value == "none":
            return cls()
        if value == "auto":
            return cls(mode="auto")
        if isinstance(value, BudgetPolicy):
            return value
        if isinstance(value, Mapping) and value:
            return cls(mode="tags", by_tag={str(k): v for k, v in value.items()})
        raise ConfigError(f"budgets: expected none, auto or {{tag: density}}, got {value!r}")

    def to_json(self) -> Any:
        """What ``parse`` reads back."""
        return dict(self.by_tag) if self.mode == "tags" else self.mode

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def for_tags(self, matches: Any, model: GlobalModel) -> BudgetChoice:
        """``tags`` mode: ``matches(selector) -> bool`` says whether the device carries a tag."""
        density = global_density(model.masks)
        for tag, budget in self.by_tag.items():
            if matches(tag):
                if budget >= density:
                    return BudgetChoice(0.0, "tag")
                return BudgetChoice(as_f32(budget), "tag")
        return BudgetChoice(0.0, "default")

    def auto(
        self,
        model: GlobalModel,
        *,
        memory_bytes: int,
        profile: DeviceProfile | None,
        num_examples: int,
        training: LocalTraining,
        round_timeout_s: float,
        upload_dtype: ValueDType = ValueDType.FP32,
    ) -> BudgetChoice:
        """``auto`` mode for one device (module docstring)."""
        if memory_bytes <= 0:
            return BudgetChoice(0.0, "default", f"absurd hardware: memory {memory_bytes} bytes")
        if profile is None:
            return BudgetChoice(0.0, "default", "no profile reported")
        problem = profile_problem(profile)
        if problem is not None:
            return BudgetChoice(0.0, "default", f"absurd profile: {problem}")
        density = global_density(model.masks)
        floor = density * self.min_fraction
        by_memory = memory_density(model, memory_bytes * self.memory_fraction)
        by_time = time_density(
            model,
            profile,
            num_examples,
            training,
            round_timeout_s * self.deadline_fraction,
            upload_dtype,
        )
        if by_time is None:
            return BudgetChoice(0.0, "default", "the profile lacks a pruned layer")
        if by_time < floor:
            # Not even the smallest budget fits the deadline: shrink only where it buys time
            # (masked dense compute does not get faster with density; then keep the model).
            timed = round_time(model, profile, num_examples, training, upload_dtype)
            assert timed is not None
            by_time = floor if timed(floor) <= TIME_GAIN * timed(density) else density
        chosen, by = (by_memory, "memory") if by_memory < by_time else (by_time, "time")
        chosen = max(chosen, floor)
        if chosen >= density:
            return BudgetChoice(0.0, by)
        return BudgetChoice(as_f32(chosen), by)


def profile_problem(profile: DeviceProfile) -> str | None:
    """What makes a profile unusable (a negative, NaN or infinite time), or None."""
    times = [profile.step_overhead_s]
    for layer in profile.layers:
        for point in layer.points:
            times.extend((point.dense_s, point.sparse_s))
    bad = [t for t in times if not math.isfinite(t) or t < 0]
    if bad:
        return f"{len(bad)} negative or non-finite times (e.g. {bad[0]})"
    if profile.batch_size < 0:
        return f"batch size {profile.batch_size}"
    return None


def _kept_at(model: GlobalModel, budget: float) -> dict[str, int]:
    density = global_density(model.masks)
    return {
        name: nested_count(int(np.count_nonzero(m)), budget, density)
        for name, m in model.masks.items()
    }


def _largest_fitting(model: GlobalModel, fits: Any) -> float:
    """The largest density in (0, global] with ``fits(kept counts)``, by bisection (monotone:
    a smaller budget keeps fewer weights in every layer); 0.0 when not even one weight per
    layer fits."""
    density = global_density(model.masks)
    if fits(_kept_at(model, density)):
        return density
    low, high = 0.0, density
    for _ in range(40):
        mid = (low + high) / 2
        if fits(_kept_at(model, mid)):
            low = mid
        else:
            high = mid
    return low


def memory_density(model: GlobalModel, usable_bytes: float) -> float:
    """The largest density whose training footprint fits in ``usable_bytes``: the runtime
    (``RUNTIME_BYTES``), the dense tensors (``BYTES_PER_DENSE_PARAM`` each) and the kept weights
    (``BYTES_PER_KEPT_PARAM`` each)."""
    dense = sum(w.size for n, w in model.weights.items() if n not in model.masks)
    fixed = RUNTIME_BYTES + BYTES_PER_DENSE_PARAM * dense
    return _largest_fitting(
        model, lambda kept: fixed + BYTES_PER_KEPT_PARAM * sum(kept.values()) <= usable_bytes
    )


def round_time(
    model: GlobalModel,
    profile: DeviceProfile,
    num_examples: int,
    training: LocalTraining,
    upload_dtype: ValueDType = ValueDType.FP32,
) -> Callable[[float], float] | None:
    """``T(density)``: this device's predicted round time in seconds at a budget (PruneFL's
    time model, ``fleet.strategies.prunefl.device_cost``); None when the profile lacks a
    pruned layer."""
    shapes = {name: tuple(w.shape) for name, w in model.weights.items()}
    cost = device_cost(
        profile, max(1, num_examples), shapes, list(model.masks), training, upload_dtype
    )
    if cost is None:
        return None

    def seconds(budget: float) -> float:
        kept = _kept_at(model, budget)
        return cost.c0 + sum(cost.per_param[n] * k for n, k in kept.items())

    return seconds


def time_density(
    model: GlobalModel,
    profile: DeviceProfile,
    num_examples: int,
    training: LocalTraining,
    seconds: float,
    upload_dtype: ValueDType = ValueDType.FP32,
) -> float | None:
    """The largest density whose predicted round time (``round_time``) fits in ``seconds``
    (0.0: none does); None when the profile lacks a pruned layer."""
    cost = device_cost(
        profile,
        max(1, num_examples),
        {name: tuple(w.shape) for name, w in model.weights.items()},
        list(model.masks),
        training,
        upload_dtype,
    )
    if cost is None:
        return None
    return _largest_fitting(
        model,
        lambda kept: cost.c0 + sum(cost.per_param[n] * k for n, k in kept.items()) <= seconds,
    )

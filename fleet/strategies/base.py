"""The strategy contract: what the runner hands a strategy and what it gets back.

A strategy only *configures* a round (which devices, which local settings, which algorithm flags)
and *aggregates* the devices' results into the next global model (Flower's Strategy split, DESIGN
section 10, example 1). The round loop, deadlines, transport, validation of the wire format and
checkpointing live in ``fleet.runtime.runner``, which knows nothing about the algorithm.

Everything is numpy, keyed by ``state_dict`` names: weights are float32, masks are bool and exist
only for pruned tensors (True = kept). "Density" is always the kept fraction.

Rounds are numbered from 1. The runner's cycle is::

    model = strategy.initialize(weights, model_name, prunable, rng)
    job = strategy.initial_job(model, candidates)            # PruneFL only; else None
    if job: model = strategy.on_initial_result(model, result_of(job))
    for r in 1, 2, ...:
        cfg = strategy.configure_round(r, model, candidates, rng, num_select=n)
        results = [...]                                       # each passed through check_result
        model = strategy.aggregate(r, model, results)         # version + 1
        checkpoint(model, strategy.state_dict())

Over-selection is the runner's business: a strategy knows ``clients_per_round`` (how many updates
a round aggregates, the papers' K) and selects exactly ``num_select`` devices when the runner asks
for more (``ceil(K * over_selection)``) so that k-of-n can close the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from device.errors import ConfigError, ValidationError
from device.wire.messages import (
    BoolArray,
    DeviceProfile,
    FloatArray,
    InitialPruneCommand,
    InitialPruneResult,
    LocalTraining,
    Readjust,
    RoundCommand,
    ValueDType,
)

__all__ = [
    "BoolArray",
    "Candidate",
    "ClientResult",
    "FloatArray",
    "GlobalModel",
    "InitialJob",
    "RoundConfig",
    "Strategy",
    "check_common_options",
    "check_result_tensors",
    "check_round",
    "check_state_keys",
    "initial_weights",
    "require_dense_or_full_masks",
    "require_masks_equal",
    "require_masks_keep_nnz",
    "select_uniform",
]


@dataclass(frozen=True, eq=False)
class GlobalModel:
    """A version of the global model.

    ``weights`` are dense float32 arrays of every ``state_dict`` entry; ``masks`` holds a bool
    array for each pruned tensor only (FedAvg: none). Invariants, checked on construction: every
    mask names a weight of the same shape, and ``weights[n][~masks[n]] == 0``. ``version`` grows
    by one with every aggregation (and with PruneFL's initial pruning).
    """

    version: int
    weights: Mapping[str, FloatArray]
    masks: Mapping[str, BoolArray]
    model_name: str

    def __post_init__(self) -> None:
        for name, w in self.weights.items():
            if not isinstance(w, np.ndarray) or w.dtype != np.float32:
                raise ValueError(f"global weight {name!r} must be a float32 ndarray")
        for name, m in self.masks.items():
            if name not in self.weights:
                raise ValueError(f"global mask {name!r} names no weight")
            if m.dtype != np.bool_ or m.shape != self.weights[name].shape:
                raise ValueError(
                    f"global mask {name!r} must be bool of shape {self.weights[name].shape}, "
                    f"got {m.dtype} {m.shape}"
                )
            if np.any(self.weights[name][~m]):
                raise ValueError(f"global weight {name!r} is non-zero outside its mask")

    def nnz(self) -> dict[str, int]:
        """Kept entries of each masked tensor."""
        return {name: int(np.count_nonzero(m)) for name, m in self.masks.items()}

    def density(self) -> float:
        """Kept fraction over all masked tensors, in [0, 1]; 1.0 when nothing is masked."""
        total = sum(m.size for m in self.masks.values())
        if total == 0:
            return 1.0
        return sum(self.nnz().values()) / total


@dataclass(frozen=True)
class Candidate:
    """What a strategy may know about a selectable device (a view of the registry's DeviceInfo).

    ``num_examples`` is the device's local dataset size (0 when unknown); ``profile`` is its
    measured speed from the birth message, if any (PruneFL uses it to pick the initial device).
    """

    device_id: str
    num_examples: int = 0
    profile: DeviceProfile | None = None


@dataclass(frozen=True, eq=False)
class ClientResult:
    """One device's result of a round, reconstructed by the runner from its ``DeviceUpdate``.

    ``weights`` are the device's trained weights for every tensor (the global weights the device
    trained from plus its deltas, on the device's final mask; zero outside it). ``masks`` are the
    device's final masks of the pruned tensors (a tensor without a global mask may be left out or
    given as all True). ``importance`` (PruneFL, only when the round asked for it) maps tensor
    names to summed squared gradients, pruned positions included. ``profile`` is the device's
    measured speed as the registry knows it; PruneFL's time model uses it (None: a FLOP model).
    ``num_examples`` >= 1 is the aggregation weight.
    """

    device_id: str
    num_examples: int
    weights: Mapping[str, FloatArray]
    masks: Mapping[str, BoolArray] = field(default_factory=dict)
    importance: Mapping[str, FloatArray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    profile: DeviceProfile | None = None


@dataclass(frozen=True)
class RoundConfig:
    """A strategy's decision for one round: who trains, how, and with which algorithm flags."""

    selected: tuple[str, ...]
    training: LocalTraining
    readjust: Readjust | None = None
    report_importance: bool = False
    upload_dtype: ValueDType = ValueDType.FP32
    download_values: ValueDType = ValueDType.FP32  # the precision of the model sent to devices

    def command(
        self,
        model_version: int,
        model_digest: bytes,
        *,
        deadline_unix_s: float = 0.0,
        partition: str = "",
    ) -> RoundCommand:
        """The round command each selected device receives (the runner adds digest and deadline)."""
        return RoundCommand(
            model_version=model_version,
            model_digest=model_digest,
            training=self.training,
            readjust=self.readjust,
            report_importance=self.report_importance,
            upload_dtype=self.upload_dtype,
            download_dtype=self.download_values,
            deadline_unix_s=deadline_unix_s,
            partition=partition,
        )


@dataclass(frozen=True)
class InitialJob:
    """PruneFL's initial pruning: which device runs it, on which model version, with which settings.

    The runner sends ``command(...)`` to ``device_id`` and hands the device's
    ``InitialPruneResult`` to ``strategy.on_initial_result``.
    """

    device_id: str
    model_version: int
    training: LocalTraining
    rounds_per_reconfig: int
    max_reconfigs: int
    stable_change: float
    stable_count: int
    cost_per_param_s: Mapping[str, float] = field(default_factory=dict)  # c_l, this device
    fixed_cost_s: float = 0.0  # c_0, this device
    protect_fraction: float = 0.3

    def command(
        self, model_digest: bytes, *, deadline_unix_s: float = 0.0, partition: str = ""
    ) -> InitialPruneCommand:
        return InitialPruneCommand(
            model_version=self.model_version,
            model_digest=model_digest,
            training=self.training,
            rounds_per_reconfig=self.rounds_per_reconfig,
            max_reconfigs=self.max_reconfigs,
            stable_change=self.stable_change,
            stable_count=self.stable_count,
            deadline_unix_s=deadline_unix_s,
            partition=partition,
            cost_per_param_s=dict(self.cost_per_param_s),
            fixed_cost_s=self.fixed_cost_s,
            protect_fraction=self.protect_fraction,
        )


@runtime_checkable
class Strategy(Protocol):
    """A federated algorithm's server side. Implementations: ``fleet.strategies.create_strategy``.

    Only ``aggregate``, ``on_initial_result`` and ``load_state_dict`` change the strategy's state;
    ``configure_round``, ``initial_job`` and ``check_result`` are free of side effects, so the
    runner may call them again after a restart.
    """

    name: str

    def initialize(
        self,
        weights: Mapping[str, FloatArray],
        model_name: str,
        prunable: Sequence[str],
        rng: np.random.Generator,
    ) -> GlobalModel:
        """The version-0 global model: ``weights`` (a fresh init) plus this algorithm's masks.

        ``prunable`` names the tensors that may be pruned (every conv and linear weight).
        """
        ...

    def initial_job(self, model: GlobalModel, candidates: Sequence[Candidate]) -> InitialJob | None:
        """Work to do before round 1 (PruneFL's initial pruning), or None."""
        ...

    def on_initial_result(self, model: GlobalModel, result: InitialPruneResult) -> GlobalModel:
        """The global model after the initial job's result (version + 1)."""
        ...

    def configure_round(
        self,
        round: int,
        model: GlobalModel,
        candidates: Sequence[Candidate],
        rng: np.random.Generator,
        *,
        num_select: int | None = None,
    ) -> RoundConfig:
        """Select ``num_select`` devices (default ``clients_per_round``) and set round flags."""
        ...

    def check_result(self, model: GlobalModel, result: ClientResult) -> None:
        """Raise ``ValidationError(reason=...)`` if ``result`` must not be aggregated."""
        ...

    def aggregate(
        self, round: int, model: GlobalModel, results: Sequence[ClientResult]
    ) -> GlobalModel:
        """The next global model (version + 1) from at least one checked result."""
        ...

    def state_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        """Server state a resumed run needs to continue identically (arrays only)."""
        ...

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None: ...


def select_uniform(
    candidates: Sequence[Candidate], count: int, rng: np.random.Generator
) -> tuple[str, ...]:
    """``min(count, len(candidates))`` distinct device ids drawn uniformly without replacement.

    Candidates are sorted by id before the draw, so the choice depends only on the set of
    candidates and the rng, not on the order the registry lists them in; the result is sorted.
    Raises ``ValueError`` for a negative count or duplicate ids (a runner bug, not user input).
    """
    if count < 0:
        raise ValueError(f"cannot select {count} devices")
    ids = sorted(c.device_id for c in candidates)
    if len(set(ids)) != len(ids):
        raise ValueError("candidates contain duplicate device ids")
    count = min(count, len(ids))
    if count == 0:
        return ()
    picked = rng.choice(len(ids), size=count, replace=False)
    return tuple(sorted(ids[int(i)] for i in picked))


def _reject(result: ClientResult, reason: str, what: str) -> ValidationError:
    return ValidationError(f"update from device {result.device_id!r}: {what}", reason=reason)


def check_result_tensors(model: GlobalModel, result: ClientResult) -> None:
    """Checks every strategy needs: names, shapes, dtypes, finite values, the result's own masks.

    Raises ``ValidationError`` with reason ``bad_num_examples``, ``missing_tensor``,
    ``unknown_tensor``, ``bad_shape``, ``bad_dtype``, ``non_finite``, ``missing_mask``,
    ``outside_mask`` (a value outside the result's own mask) or ``bad_importance``. The
    algorithm-specific mask rule is a separate check (``require_*`` below).
    """
    if not isinstance(result.num_examples, int) or result.num_examples < 1:
        raise _reject(
            result, "bad_num_examples", f"num_examples must be >= 1, got {result.num_examples!r}"
        )
    missing = set(model.weights) - set(result.weights)
    if missing:
        raise _reject(result, "missing_tensor", f"tensors missing: {sorted(missing)}")
    unknown = (set(result.weights) | set(result.masks)) - set(model.weights)
    if unknown:
        raise _reject(
            result, "unknown_tensor", f"tensors the model does not have: {sorted(unknown)}"
        )
    for name, ref in model.weights.items():
        w = result.weights[name]
        if not isinstance(w, np.ndarray) or w.shape != ref.shape:
            shape = getattr(w, "shape", None)
            raise _reject(
                result, "bad_shape", f"tensor {name!r} has shape {shape}, expected {ref.shape}"
            )
        if w.dtype != np.float32:
            raise _reject(result, "bad_dtype", f"tensor {name!r} is {w.dtype}, expected float32")
        if not np.all(np.isfinite(w)):
            raise _reject(result, "non_finite", f"tensor {name!r} has NaN or Inf values")
    for name in model.masks:
        if name not in result.masks:
            raise _reject(result, "missing_mask", f"no mask for pruned tensor {name!r}")
    for name, m in result.masks.items():
        ref = model.weights[name]
        if not isinstance(m, np.ndarray) or m.shape != ref.shape or m.dtype != np.bool_:
            raise _reject(result, "bad_shape", f"mask {name!r} must be bool of shape {ref.shape}")
        if np.any(result.weights[name][~m]):
            raise _reject(result, "outside_mask", f"tensor {name!r} has values outside its mask")
    for name, g in result.importance.items():
        if name not in model.weights:
            raise _reject(result, "bad_importance", f"importance for unknown tensor {name!r}")
        if not isinstance(g, np.ndarray) or g.shape != model.weights[name].shape:
            raise _reject(result, "bad_importance", f"importance of {name!r} has the wrong shape")
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise _reject(
                result, "bad_importance", f"importance of {name!r} must be finite and >= 0"
            )


def require_dense_or_full_masks(model: GlobalModel, result: ClientResult) -> None:
    """A tensor without a global mask may come back only dense (no mask, or an all-True one)."""
    for name, m in result.masks.items():
        if name not in model.masks and not np.all(m):
            raise _reject(result, "foreign_mask", f"tensor {name!r} is dense but came back pruned")


def require_masks_equal(model: GlobalModel, result: ClientResult) -> None:
    """FedAvg/FedAvgM/PruneFL rounds: the device trains exactly the global mask."""
    require_dense_or_full_masks(model, result)
    for name, g in model.masks.items():
        if not np.array_equal(result.masks[name], g):
            raise _reject(result, "foreign_mask", f"mask of {name!r} differs from the global mask")


def require_masks_keep_nnz(model: GlobalModel, result: ClientResult) -> None:
    """FedDST: a device may move its mask (readjustment) but keeps each layer's kept count."""
    require_dense_or_full_masks(model, result)
    for name, g in model.masks.items():
        have, want = int(np.count_nonzero(result.masks[name])), int(np.count_nonzero(g))
        if have != want:
            raise _reject(
                result,
                "mask_budget",
                f"mask of {name!r} keeps {have} entries, the budget is {want}",
            )


def check_common_options(
    strategy: str, clients_per_round: int, training: LocalTraining, upload_dtype: ValueDType
) -> None:
    """Option checks every strategy shares; ``ConfigError`` names the strategy and the option."""
    if clients_per_round < 1:
        raise ConfigError(f"{strategy}: clients_per_round must be >= 1, got {clients_per_round}")
    if not isinstance(training, LocalTraining):
        raise ConfigError(f"{strategy}: training must be LocalTraining, got {training!r}")
    if training.epochs < 1 or training.batch_size < 1:
        raise ConfigError(f"{strategy}: training needs epochs >= 1 and batch_size >= 1: {training}")
    if not training.lr > 0 or math.isinf(training.lr):
        raise ConfigError(f"{strategy}: training.lr must be a positive number, got {training.lr}")
    if training.max_steps < 0:
        raise ConfigError(f"{strategy}: training.max_steps must be >= 0, got {training.max_steps}")
    if not isinstance(upload_dtype, ValueDType):
        raise ConfigError(f"{strategy}: upload_dtype must be a ValueDType, got {upload_dtype!r}")


def initial_weights(
    weights: Mapping[str, npt.ArrayLike], prunable: Sequence[str], strategy: str
) -> dict[str, FloatArray]:
    """Float32 copies of a fresh initialisation; ``ConfigError`` if ``prunable`` names a stranger.

    Copies, so that the caller's arrays never alias the global model's.
    """
    out = {name: np.array(w, dtype=np.float32, copy=True) for name, w in weights.items()}
    if not out:
        raise ConfigError(f"{strategy}: the model has no weights")
    unknown = [name for name in prunable if name not in out]
    if unknown:
        raise ConfigError(f"{strategy}: prunable tensors {unknown} are not weights of the model")
    for name, w in out.items():
        if not np.all(np.isfinite(w)):
            raise ConfigError(f"{strategy}: initial weight {name!r} has NaN or Inf values")
    return out


def check_round(round: int) -> None:
    """Rounds are numbered from 1."""
    if round < 1:
        raise ValueError(f"rounds are numbered from 1, got {round}")


def check_state_keys(strategy: str, state: Mapping[str, object], expected: Sequence[str]) -> None:
    """``ConfigError`` when a checkpointed strategy state does not have exactly these keys."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"{strategy}: checkpointed state does not match this strategy "
            f"(missing {missing}, unexpected {extra}); was it written by another strategy "
            "or other options?"
        )

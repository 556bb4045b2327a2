"""FedAvg and FedAvgM: the dense baselines (DESIGN section 6; density 1.0, no masks).

FedAvg (McMahan et al. 2017): the new global model is the mean of the devices' trained weights,
weighted by their number of examples.

FedAvgM (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical data distribution for
federated visual classification"): the server treats ``delta = w_global - w_avg`` as a
pseudo-gradient and applies SGD with momentum to it: ``v <- beta * v + delta``,
``w <- w_global - server_lr * v``, with ``v`` starting at zero (so round 1 equals FedAvg). The
defaults are the paper's ``beta = 0.9`` and ``server_lr = 1.0``. The momentum buffers are the
strategy's state and are checkpointed through ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from device.errors import ConfigError
from device.wire.messages import InitialPruneResult, LocalTraining, ValueDType
from fleet.strategies.aggregate import apply_masks, momentum_step, weighted_mean
from fleet.strategies.base import (
    Candidate,
    ClientResult,
    FloatArray,
    GlobalModel,
    InitialJob,
    RoundConfig,
    check_common_options,
    check_result_tensors,
    check_round,
    check_state_keys,
    initial_weights,
    require_masks_equal,
    select_uniform,
)
from fleet.strategies.precision import resolve_precisions
from fleet.strategies.robust import RobustOptions, clip_results

__all__ = [
    "FedAvg",
    "FedAvgM",
    "FedAvgMOptions",
    "FedAvgOptions",
    "fedavg_weights",
    "robust_fedavg_weights",
]


@dataclass(frozen=True)
class FedAvgOptions:
    """FedAvg's settings.

    ``clients_per_round``: updates aggregated per round (the FedDST paper's MNIST setting: 20);
    ``training``: local SGD settings sent to devices; ``upload_values`` / ``download_values``:
    value precision per direction (``fleet.strategies.precision``; ``upload_dtype`` is the older
    name of ``upload_values``);
    ``robust``: clipping and trimmed mean / median (``fleet.strategies.robust``; a mapping of its
    fields is accepted, as configs give it; off by default).
    """

    clients_per_round: int = 20
    training: LocalTraining = field(default_factory=LocalTraining)
    upload_dtype: ValueDType = ValueDType.FP32  # the older name of upload_values
    upload_values: ValueDType | None = None  # fleet.strategies.precision
    download_values: ValueDType = ValueDType.FP32
    robust: RobustOptions = field(default_factory=RobustOptions)

    _strategy: ClassVar[str] = "fedavg"  # the name error messages use

    def __post_init__(self) -> None:
        name = self._strategy
        resolve_precisions(self, name)
        check_common_options(name, self.clients_per_round, self.training, self.upload_dtype)
        object.__setattr__(self, "robust", RobustOptions.coerce(self.robust, name))


@dataclass(frozen=True)
class FedAvgMOptions(FedAvgOptions):
    """FedAvg's options plus the server momentum ``beta`` in [0, 1) and ``server_lr`` > 0."""

    beta: float = 0.9
    server_lr: float = 1.0

    _strategy: ClassVar[str] = "fedavgm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"fedavgm: beta must be in [0, 1), got {self.beta}")
        if not 0.0 < self.server_lr < float("inf"):
            raise ConfigError(f"fedavgm: server_lr must be a positive number, got {self.server_lr}")


def fedavg_weights(model: GlobalModel, results: Sequence[ClientResult]) -> dict[str, FloatArray]:
    """The example-weighted mean of the results' weights, zero outside the global masks."""
    if not results:
        raise ValueError("aggregate needs at least one result")
    counts = [r.num_examples for r in results]
    mean = {
        name: weighted_mean([r.weights[name] for r in results], counts) for name in model.weights
    }
    return apply_masks(mean, model.masks)


def robust_fedavg_weights(
    model: GlobalModel, results: Sequence[ClientResult], robust: RobustOptions
) -> dict[str, FloatArray]:
    """``fedavg_weights`` after clipping each result, or the coordinate-wise trimmed mean or
    median instead of the mean (``fleet.strategies.robust``); exactly ``fedavg_weights`` when
    ``robust`` is off."""
    results = clip_results(model, results, robust.clip_norm)
    combiner = robust.combiner()
    if combiner is None:
        return fedavg_weights(model, results)
    counts = [r.num_examples for r in results]
    combined = {
        name: combiner([r.weights[name] for r in results], None, counts, g)
        for name, g in model.weights.items()
    }
    return apply_masks(combined, model.masks)


def _dense_round(
    options: FedAvgOptions,
    candidates: Sequence[Candidate],
    rng: np.random.Generator,
    num_select: int | None,
) -> RoundConfig:
    count = options.clients_per_round if num_select is None else num_select
    return RoundConfig(
        selected=select_uniform(candidates, count, rng),
        training=options.training,
        readjust=None,
        report_importance=False,
        upload_dtype=options.upload_dtype,
        download_values=options.download_values,
    )


def _no_initial_job(name: str) -> ValueError:
    return ValueError(f"{name} has no initial job, so it takes no initial result")


class FedAvg:
    """Example-weighted mean of the devices' weights; no masks, no server state."""

    name = "fedavg"

    def __init__(self, options: FedAvgOptions | None = None) -> None:
        self.options = options or FedAvgOptions()

    def initialize(
        self,
        weights: Mapping[str, npt.ArrayLike],
        model_name: str,
        prunable: Sequence[str],
        rng: np.random.Generator,
    ) -> GlobalModel:
        del rng  # nothing random: the model is dense
        return GlobalModel(0, initial_weights(weights, prunable, self.name), {}, model_name)

    def initial_job(self, model: GlobalModel, candidates: Sequence[Candidate]) -> InitialJob | None:
        return None

    def on_initial_result(self, model: GlobalModel, result: InitialPruneResult) -> GlobalModel:
        raise _no_initial_job(self.name)

    def configure_round(
        self,
        round: int,
        model: GlobalModel,
        candidates: Sequence[Candidate],
        rng: np.random.Generator,
        *,
        num_select: int | None = None,
    ) -> RoundConfig:
        check_round(round)
        return _dense_round(self.options, candidates, rng, num_select)

    def check_result(self, model: GlobalModel, result: ClientResult) -> None:
        check_result_tensors(model, result)
        require_masks_equal(model, result)

    def aggregate(
        self, round: int, model: GlobalModel, results: Sequence[ClientResult]
    ) -> GlobalModel:
        check_round(round)
        for r in results:
            self.check_result(model, r)
        weights = robust_fedavg_weights(model, results, self.options.robust)
        masks = {name: m.copy() for name, m in model.masks.items()}
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    def state_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        return {}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        check_state_keys(self.name, state, [])


class FedAvgM(FedAvg):
    """FedAvg with server momentum (module docstring). State: one momentum buffer per tensor.

    Rounds, selection and checks are FedAvg's; only aggregation and the server state differ.
    """

    name = "fedavgm"
    options: FedAvgMOptions

    def __init__(self, options: FedAvgMOptions | None = None) -> None:
        super().__init__(options or FedAvgMOptions())
        # Created at the first aggregation (zeros); keyed by tensor name.
        self._momentum: dict[str, FloatArray] = {}

    def initialize(
        self,
        weights: Mapping[str, npt.ArrayLike],
        model_name: str,
        prunable: Sequence[str],
        rng: np.random.Generator,
    ) -> GlobalModel:
        self._momentum = {}
        return super().initialize(weights, model_name, prunable, rng)

    def aggregate(
        self, round: int, model: GlobalModel, results: Sequence[ClientResult]
    ) -> GlobalModel:
        check_round(round)
        for r in results:
            self.check_result(model, r)
        average = robust_fedavg_weights(model, results, self.options.robust)
        weights: dict[str, FloatArray] = {}
        momentum: dict[str, FloatArray] = {}
        for name, g in model.weights.items():
            v = self._momentum.get(name)
            if v is None:
                v = np.zeros(g.shape, dtype=np.float32)
            weights[name], momentum[name] = momentum_step(
                g, average[name], v, self.options.beta, self.options.server_lr
            )
        # Commit only once every tensor is done, so a failure leaves the state as it was.
        self._momentum = momentum
        weights = apply_masks(weights, model.masks)
        masks = {name: m.copy() for name, m in model.masks.items()}
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    def state_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        """``momentum/<tensor>`` float32 buffers (empty before the first aggregation)."""
        return {f"momentum/{name}": v.copy() for name, v in self._momentum.items()}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        momentum: dict[str, FloatArray] = {}
        for key, value in state.items():
            prefix, _, name = key.partition("/")
            if prefix != "momentum" or not name:
                check_state_keys(self.name, state, [k for k in state if k.startswith("momentum/")])
            momentum[name] = np.array(value, dtype=np.float32, copy=True)
        self._momentum = momentum

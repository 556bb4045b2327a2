"""PruneFL's server side (Jiang et al., TNNLS 2022), as DESIGN section 6 decides it.

- Initial pruning: before round 1 one device (``initial_device``, else the candidate with the
  largest dataset, or the fastest profile) trains the dense model on its own data and prunes it
  (``device.prune_init``); its weights and masks become global model version 1.
- Adaptive pruning: every ``reconfig_every`` rounds (default 50) the round asks the devices to
  report importance (summed squared gradients, pruned positions included). ``aggregate`` averages
  the weights on the current mask (FedAvg), sums the importance over the devices and calls
  ``device.sparse.prunefl.reconfigure``: per layer the ``1 - d`` largest active weights are
  protected, then parameters are added greedily by ``g_j^2 / c_l`` while that beats the current
  ``sum g^2 / T`` with ``T = c_0 + sum_l c_l nnz_l``. ``d = protect_fraction * 0.5 **
  (round / d_half_life)`` (the reference code's 0.3 and half-life, counted in rounds). A
  reconfiguration that got no importance (every device failed) is asked for again next round.
- Newly added parameters start at zero: they were outside the mask, where the global model is
  zero (the paper's pruned weights are zero; the reference code happens to keep a pruned weight's
  last value on the server and restores it, which this design's sparse global model cannot).
- Between reconfigurations aggregation is FedAvg on the mask; devices must train exactly the
  global mask.

The time model (``CostModel``): per device, from its profile, ``steps`` local SGD steps per round
(``epochs * ceil(examples / batch)``, capped by ``max_steps``) and its links, with profiled
minibatch times scaled by ``training batch / profiled batch``:

- ``c_l = steps * s_l + value_bytes / uplink + 4 / downlink`` seconds per kept parameter of
  layer l, where ``s_l`` is the slope of a least-squares line through the layer's profiled
  minibatch times ``device.sparse.kernels.layer_cost(profile, l, density)`` (the kernel the
  device would pick) at the profiled densities against kept parameters (PruneFL fits its
  coefficients the same way); the slope is 0 when compute does not shrink with density (masked
  dense), and then only communication makes a parameter cost anything;
- ``c_0 = steps * (step_overhead_s + sum_l intercept_l)`` plus the transfer of the dense tensors.

The model averages ``c_l`` and ``c_0`` over the round's devices that have a profile. With no
profile at all it falls back to a FLOP model: ``6 * batch * uses_l`` FLOPs per kept parameter per
step (forward 2, backward 4 per multiply-add; ``uses_l`` is how often a weight is applied per
example, 1 for linear layers, the output positions for a convolution, given by
``fallback_uses_per_param``, default 1) at ``fallback_flops_per_s``, and
``c_0 = fallback_overhead_fraction`` times the dense model's compute (0.15 by default; the
reference's FEMNIST configuration has a fixed time of about 0.14 times the per-parameter time of
the dense Conv2).
Every ``c_l`` is at least ``MIN_COST_PER_PARAM`` so that the greedy ratio is defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from device.errors import ConfigError, NotFoundError, ValidationError
from device.sparse.kernels import layer_cost
from device.sparse.prunefl import reconfigure
from device.wire.messages import (
    DeviceProfile,
    FloatArray,
    InitialPruneResult,
    LocalTraining,
    ValueDType,
)
from fleet.strategies.aggregate import apply_masks, sum_arrays
from fleet.strategies.base import (
    BoolArray,
    Candidate,
    ClientResult,
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
from fleet.strategies.fedavg import fedavg_weights
from fleet.strategies.precision import resolve_precisions

__all__ = [
    "MIN_COST_PER_PARAM",
    "CostModel",
    "PruneFL",
    "PruneFLOptions",
    "cost_model",
    "device_cost",
    "flop_cost",
    "local_steps",
]

#: Floor of ``c_l`` (seconds per kept parameter per round): keeps ``g^2 / c_l`` finite when a
#: layer's profile shows no saving from sparsity and no link speed is known.
MIN_COST_PER_PARAM = 1e-12

#: Bytes per value on the wire, by upload encoding (int4 packs two values per byte).
VALUE_BYTES: dict[ValueDType, float] = {
    ValueDType.FP32: 4.0,
    ValueDType.FP16: 2.0,
    ValueDType.BF16: 2.0,
    ValueDType.INT8: 1.0,
    ValueDType.INT4: 0.5,
}

#: The global model travels down as float32 values.
DOWNLOAD_VALUE_BYTES = 4.0


@dataclass(frozen=True)
class CostModel:
    """PruneFL's round-time model ``T = c0 + sum_l per_param[l] * nnz_l`` (seconds per round).

    ``per_param`` covers the pruned tensors; ``c0`` >= 0 includes everything that does not depend
    on their kept counts (per-step overhead, dense tensors).
    """

    c0: float
    per_param: Mapping[str, float]

    def time(self, model: GlobalModel) -> float:
        """T of ``model``: a tensor without a mask counts as dense (so FedAvg's model works too)."""
        total = self.c0
        for name, c in self.per_param.items():
            mask = model.masks.get(name)
            nnz = int(np.count_nonzero(mask)) if mask is not None else model.weights[name].size
            total += c * nnz
        return total


def local_steps(num_examples: int, training: LocalTraining) -> int:
    """Local SGD steps of a round: ``epochs * ceil(examples / batch)``, capped by ``max_steps``."""
    steps = training.epochs * max(1, math.ceil(num_examples / training.batch_size))
    if training.max_steps > 0:
        steps = min(steps, training.max_steps)
    return steps


def _line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``y ~ x``, both clamped to >= 0.

    One distinct x: the line through the origin (the average cost per parameter).
    """
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if np.unique(x).size < 2:
        slope = float(y.mean() / x.mean()) if x.mean() > 0 else 0.0
        return max(slope, 0.0), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(float(slope), 0.0)
    # Refit the intercept for the clamped slope so the line still passes through the mean.
    intercept = float(y.mean() - slope * x.mean())
    return slope, max(intercept, 0.0)


def device_cost(
    profile: DeviceProfile,
    num_examples: int,
    shapes: Mapping[str, tuple[int, ...]],
    pruned: Sequence[str],
    training: LocalTraining,
    upload_dtype: ValueDType,
) -> CostModel | None:
    """One device's cost model from its profile (module docstring); None if the profile lacks a
    pruned layer (the caller then ignores this device)."""
    layers = {layer.name: layer for layer in profile.layers}
    if any(name not in layers or not layers[name].points for name in pruned):
        return None
    steps = local_steps(num_examples, training)
    # A profile times minibatches of its own size; compute scales with the batch.
    batch_scale = training.batch_size / profile.batch_size if profile.batch_size > 0 else 1.0
    comm = 0.0
    if profile.uplink_bytes_per_s > 0:
        comm += VALUE_BYTES[upload_dtype] / profile.uplink_bytes_per_s
    if profile.downlink_bytes_per_s > 0:
        comm += DOWNLOAD_VALUE_BYTES / profile.downlink_bytes_per_s
    per_param: dict[str, float] = {}
    fixed = profile.step_overhead_s
    for name in pruned:
        numel = math.prod(shapes[name])
        densities = sorted({p.density for p in layers[name].points})
        xs = [d * numel for d in densities]
        ys = [layer_cost(profile, name, d) for d in densities]
        slope, intercept = _line_fit(xs, ys)
        per_param[name] = max(steps * batch_scale * slope + comm, MIN_COST_PER_PARAM)
        fixed += intercept
    dense_values = sum(math.prod(s) for n, s in shapes.items() if n not in per_param)
    return CostModel(c0=steps * batch_scale * fixed + comm * dense_values, per_param=per_param)


def flop_cost(
    num_examples: float,
    shapes: Mapping[str, tuple[int, ...]],
    pruned: Sequence[str],
    training: LocalTraining,
    *,
    flops_per_s: float,
    overhead_fraction: float,
    uses_per_param: Mapping[str, float],
) -> CostModel:
    """The FLOP fallback cost model for a device with ``num_examples`` (module docstring)."""
    steps = local_steps(max(1, round(num_examples)), training)
    per_param = {
        name: max(
            steps * 6.0 * training.batch_size * uses_per_param.get(name, 1.0) / flops_per_s,
            MIN_COST_PER_PARAM,
        )
        for name in pruned
    }
    dense_time = sum(c * math.prod(shapes[n]) for n, c in per_param.items())
    return CostModel(c0=overhead_fraction * dense_time, per_param=per_param)


@dataclass(frozen=True)
class PruneFLOptions:
    """PruneFL's settings (DESIGN section 6; the reference code's values where the paper is silent).

    ``initial_pruning``: run the initial pruning job before round 1. ``initial_device``: the device
    that runs it (else chosen by ``initial_select``: "largest_dataset" or "fastest" profile).
    ``rounds_per_reconfig``, ``max_reconfigs``, ``stable_change``, ``stable_count``: the initial
    pruning's stopping rule (relative density change <= 10% for 5 reconfigurations in a row).
    ``reconfig_every``: delta-R in rounds (0 disables adaptive pruning). ``protect_fraction``: d in
    [0, 1], the share of each layer's active weights a reconfiguration may remove;
    ``d_half_life``: rounds after which d has halved (inf: constant). ``fallback_*``: the FLOP
    model used when no device has a profile (module docstring).
    """

    clients_per_round: int = 20
    training: LocalTraining = field(default_factory=LocalTraining)
    upload_dtype: ValueDType = ValueDType.FP32  # the older name of upload_values
    upload_values: ValueDType | None = None  # fleet.strategies.precision
    download_values: ValueDType = ValueDType.FP32
    initial_pruning: bool = True
    initial_device: str | None = None
    initial_select: Literal["largest_dataset", "fastest"] = "largest_dataset"
    rounds_per_reconfig: int = 5
    max_reconfigs: int = 20
    stable_change: float = 0.1
    stable_count: int = 5
    reconfig_every: int = 50
    protect_fraction: float = 0.3
    d_half_life: float = 10000.0
    fallback_flops_per_s: float = 1e9
    fallback_overhead_fraction: float = 0.15
    fallback_uses_per_param: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        resolve_precisions(self, "prunefl")
        check_common_options("prunefl", self.clients_per_round, self.training, self.upload_dtype)
        checks = [
            (
                self.initial_select in ("largest_dataset", "fastest"),
                f"initial_select must be largest_dataset or fastest, got {self.initial_select!r}",
            ),
            (self.rounds_per_reconfig >= 1, "rounds_per_reconfig must be >= 1"),
            (self.max_reconfigs >= 1, "max_reconfigs must be >= 1"),
            (self.stable_change >= 0, "stable_change must be >= 0"),
            (self.stable_count >= 1, "stable_count must be >= 1"),
            (self.reconfig_every >= 0, "reconfig_every must be >= 0 (0 = never)"),
            (0.0 <= self.protect_fraction <= 1.0, "protect_fraction (d) must be in [0, 1]"),
            (self.d_half_life > 0, "d_half_life must be > 0 rounds (inf = no decay)"),
            (
                0 < self.fallback_flops_per_s < math.inf,
                "fallback_flops_per_s must be a positive number",
            ),
            (
                0 <= self.fallback_overhead_fraction < math.inf,
                "fallback_overhead_fraction must be >= 0",
            ),
            (
                all(v > 0 for v in self.fallback_uses_per_param.values()),
                "fallback_uses_per_param values must be > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"prunefl: {message}")


def require_importance_complete(
    model: GlobalModel, device_id: str, importance: Mapping[str, FloatArray]
) -> None:
    """Importance, when a device sends any, must cover every pruned tensor of ``model``."""
    if importance:
        missing = sorted(set(model.masks) - set(importance))
        if missing:
            raise ValidationError(
                f"update from device {device_id!r}: importance missing for {missing}",
                reason="bad_importance",
            )


class PruneFL:
    """PruneFL (module docstring).

    State: whether the initial pruning is done, the round of the last reconfiguration, how many
    ran, and the latest cost model (the one ``time_model`` uses).
    """

    name = "prunefl"

    def __init__(self, options: PruneFLOptions | None = None) -> None:
        self.options = options or PruneFLOptions()
        self._initial_done = not self.options.initial_pruning
        self._last_reconfig_round = 0
        self._reconfigs = 0
        self._cost: CostModel | None = None

    # -- set-up ------------------------------------------------------------------------------

    def initialize(
        self,
        weights: Mapping[str, npt.ArrayLike],
        model_name: str,
        prunable: Sequence[str],
        rng: np.random.Generator,
    ) -> GlobalModel:
        """Version 0: the dense model with all-True masks on ``prunable`` (pruning starts later)."""
        del rng  # nothing random: the initial device prunes
        w = initial_weights(weights, prunable, self.name)
        if not prunable:
            raise ConfigError("prunefl: needs at least one prunable tensor")
        masks = {name: np.ones(w[name].shape, dtype=np.bool_) for name in prunable}
        self._initial_done = not self.options.initial_pruning
        self._last_reconfig_round = 0
        self._reconfigs = 0
        model = GlobalModel(0, w, masks, model_name)
        self._cost = self._fallback_cost(model, self.options.training.batch_size)
        return model

    def initial_job(self, model: GlobalModel, candidates: Sequence[Candidate]) -> InitialJob | None:
        """The initial pruning job, until its result is in; None when done or disabled.

        Raises ``NotFoundError`` when the configured device is not a candidate, or there is none.
        """
        if self._initial_done:
            return None
        device = self._initial_device(candidates)
        o = self.options
        chosen = next((c for c in candidates if c.device_id == device), None)
        cost = cost_model(
            [(chosen.profile if chosen else None, max(1, chosen.num_examples if chosen else 1))],
            {n: w.shape for n, w in model.weights.items()},
            list(model.masks),
            o,
        )
        return InitialJob(
            device_id=device,
            model_version=model.version,
            training=o.training,
            rounds_per_reconfig=o.rounds_per_reconfig,
            max_reconfigs=o.max_reconfigs,
            stable_change=o.stable_change,
            stable_count=o.stable_count,
            cost_per_param_s=dict(cost.per_param),
            fixed_cost_s=cost.c0,
            protect_fraction=o.protect_fraction,
        )

    def _initial_device(self, candidates: Sequence[Candidate]) -> str:
        ids = {c.device_id for c in candidates}
        if self.options.initial_device is not None:
            if self.options.initial_device not in ids:
                raise NotFoundError(
                    f"prunefl: initial pruning device {self.options.initial_device!r} is not "
                    f"among the {len(ids)} candidate devices"
                )
            return self.options.initial_device
        if not candidates:
            raise NotFoundError("prunefl: no candidate device for the initial pruning")
        if self.options.initial_select == "largest_dataset":
            best = min(candidates, key=lambda c: (-c.num_examples, c.device_id))
        else:
            best = min(candidates, key=lambda c: (*_step_time_key(c), c.device_id))
        return best.device_id

    def on_initial_result(self, model: GlobalModel, result: InitialPruneResult) -> GlobalModel:
        """Version + 1 from the initial device's weights and masks (validated like an update)."""
        if self._initial_done:
            raise ValidationError(
                "prunefl: initial pruning result already applied", reason="duplicate"
            )
        snap = result.model
        if snap.model_name != model.model_name:
            raise ValidationError(
                f"prunefl: initial pruning returned model {snap.model_name!r}, "
                f"expected {model.model_name!r}",
                reason="wrong_model",
            )
        as_result = ClientResult(
            device_id="<initial pruning>",
            num_examples=1,
            weights={n: np.asarray(w) for n, w in snap.weights.items()},
            masks={n: np.asarray(m) for n, m in snap.masks.items()},
        )
        check_result_tensors(model, as_result)
        if set(snap.masks) != set(model.masks):
            raise ValidationError(
                f"prunefl: initial pruning masks {sorted(snap.masks)} are not the pruned "
                f"tensors {sorted(model.masks)}",
                reason="foreign_mask",
            )
        weights = {
            n: np.array(w, dtype=np.float32, copy=True) for n, w in as_result.weights.items()
        }
        masks = {n: np.array(m, dtype=np.bool_, copy=True) for n, m in as_result.masks.items()}
        self._initial_done = True
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    # -- rounds ------------------------------------------------------------------------------

    def reconfiguration_due(self, round: int) -> bool:
        """Whether round ``round`` reports importance and reconfigures the masks."""
        every = self.options.reconfig_every
        return every > 0 and round - self._last_reconfig_round >= every

    def protect_d(self, round: int) -> float:
        """PruneFL's d at ``round``: ``protect_fraction * 0.5 ** (round / d_half_life)``."""
        decay: float = 0.5 ** (round / self.options.d_half_life)
        return self.options.protect_fraction * decay

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
        count = self.options.clients_per_round if num_select is None else num_select
        return RoundConfig(
            selected=select_uniform(candidates, count, rng),
            training=self.options.training,
            readjust=None,
            report_importance=self.reconfiguration_due(round),
            upload_dtype=self.options.upload_dtype,
            download_values=self.options.download_values,
        )

    def check_result(self, model: GlobalModel, result: ClientResult) -> None:
        """Common checks; the mask must be the global one; importance, when given, must cover
        every pruned tensor."""
        check_result_tensors(model, result)
        require_masks_equal(model, result)
        require_importance_complete(model, result.device_id, result.importance)

    def aggregate(
        self, round: int, model: GlobalModel, results: Sequence[ClientResult]
    ) -> GlobalModel:
        """FedAvg on the mask; on a due round with importance, reconfigure the masks."""
        check_round(round)
        for r in results:
            self.check_result(model, r)
        weights = fedavg_weights(model, results)
        cost = self.cost_model(model, results)
        masks: dict[str, BoolArray] = {n: m.copy() for n, m in model.masks.items()}
        reporters = [r for r in results if r.importance]
        reconfigured = False
        if self.reconfiguration_due(round) and reporters:
            importance = {n: sum_arrays([r.importance[n] for r in reporters]) for n in model.masks}
            masks = reconfigure(
                importance,
                weights,
                model.masks,
                cost.per_param,
                cost.c0,
                self.protect_d(round),
            )
            weights = apply_masks(weights, masks)
            reconfigured = True
        # State changes only after everything above succeeded.
        self._cost = cost
        if reconfigured:
            self._last_reconfig_round = round
            self._reconfigs += 1
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    # -- time model --------------------------------------------------------------------------

    def cost_model(self, model: GlobalModel, results: Sequence[ClientResult]) -> CostModel:
        """The round's cost model from the results' profiles and example counts."""
        return cost_model(
            [(r.profile, r.num_examples) for r in results],
            {n: w.shape for n, w in model.weights.items()},
            list(model.masks),
            self.options,
        )

    def _fallback_cost(self, model: GlobalModel, num_examples: float) -> CostModel:
        return cost_model(
            [(None, max(1, round(num_examples)))],
            {n: w.shape for n, w in model.weights.items()},
            list(model.masks),
            self.options,
        )

    @property
    def cost(self) -> CostModel | None:
        """The cost model of the last aggregated round (the FLOP fallback before round 1)."""
        return self._cost

    def time_model(self, model: GlobalModel) -> float:
        """T of ``model`` in seconds per round under the latest cost model (``CostModel.time``)."""
        if self._cost is None:
            raise ValueError("prunefl: no cost model yet; call initialize() first")
        return self._cost.time(model)

    @property
    def reconfigurations(self) -> int:
        """Reconfigurations done by ``aggregate`` so far (initial pruning not counted)."""
        return self._reconfigs

    # -- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, npt.NDArray[np.generic]]:
        """``initial_done``, ``last_reconfig_round``, ``reconfigs`` (int64 scalars) and the cost
        model as ``cost/c0`` and ``cost/param/<tensor>`` (float64 scalars)."""
        state: dict[str, npt.NDArray[np.generic]] = {
            "initial_done": np.array(int(self._initial_done), dtype=np.int64),
            "last_reconfig_round": np.array(self._last_reconfig_round, dtype=np.int64),
            "reconfigs": np.array(self._reconfigs, dtype=np.int64),
        }
        if self._cost is not None:
            state["cost/c0"] = np.array(self._cost.c0, dtype=np.float64)
            for name, c in self._cost.per_param.items():
                state[f"cost/param/{name}"] = np.array(c, dtype=np.float64)
        return state

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.generic]]) -> None:
        fixed = ["initial_done", "last_reconfig_round", "reconfigs"]
        costs = [k for k in state if k.startswith("cost/param/")]
        cost_keys = ["cost/c0", *costs] if "cost/c0" in state or costs else []
        check_state_keys(self.name, state, [*fixed, *cost_keys])
        for key, value in state.items():
            if np.shape(value) != ():
                raise ConfigError(f"prunefl: checkpointed {key!r} must be a scalar")
        self._initial_done = bool(int(state["initial_done"]))
        self._last_reconfig_round = int(state["last_reconfig_round"])
        self._reconfigs = int(state["reconfigs"])
        self._cost = None
        if cost_keys:
            self._cost = CostModel(
                c0=float(state["cost/c0"]),
                per_param={k.removeprefix("cost/param/"): float(state[k]) for k in costs},
            )


def _step_time_key(candidate: Candidate) -> tuple[int, float]:
    """Sort key for "fastest": devices with a profile first, by dense minibatch time."""
    p = candidate.profile
    if p is None or not p.layers:
        return (1, 0.0)
    return (0, p.step_overhead_s + sum(layer_cost(p, layer.name, 1.0) for layer in p.layers))


def cost_model(
    entries: Sequence[tuple[DeviceProfile | None, int]],
    shapes: Mapping[str, tuple[int, ...]],
    pruned: Sequence[str],
    options: PruneFLOptions,
) -> CostModel:
    """The mean of the per-device cost models of ``entries`` (profile, examples).

    Devices whose profile covers every pruned layer are averaged; when there is none, the FLOP
    fallback for the mean example count is used (module docstring).
    """
    if not entries:
        raise ValueError("a cost model needs at least one device")
    models = [
        m
        for profile, n in entries
        if profile is not None
        and (m := device_cost(profile, n, shapes, pruned, options.training, options.upload_dtype))
        is not None
    ]
    if not models:
        return flop_cost(
            float(np.mean([n for _, n in entries])),
            shapes,
            pruned,
            options.training,
            flops_per_s=options.fallback_flops_per_s,
            overhead_fraction=options.fallback_overhead_fraction,
            uses_per_param=options.fallback_uses_per_param,
        )
    return CostModel(
        c0=float(np.mean([m.c0 for m in models])),
        per_param={n: float(np.mean([m.per_param[n] for m in models])) for n in pruned},
    )

"""Validation of device updates before anything touches the aggregate.

A device's message is untrusted input. ``check_update`` turns a decoded update envelope into a
``ClientResult`` (weights reconstructed against the global model the device trained from) or
raises ``ValidationError`` with a short ``reason`` code that is logged and counted per device.
Nothing here mutates the global model.

``check_sparse`` is the same validation for the sharded aggregator's hot path: it performs every
check of ``reconstruct`` followed by ``strategy.check_result`` -- same rules, same reasons, same
order -- on the device's mask instead of on dense copies, and returns a ``SparseResult`` that
``Accumulator.add_sparse`` sums without densifying. Checks that hold by construction of the
dense result (zeros outside the mask, float32, the model's shapes and names) are not repeated;
the others become cheaper forms of the same test (a mask sharing the global mask's memory *is*
the global mask; ``values.size == mask.size`` *is* ``mask.all()`` for a ``SparseTensor``).
Strategies whose ``check_result`` it does not know get the dense check, so nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from device.errors import ValidationError
from device.wire.messages import BoolArray, DeviceUpdate, Envelope, FloatArray
from fleet.strategies.base import ClientResult, GlobalModel, Strategy
from fleet.strategies.fedavg import FedAvg
from fleet.strategies.feddst import FedDST
from fleet.strategies.prunefl import PruneFL, require_importance_complete

IndexArray = npt.NDArray[np.intp]

MAX_EXAMPLES = 10**9  # no device has more examples than this; larger counts are bogus weights


@dataclass(frozen=True)
class Expectation:
    """What an update for the current round must look like."""

    run_id: str
    round: int
    selected: Collection[str]
    model: GlobalModel
    model_digest: bytes


def check_routing(
    env: Envelope, topic_device: str, topic_run: str, topic_round: int, exp: Expectation
) -> DeviceUpdate:
    """Check who the update claims to be from and which round it belongs to."""
    body = env.body
    if not isinstance(body, DeviceUpdate):
        raise ValidationError(
            f"expected a DeviceUpdate on an update topic, got {type(body).__name__}",
            reason="wrong_kind",
        )
    if env.device_id != topic_device:
        raise ValidationError(
            f"payload device id {env.device_id!r} is not the topic's {topic_device!r}",
            reason="device_mismatch",
        )
    if env.run_id != topic_run or env.round != topic_round:
        raise ValidationError(
            f"payload run/round {env.run_id}/{env.round} does not match the topic's "
            f"{topic_run}/{topic_round}",
            reason="topic_mismatch",
        )
    if env.run_id != exp.run_id:
        raise ValidationError(
            f"update for run {env.run_id!r}, not {exp.run_id!r}", reason="other_run"
        )
    if env.round < exp.round:
        raise ValidationError(
            f"update for round {env.round}, current is {exp.round}", reason="stale_round"
        )
    if env.round > exp.round:
        raise ValidationError(
            f"update for future round {env.round}, current is {exp.round}", reason="future_round"
        )
    if topic_device not in exp.selected:
        raise ValidationError(
            f"device {topic_device!r} was not selected for round {exp.round}", reason="not_selected"
        )
    return body


def _check_header(update: DeviceUpdate, model: GlobalModel, model_digest: bytes) -> None:
    """The checks before any tensor is looked at: the model the device trained from, its
    example count, and the set of tensor names (``reconstruct`` and ``check_sparse`` share them,
    in this order, so both give the same reason for the same update)."""
    if update.model_version != model.version or update.model_digest != model_digest:
        raise ValidationError(
            f"trained from model version {update.model_version}, current is {model.version}",
            reason="wrong_model_version",
        )
    if not 1 <= update.num_examples <= MAX_EXAMPLES:
        raise ValidationError(
            f"num_examples {update.num_examples} out of range", reason="bad_num_examples"
        )
    names, expected = set(update.deltas), set(model.weights)
    if names != expected:
        raise ValidationError(
            f"tensor names differ from the model: missing {sorted(expected - names)[:5]}, "
            f"unknown {sorted(names - expected)[:5]}",
            reason="wrong_tensors",
        )


def _checked_importance(update: DeviceUpdate, model: GlobalModel) -> dict[str, FloatArray]:
    """The update's PruneFL importance, each a finite non-negative array shaped like the pruned
    tensor it names (shared by ``reconstruct`` and ``check_sparse``)."""
    importance: dict[str, FloatArray] = {}
    for name, value in update.importance.items():
        if name not in model.masks:
            raise ValidationError(
                f"importance for {name!r}, which is not pruned", reason="wrong_tensors"
            )
        if value.shape != model.weights[name].shape:
            raise ValidationError(f"importance {name}: shape {value.shape}", reason="wrong_shape")
        if not np.isfinite(value).all() or (value < 0).any():
            raise ValidationError(f"importance {name}: negative, NaN or Inf", reason="non_finite")
        importance[name] = value
    return importance


def reconstruct(
    update: DeviceUpdate, model: GlobalModel, *, device_id: str, model_digest: bytes
) -> ClientResult:
    """Weights the device trained to: ``global + delta`` on the device's mask, zero elsewhere.

    Raises ``ValidationError`` for a model version or digest mismatch, missing or unknown tensor
    names, wrong shapes, a partial mask on a dense tensor, non-finite values, or a bogus
    example count.
    """
    _check_header(update, model, model_digest)
    weights: dict[str, FloatArray] = {}
    masks = {}
    for name, delta in update.deltas.items():
        base = model.weights[name]
        if delta.shape != base.shape:
            raise ValidationError(
                f"{name}: shape {delta.shape}, model has {base.shape}", reason="wrong_shape"
            )
        if not np.isfinite(delta.values).all():
            raise ValidationError(f"{name}: NaN or Inf in the delta", reason="non_finite")
        if name in model.masks:
            masks[name] = delta.mask
        elif not delta.mask.all():
            raise ValidationError(
                f"{name}: dense tensor sent with a partial mask", reason="mask_on_dense"
            )
        out = np.zeros(base.shape, dtype=np.float32)
        out[delta.mask] = base[delta.mask] + delta.values
        weights[name] = out
    importance = _checked_importance(update, model)
    return ClientResult(
        device_id=device_id,
        num_examples=int(update.num_examples),
        weights=weights,
        masks=masks,
        importance=importance,
        metrics=dict(update.metrics),
    )


# -- the same validation on the sparse representation ------------------------------------------


@dataclass(frozen=True)
class SparseResult:
    """A validated update on the device's masks: ``reconstruct``'s result without the zeros.

    Per tensor name: ``index`` the flat (row-major) coordinates the device holds, increasing
    (``None``: every coordinate, tensors without a global mask); ``values`` the trained weights
    there (global + delta, float32). ``on_global_mask`` names the pruned tensors whose mask was
    verified to be the global mask (then ``index`` equals the global mask's coordinates).
    ``masks``, ``importance``, ``metrics`` and ``num_examples`` are ``ClientResult``'s.
    """

    device_id: str
    num_examples: int
    index: Mapping[str, IndexArray | None]
    values: Mapping[str, FloatArray]
    masks: Mapping[str, BoolArray]
    importance: Mapping[str, FloatArray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    on_global_mask: frozenset[str] = frozenset()

    def to_client_result(self, model: GlobalModel) -> ClientResult:
        """The dense result, bit for bit what ``reconstruct`` returns for the same update."""
        weights: dict[str, FloatArray] = {}
        for name, values in self.values.items():
            shape = model.weights[name].shape
            idx = self.index[name]
            if idx is None:
                weights[name] = values.reshape(shape).copy()
            else:
                out = np.zeros(shape, dtype=np.float32)
                out.reshape(-1)[idx] = values
                weights[name] = out
        return ClientResult(
            device_id=self.device_id,
            num_examples=self.num_examples,
            weights=weights,
            masks=dict(self.masks),
            importance=dict(self.importance),
            metrics=dict(self.metrics),
        )


class ModelIndex:
    """What ``check_sparse`` reuses across the updates of one round, computed once per model:
    each pruned tensor's global-mask coordinates, its count and the global weights there."""

    def __init__(self, model: GlobalModel) -> None:
        self.model = model
        self.slots: dict[str, IndexArray] = {}
        self.base_on_mask: dict[str, FloatArray] = {}
        self.counts: dict[str, int] = {}
        for name, mask in model.masks.items():
            slots = np.flatnonzero(mask)
            self.slots[name] = slots
            self.counts[name] = int(slots.size)
            self.base_on_mask[name] = np.ascontiguousarray(
                model.weights[name].reshape(-1)[slots], dtype=np.float32
            )


def _same_array(a: BoolArray, b: BoolArray) -> bool:
    """Equal because they are the same memory in the same layout (a decoded IMPLIED mask is a
    view of the mask book's array, which is the global mask): no scan needed."""
    return a is b or (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _add(base: FloatArray, delta: FloatArray) -> FloatArray:
    """``base + delta`` in float32; an overflow to Inf is rejected later, as non_finite."""
    with np.errstate(over="ignore"):
        out: FloatArray = base + delta
    return out


def _reject(device_id: str, reason: str, what: str) -> ValidationError:
    # The message format of fleet.strategies.base's checks.
    return ValidationError(f"update from device {device_id!r}: {what}", reason=reason)


def _rule_masks_equal(model: GlobalModel, result: SparseResult, mi: ModelIndex) -> None:
    """``require_masks_equal``. ``require_dense_or_full_masks`` holds by construction: only
    pruned tensors carry a mask in ``result``."""
    for name, g in model.masks.items():
        mask = result.masks[name]
        if name not in result.on_global_mask and not np.array_equal(mask, g):
            raise _reject(
                result.device_id, "foreign_mask", f"mask of {name!r} differs from the global mask"
            )


def _rule_prunefl(model: GlobalModel, result: SparseResult, mi: ModelIndex) -> None:
    """``PruneFL.check_result`` after the common checks."""
    _rule_masks_equal(model, result, mi)
    require_importance_complete(model, result.device_id, result.importance)


def _rule_keep_nnz(model: GlobalModel, result: SparseResult, mi: ModelIndex) -> None:
    """``require_masks_keep_nnz``: a SparseTensor holds one value per mask position, so the
    device's kept count is the number of its values."""
    for name in model.masks:
        have, want = int(result.values[name].size), mi.counts[name]
        if have != want:
            raise _reject(
                result.device_id,
                "mask_budget",
                f"mask of {name!r} keeps {have} entries, the budget is {want}",
            )


SparseRule = Callable[[GlobalModel, SparseResult, ModelIndex], None]
# Keyed by the function object: a strategy (or subclass) whose check_result is not one of these
# gets the dense check, so a new or changed rule can never be skipped.
_SPARSE_RULES: dict[object, SparseRule] = {
    FedAvg.check_result: _rule_masks_equal,  # FedAvg and FedAvgM
    PruneFL.check_result: _rule_prunefl,
    FedDST.check_result: _rule_keep_nnz,
}


def check_sparse(
    update: DeviceUpdate,
    model: GlobalModel,
    strategy: Strategy,
    *,
    device_id: str,
    model_digest: bytes,
    model_index: ModelIndex | None = None,
) -> SparseResult:
    """``reconstruct`` then ``strategy.check_result``, on the sparse representation.

    Raises the ``ValidationError`` (same reason, same message) that the dense pair raises for
    the same update and accepts exactly what it accepts. ``model_index`` is
    ``ModelIndex(model)``, built once per round by the caller (here when None or stale).
    """
    mi = model_index if model_index is not None and model_index.model is model else None
    if mi is None:
        mi = ModelIndex(model)
    # -- reconstruct's checks, in its order, with its messages
    _check_header(update, model, model_digest)
    index: dict[str, IndexArray | None] = {}
    values: dict[str, FloatArray] = {}
    masks: dict[str, BoolArray] = {}
    on_global: set[str] = set()
    for name, delta in update.deltas.items():
        base = model.weights[name]
        if delta.shape != base.shape:
            raise ValidationError(
                f"{name}: shape {delta.shape}, model has {base.shape}", reason="wrong_shape"
            )
        if not np.isfinite(delta.values).all():
            raise ValidationError(f"{name}: NaN or Inf in the delta", reason="non_finite")
        if name in model.masks:
            masks[name] = delta.mask
            if _same_array(delta.mask, model.masks[name]):
                on_global.add(name)
                index[name] = mi.slots[name]
                values[name] = _add(mi.base_on_mask[name], delta.values)
            else:
                idx = np.flatnonzero(delta.mask)
                index[name] = idx
                values[name] = _add(base.reshape(-1)[idx], delta.values)
        elif delta.values.size != delta.mask.size:  # not mask.all(), as nnz == values.size
            raise ValidationError(
                f"{name}: dense tensor sent with a partial mask", reason="mask_on_dense"
            )
        else:
            index[name] = None
            values[name] = _add(base.reshape(-1), delta.values)
    importance = _checked_importance(update, model)
    result = SparseResult(
        device_id=device_id,
        num_examples=int(update.num_examples),
        index=index,
        values=values,
        masks=masks,
        importance=importance,
        metrics=dict(update.metrics),
        on_global_mask=frozenset(on_global),
    )
    rule = _SPARSE_RULES.get(getattr(type(strategy), "check_result", None))
    if rule is None:
        strategy.check_result(model, result.to_client_result(model))
        return result
    # -- check_result_tensors: names, shapes, dtypes, masks, importance and "zero outside the
    # mask" hold by construction above; what can still fail is a finite delta added to a
    # global weight overflowing to Inf (zeros outside the mask are finite).
    for name in model.weights:
        if not np.isfinite(values[name]).all():
            raise _reject(device_id, "non_finite", f"tensor {name!r} has NaN or Inf values")
    rule(model, result, mi)
    return result

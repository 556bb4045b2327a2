"""Validation of device updates before anything touches the aggregate.

A device's message is untrusted input. ``check_update`` turns a decoded update envelope into a
``ClientResult`` (weights reconstructed against the global model the device trained from) or
raises ``ValidationError`` with a short ``reason`` code that is logged and counted per device.
Nothing here mutates the global model.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from device.errors import ValidationError
from device.wire.messages import DeviceUpdate, Envelope, FloatArray
from fleet.strategies.base import ClientResult, GlobalModel

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


def reconstruct(
    update: DeviceUpdate, model: GlobalModel, *, device_id: str, model_digest: bytes
) -> ClientResult:
    """Weights the device trained to: ``global + delta`` on the device's mask, zero elsewhere.

    Raises ``ValidationError`` for a model version or digest mismatch, missing or unknown tensor
    names, wrong shapes, a partial mask on a dense tensor, non-finite values, or a bogus
    example count.
    """
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
    return ClientResult(
        device_id=device_id,
        num_examples=int(update.num_examples),
        weights=weights,
        masks=masks,
        importance=importance,
        metrics=dict(update.metrics),
    )

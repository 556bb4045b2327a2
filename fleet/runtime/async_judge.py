"""Judging one update of buffered asynchronous rounds (``fleet.runtime.async_rounds``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from device.errors import DecodeError, ValidationError
from device.wire import envelope
from device.wire.messages import DeviceUpdate, Readjust
from fleet.runtime.model_history import ModelHistory
from fleet.strategies.base import ClientResult, Strategy
from fleet.strategies.nested import check_budgeted
from fleet.strategies.validate import reconstruct

__all__ = ["Buffered", "judge_update"]


@dataclass(frozen=True, eq=False)
class Buffered:
    """An accepted update waiting for aggregation: the step that commanded it, the model
    version it trained from, its budget, and its result (weights of that version's space)."""

    round: int
    device_id: str
    version: int
    budget: float
    result: ClientResult
    payload_bytes: int


def judge_update(
    payload: bytes,
    device_id: str,
    round_: int,
    plan: Mapping[str, Any],
    history: ModelHistory,
    strategy: Strategy,
    run_id: str,
    max_bytes: int,
    max_staleness: int,
    version: int,
) -> Buffered:
    """Decode an update of step ``round_`` and validate it against the model version it
    trained from (``fleet.runtime.async_rounds``' docstring lists the reasons); ``plan`` is the
    step's stored plan (budgets, readjustment), ``version`` the current model version.
    Raises ``ValidationError``."""
    try:
        env = envelope.decode(
            payload,
            book_for=history.book_for,
            max_bytes=max_bytes,
        )
    except DecodeError as exc:
        raise ValidationError(str(exc), reason=f"decode:{exc.reason}") from exc
    update = env.body
    if not isinstance(update, DeviceUpdate):
        raise ValidationError(
            f"expected a DeviceUpdate, got {type(update).__name__}", reason="wrong_kind"
        )
    if env.device_id != device_id or env.run_id != run_id or env.round != round_:
        raise ValidationError(
            "payload device/run/round do not match the topic's", reason="topic_mismatch"
        )
    if update.model_version > version:
        raise ValidationError(
            f"trained from model version {update.model_version}, newer than the current {version}",
            reason="future_model_version",
        )
    if version - update.model_version > max_staleness:
        raise ValidationError(
            f"trained from model version {update.model_version}, "
            f"{version - update.model_version} behind (max_staleness "
            f"{max_staleness})",
            reason="too_stale",
        )
    held = history.get(update.model_version)
    if held is None:
        raise ValidationError(
            f"model version {update.model_version} is not held", reason="unknown_model_version"
        )
    result = reconstruct(update, held.model, device_id=device_id, model_digest=held.digest)
    budget = float(plan.get("budgets", {}).get(device_id, 0.0))
    alpha = plan.get("readjust_alpha")
    readjust = None if alpha is None else Readjust(alpha=float(alpha))
    check_budgeted(strategy, held.model, result, budget, readjust)
    result = ClientResult(
        device_id=device_id,
        num_examples=result.num_examples,
        weights=result.weights,
        masks=result.masks,
        importance=result.importance,
        metrics={**result.metrics, "train_s": update.train_s},
    )
    return Buffered(round_, device_id, update.model_version, budget, result, len(payload))

"""What devices say about deployments, into the store: their deployment events (live, while a
``fleet model`` command listens) and the deployed model in their retained status (which also
carries the newest deployment's state and failure reason, so nothing is lost while nobody
listened).

Both are applied by the device's own clock (``fleet.state.deployments``): a status read later
never turns a newer event back.
"""

from __future__ import annotations

import logging

from device.errors import DecodeError
from device.wire import envelope
from device.wire.messages import DeployEvent, DeviceStatus
from device.wire.topics import TopicKind, Topics
from device.wire.transport import Message
from fleet.ops.registry import DeviceRegistry
from fleet.state.deployments import DeviceModel
from fleet.state.store import Store

__all__ = ["apply_message", "apply_status"]

log = logging.getLogger(__name__)


def apply_status(store: Store, device_id: str, status: DeviceStatus) -> bool:
    """Record a device's status: presence (through the registry), the model it serves and its
    state in the newest deployment. True if the deployment tables changed."""
    try:
        DeviceRegistry(store).apply_status(device_id, status)
    except ValueError as exc:  # malformed tags: presence is the registry's business
        log.warning("status of %s not applied to the registry: %s", device_id, exc)
    deployed = status.deployed
    if deployed is None:
        return False
    changed = False
    stamp = status.timestamp_unix_s
    if deployed.version:
        changed |= store.deployments.record_model(
            DeviceModel(
                device_id=device_id,
                version=deployed.version,
                artefact_sha256=deployed.artefact_sha256.hex(),
                deployment_id=deployed.deployment_id,
                since=deployed.since_unix_s,
                inferences=deployed.inferences,
                errors=deployed.errors,
                previous_version=deployed.previous_version,
                reported_at=stamp,
            )
        )
    if deployed.last_deployment_id and deployed.last_state is not None:
        changed |= store.deployments.record_event(
            deployed.last_deployment_id,
            device_id,
            deployed.last_state.value,
            reason=deployed.last_reason,
            reported_at=deployed.last_event_unix_s,
        )
    return changed


def apply_message(store: Store, topics: Topics, message: Message) -> str | None:
    """Apply one message from a device's status or events topic; the device id when it
    changed a deployment's record, else None. Anything undecodable is logged and skipped."""
    if not message.payload:
        return None
    try:
        parsed = topics.parse(message.topic)
        if parsed.kind not in (TopicKind.DEV_STATUS, TopicKind.DEV_EVENTS) or parsed.is_chunk:
            return None
        env = envelope.decode(message.payload)
    except (DecodeError, ValueError) as exc:
        log.debug("skipped %s: %s", message.topic, exc)
        return None
    body, device_id = env.body, parsed.device_id
    if isinstance(body, DeviceStatus):
        return device_id if apply_status(store, device_id, body) else None
    if isinstance(body, DeployEvent) and env.correlation_id:
        changed = store.deployments.record_event(
            env.correlation_id,
            device_id,
            body.state.value,
            reason=body.reason,
            metrics=body.metrics,
            reported_at=body.timestamp_unix_s,
        )
        return device_id if changed else None
    return None

"""Who is online right now, read from the broker's retained device statuses; and which
retained messages under the fleet's prefix are strays (``fleet broker status``).

The registry learns presence from births and wills only while a fleet manager is connected. When
no run is going, ``fleet status`` still wants the live picture, so it connects briefly with a
clean, throw-away session, receives every device's retained status (the birth, the will, or the
offline status an agent publishes when it stops) and applies them through the registry, which
keeps its session-epoch ordering: nothing older than what it knows can overwrite it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from device.errors import BrokerUnavailableError, DecodeError
from device.wire import envelope
from device.wire.broker import is_listening
from device.wire.messages import DeviceStatus
from device.wire.mqtt import MqttTransport, parse_broker_url
from device.wire.topics import TopicKind, Topics
from device.wire.transport import Message
from fleet.ops.registry import DeviceRegistry

log = logging.getLogger(__name__)

__all__ = ["read_retained", "refresh_presence", "stray_retained"]


def read_retained(
    url: str,
    pattern: str,
    *,
    quiet_s: float = 0.3,
    max_s: float = 3.0,
    connect_timeout_s: float = 3.0,
    username: str | None = None,
    password: str | None = None,
) -> list[Message]:
    """The messages the broker at ``url`` holds retained under ``pattern`` (a topic filter),
    cleared ones (empty payloads) left out.

    Connects with a clean, throw-away session under a client id of its own (never the fleet
    manager's), reads until no message came for ``quiet_s`` seconds (retained messages arrive
    right after the subscription), at most ``max_s`` seconds. Raises
    ``BrokerUnavailableError`` when the broker cannot be reached.
    """
    address = parse_broker_url(url)
    if not is_listening(address.host, address.port, timeout_s=connect_timeout_s):
        raise BrokerUnavailableError(f"nothing accepts connections at {url}")
    transport = MqttTransport(
        f"fleet-cli-{os.getpid()}",
        host=address.host,
        port=address.port,
        username=username,
        password=password,
        session_expiry_s=0,  # clean and throw-away: nothing is queued for this client later
    )
    transport.connect(timeout_s=connect_timeout_s)
    held: list[Message] = []
    try:
        transport.subscribe(pattern, qos=1)
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            message = transport.get(timeout_s=quiet_s)
            if message is None:
                break
            if message.retain and message.payload:
                held.append(message)
    finally:
        transport.close()
    return held


def refresh_presence(
    registry: DeviceRegistry,
    url: str,
    *,
    topics: Topics | None = None,
    quiet_s: float = 0.3,
    max_s: float = 3.0,
    connect_timeout_s: float = 3.0,
    username: str | None = None,
    password: str | None = None,
) -> int:
    """Apply the retained statuses at ``url`` to ``registry``; returns how many it applied.

    A retained status may be old, so it counts as "seen" at the time the device stamped it
    (never later than now), not at the time it was read here. Malformed statuses are skipped
    (and logged); ``BrokerUnavailableError`` as ``read_retained`` raises it.
    """
    topics = topics or Topics()
    applied = 0
    for message in read_retained(
        url,
        topics.all_status(),
        quiet_s=quiet_s,
        max_s=max_s,
        connect_timeout_s=connect_timeout_s,
        username=username,
        password=password,
    ):
        try:
            parsed = topics.parse(message.topic)
            body = envelope.decode(message.payload).body
        except (DecodeError, ValueError) as exc:
            log.warning("skipped the status on %s: %s", message.topic, exc)
            continue
        if not isinstance(body, DeviceStatus):
            continue
        stamped = body.timestamp_unix_s
        seen = min(stamped, time.time()) if stamped > 0 else None
        if registry.apply_status(parsed.device_id, body, received_at=seen):
            applied += 1
    return applied


def stray_retained(
    topics: Topics, retained: Iterable[str], running_runs: Iterable[str]
) -> list[str]:
    """Which of the ``retained`` topics under the fleet's prefix nobody should have retained.

    Expected: device statuses (births and wills), the fleet manager's status, the model of
    a run that is running, and deployments' notices and artefacts (docs/deployment.md).
    Everything else is a stray: a retained command would be replayed to its device at every
    reconnect, a retained update to every new subscriber, the model of an ended run is dead
    weight. Sorted."""
    running = set(running_runs)
    strays = []
    for topic in retained:
        try:
            parsed = topics.parse(topic)
        except ValueError:
            strays.append(topic)  # under the prefix, but no topic of the fleet's
            continue
        if parsed.kind in (TopicKind.DEV_STATUS, TopicKind.FLEET_STATUS):
            continue
        if parsed.kind == TopicKind.RUN_MODEL and parsed.run_id in running:
            continue
        if parsed.kind in (TopicKind.DEPLOY_NOTICE, TopicKind.DEPLOY_ARTEFACT):
            continue  # deployments stay retained for devices that connect later
        strays.append(topic)
    return sorted(strays)

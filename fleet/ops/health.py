"""Health check for rollouts: wait until a device's retained status shows a given agent version.

``rollout.yml`` calls ``python -m fleet.ops.health`` after upgrading each batch of devices; exit
code 0 means the device came back online with the new version before the timeout, 1 that it did not
(the message says what the device last reported, or that it reported nothing), 2 a usage error.

How: subscribe to ``{prefix}/dev/{device}/status`` (QoS 1) with a throw-away clean session. The
broker hands over the retained status first, then every new one, so a device that restarts while
we listen is seen as soon as it publishes its birth message. Each payload is an Envelope decoded
with ``device.wire.envelope.decode``; one that does not decode, or holds another body, is
remembered as the reason and otherwise ignored. The check passes on the first status with
``online`` true and ``agent_version`` equal to the wanted version, from a device id that matches;
with ``--model-version`` (a rollout that pins the device's deployed model, docs/deployment.md)
the status must also name that deployed model version.

paho runs its network loop in its own thread and the callbacks only put payloads on a queue
(DESIGN section 4). ``connect_async`` plus ``loop_start`` keep retrying while the broker is
unreachable (a broker restart during a rollout is not a failed device); the last connection
error is kept for the message when the time runs out.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device.errors import DecodeError
from device.wire import envelope
from device.wire.messages import DeviceStatus
from device.wire.mqtt import TlsSettings
from device.wire.topics import Topics

DEFAULT_TIMEOUT_S = 120.0
EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one wait.

    ``ok`` is true when a status with ``online`` and the wanted version (and deployed model
    version, when ``model_version`` is not empty) arrived in time.
    ``last_status`` is the last DeviceStatus seen (None when none arrived), ``problem`` the last
    thing that went wrong (connection refused, an undecodable payload, ...; empty when nothing
    did), ``waited_s`` the seconds spent waiting.
    """

    ok: bool
    device_id: str
    version: str
    last_status: DeviceStatus | None
    problem: str
    waited_s: float
    model_version: str = ""

    def describe(self) -> str:
        """One line for a person reading the rollout's output."""
        model = f" serving model version {self.model_version}" if self.model_version else ""
        if self.ok:
            return (
                f"device {self.device_id!r} is online with agent version {self.version}{model} "
                f"(after {self.waited_s:.1f} s)"
            )
        if self.last_status is None:
            seen = "reported no status"
        else:
            state = "online" if self.last_status.online else "offline"
            seen = f"last reported {state} with agent version {self.last_status.agent_version!r}"
            if self.model_version:
                seen += f" serving model version {self.last_status.model_version!r}"
        why = f"; last problem: {self.problem}" if self.problem else ""
        return (
            f"device {self.device_id!r} did not come back with agent version {self.version}"
            f"{model} within {self.waited_s:.1f} s: it {seen}{why}"
        )


class _Listener:
    """paho client whose callbacks only record state and enqueue payloads (DESIGN section 4)."""

    def __init__(self, topic: str, username: str | None, password: str | None) -> None:
        self.topic = topic
        self.payloads: queue.Queue[bytes] = queue.Queue()
        self.problem = ""
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"health-{uuid.uuid4().hex[:12]}",
            protocol=paho.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self.problem = f"broker refused the connection: {reason}"
            return
        # Subscribing in on_connect re-subscribes after every reconnect (clean sessions).
        client.subscribe(self.topic, qos=1)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.problem = "cannot connect to the broker"

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        # After a refused CONNACK paho also reports a disconnect (a "protocol error"): the
        # refusal is the reason worth reporting.
        if reason is not None and reason.is_failure and not self.problem.startswith("broker"):
            self.problem = f"disconnected by the broker: {reason}"

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.payloads.put(bytes(message.payload))


def _status_of(payload: bytes, device_id: str) -> tuple[DeviceStatus | None, str]:
    """(the DeviceStatus in ``payload``, "") or (None, why it is not one from ``device_id``)."""
    if not payload:
        return None, "empty status payload (retained status cleared)"
    try:
        env = envelope.decode(payload)
    except DecodeError as exc:
        return None, f"undecodable status payload: {exc}"
    if not isinstance(env.body, DeviceStatus):
        return None, f"status topic carried a {type(env.body).__name__}, not a DeviceStatus"
    if env.device_id and env.device_id != device_id:
        return None, f"status topic carried device id {env.device_id!r}"
    return env.body, ""


def wait_for_version_result(
    host: str,
    port: int,
    device_id: str,
    version: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsSettings | None = None,
    topics_prefix: str = "fl/v1",
    model_version: str = "",
) -> HealthResult:
    """Wait up to ``timeout_s`` seconds for ``device_id`` to report ``online`` with agent
    ``version`` on its retained status topic (and, unless ``model_version`` is empty, serving
    that deployed model version); the full outcome (see ``HealthResult``).

    ``tls`` enables TLS with the given CA and client certificate. Raises ``ValueError`` for a
    device id or prefix that cannot form a topic and for a negative timeout; connection
    problems are not errors, they are retried until the timeout and reported in the result.
    """
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s}")
    topic = Topics(topics_prefix).dev_status(device_id)
    listener = _Listener(topic, username, password)
    client = listener.client
    if tls is not None:
        client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        if tls.insecure:
            client.tls_insecure_set(True)
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    start = time.monotonic()
    deadline = start + timeout_s
    last: DeviceStatus | None = None
    problem = ""
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                payload = listener.payloads.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                continue
            status, why = _status_of(payload, device_id)
            if status is None:
                problem = why
                continue
            last = status
            if (
                status.online
                and status.agent_version == version
                and (not model_version or status.model_version == model_version)
            ):
                waited = time.monotonic() - start
                return HealthResult(True, device_id, version, last, "", waited, model_version)
    finally:
        client.disconnect()
        client.loop_stop()
    problem = problem or listener.problem
    waited = time.monotonic() - start
    return HealthResult(False, device_id, version, last, problem, waited, model_version)


def wait_for_version(
    host: str,
    port: int,
    device_id: str,
    version: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    username: str | None = None,
    password: str | None = None,
    tls: TlsSettings | None = None,
    topics_prefix: str = "fl/v1",
) -> bool:
    """True when ``device_id`` reports ``online`` with agent ``version`` within ``timeout_s``
    seconds (see ``wait_for_version_result`` for the details and the errors)."""
    return wait_for_version_result(
        host,
        port,
        device_id,
        version,
        timeout_s,
        username=username,
        password=password,
        tls=tls,
        topics_prefix=topics_prefix,
    ).ok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.ops.health",
        description=(
            "Wait until a device's retained status shows it online with the given agent version. "
            "Exit 0 when it does, 1 when it does not within the timeout, 2 on a usage error."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    parser.add_argument("--device", required=True, help="device id")
    parser.add_argument("--version", required=True, help="agent version to wait for")
    parser.add_argument(
        "--model-version",
        default="",
        help="deployed model version the device must also serve (a pinned rollout)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait (default 120)"
    )
    parser.add_argument("--prefix", default="fl/v1", help="topic prefix (default fl/v1)")
    parser.add_argument("--username", help="MQTT username")
    parser.add_argument(
        "--password-file",
        type=Path,
        help="file whose first line is the MQTT password (never pass secrets on a command line)",
    )
    parser.add_argument("--ca-file", help="CA certificate: enables TLS")
    parser.add_argument("--cert-file", help="client certificate (TLS)")
    parser.add_argument("--key-file", help="client key (TLS)")
    parser.add_argument(
        "--tls-insecure", action="store_true", help="skip the broker host-name check (tests)"
    )
    return parser


def _read_password(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror}") from None
    lines = text.splitlines()
    return lines[0] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tls = None
    if args.ca_file or args.cert_file or args.key_file or args.tls_insecure:
        tls = TlsSettings(args.ca_file, args.cert_file, args.key_file, args.tls_insecure)
    try:
        password = _read_password(args.password_file) if args.password_file else None
        result = wait_for_version_result(
            args.host,
            args.port,
            args.device,
            args.version,
            args.timeout,
            username=args.username,
            password=password,
            tls=tls,
            topics_prefix=args.prefix,
            model_version=args.model_version,
        )
    except ValueError as exc:
        print(f"fleet.ops.health: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.describe(), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_HEALTHY if result.ok else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())

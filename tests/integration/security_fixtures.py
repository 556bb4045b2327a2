"""Fixtures for tests against a real mosquitto configured as in production: TLS, per-device
identities, the SparseFleet ACL.

Use them from a test module (or ``conftest.py``) by importing the fixture functions, which
registers them under the names ``secure_broker`` and ``secure_mqtt``::

    from tests.integration.security_fixtures import (  # noqa: F401 (fixtures)
        secure_broker_fixture,
        secure_mqtt_fixture,
    )

``secure_broker`` (one per module) runs ``broker/mosquitto.prod.conf`` itself, rendered with
temporary paths and free loopback ports (``render_prod_config``), so the tests prove what the
shipped file does. Its three listeners:

- ``fleet_port``: plain MQTT on loopback, password (the fleet manager's account);
- ``cert_port``: TLS with a required client certificate whose CN is the device id;
- ``password_port``: TLS with a device password.

Accounts ``fleet-manager``, ``dev-a`` and ``dev-b`` exist (passwords) and ``dev-a``/``dev-b``
have certificates. ``SecureBroker.enroll`` and ``issue`` add more.

``secure_mqtt`` (per test) builds ``MqttTransport`` clients for that broker and closes them after
the test: ``fleet()``, ``device(device_id, auth="cert" | "password")`` and ``factory(auth)`` (a
``TransportFactory`` for the runner and simulated devices: unconnected transports, certificates
issued on demand). ``RawClient`` is bare paho for the reason codes our transport folds into
exceptions (CONNACK, PUBACK, SUBACK).

``broker.py`` cannot run a whole configuration file with several listeners (it renders its own
config with one listener, and waits for one port), hence the small ``ConfiguredMosquitto`` here.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device.errors import BrokerUnavailableError
from device.wire.broker import find_mosquitto, free_port, is_listening
from device.wire.mqtt import MqttTransport, TlsSettings
from fleet.ops import certs
from fleet.ops.enroll import Credentials, enroll, enroll_fleet_manager, ensure_acl

REPO = Path(__file__).resolve().parents[2]
DEV_CONFIG = REPO / "broker" / "mosquitto.conf"
PROD_CONFIG = REPO / "broker" / "mosquitto.prod.conf"
HOST = "127.0.0.1"

NOT_AUTHORIZED = 135  # MQTT 5 reason code (CONNACK, PUBACK)
BAD_CREDENTIALS = 134  # MQTT 5 "Bad user name or password"
PROD_PORTS = {"fleet": 1883, "cert": 8883, "password": 8884}  # as in mosquitto.prod.conf


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def require_mosquitto() -> str:
    try:
        return find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"security tests need a mosquitto broker: {exc}")


# -- rendering the shipped configuration files for a test ------------------------------------------


_PATH_MAP = {
    "/etc/mosquitto/": "etc/",
    "/var/lib/mosquitto/": "data/",
    "/var/log/mosquitto/": "log/",
    "/run/mosquitto/": "run/",
}


def render_prod_config(text: str, root: Path, ports: Mapping[int, int]) -> str:
    """``mosquitto.prod.conf`` with its system paths moved under ``root``, every listener on a
    loopback port (``ports`` maps the file's port to the test's), and ``user root`` when the
    tests run as root (mosquitto would otherwise drop to ``mosquitto`` and fail to read the
    0600 files this process created; DESIGN section 11). Everything else is left as shipped.

    Raises ``AssertionError`` when the file names a path or port this function does not know,
    so that a changed template fails loudly instead of touching the real system.
    """
    out = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "user":
            if running_as_root():
                out.append("user root")
            continue
        if words and words[0] == "listener":
            port = int(words[1])
            assert port in ports, f"listener {port} of the template has no test port"
            out.append(f"listener {ports[port]} {HOST}")
            continue
        if not line.lstrip().startswith("#"):
            for system, local in _PATH_MAP.items():
                line = line.replace(system, f"{root}/{local}")
            assert not re.search(r"\s/(etc|var|run|usr)/", line), f"unmapped path in {line!r}"
        out.append(line)
    return "\n".join(out) + "\n"


def render_dev_config(text: str, port: int) -> str:
    """``mosquitto.conf`` (development) on ``port`` instead of 1883, plus ``user root`` when the
    tests run as root. Its relative paths are resolved by starting mosquitto in a scratch
    directory."""
    rendered, count = re.subn(r"(?m)^listener 1883 127\.0\.0\.1$", f"listener {port} {HOST}", text)
    assert count == 1, "the development config should have exactly one loopback listener on 1883"
    return rendered + ("user root\n" if running_as_root() else "")


# -- a mosquitto process running a given configuration file ----------------------------------------


class ConfiguredMosquitto:
    """mosquitto started with ``config`` in ``cwd``; ``start`` returns once every port in
    ``ports`` accepts TCP connections."""

    def __init__(self, config: Path, ports: Sequence[int], *, cwd: Path) -> None:
        self.binary = require_mosquitto()
        self.config = config
        self.ports = tuple(ports)
        self.cwd = cwd
        self.output = cwd / "mosquitto.out"
        self.log_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "broker not started"
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> None:
        with open(self.output, "ab") as out:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        waiting = list(self.ports)
        while waiting:
            if self._process.poll() is not None:
                raise BrokerUnavailableError(
                    f"mosquitto -c {self.config} exited with {self._process.returncode}: "
                    f"{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailableError(f"mosquitto did not listen on {waiting} in time")
            waiting = [p for p in waiting if not is_listening(HOST, p)]
            if waiting:
                time.sleep(0.02)

    def reload(self) -> None:
        """SIGHUP: re-read the password file, the ACL and the server certificates."""
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def log_text(self) -> str:
        parts = []
        for path in (self.log_file, self.output):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    parts.append(path.read_text(errors="replace"))
        return "".join(parts)


# -- bare paho, for reason codes -------------------------------------------------------------------


class RawClient:
    """A paho MQTT 5 client without reconnects that records the broker's reason codes."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
    ) -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"raw-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: int | None = None
        self.disconnect_reason: int | None = None
        self._connack_event = threading.Event()
        self._disconnected = threading.Event()
        self._acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def connect(self, timeout_s: float = 5.0) -> int | None:
        """The CONNACK reason code (0 = accepted), or ``None`` when the connection was dropped
        before any CONNACK (TLS handshake refused, socket closed)."""
        try:
            self.client.connect(HOST, self.port, keepalive=30)
        except OSError:  # ssl.SSLError and ConnectionError included
            return None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._connack_event.wait(0.02):
                return self.connack
            if self._disconnected.is_set():
                return None
        return None

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """QoS 1 publish; returns the PUBACK reason code (0/16 accepted, 135 not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def subscribe(self, pattern: str) -> int:
        """QoS 1 subscribe; returns the SUBACK reason code (granted QoS, or >= 128 refused)."""
        _, mid = self.client.subscribe(pattern, qos=1)
        assert mid is not None
        return self._wait_ack(mid)

    def get(self, timeout_s: float) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def _wait_ack(self, mid: int, timeout_s: float = 5.0) -> int:
        deadline = time.monotonic() + timeout_s
        with self._acked:
            while mid not in self._acks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no acknowledgement for packet {mid} within {timeout_s}s")
                self._acked.wait(remaining)
            return self._acks.pop(mid)

    def _on_connect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
    ) -> None:
        self.connack = int(reason.value)
        self._connack_event.set()

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
    ) -> None:
        self.disconnect_reason = int(reason.value)
        self._disconnected.set()

    def _on_publish(
        self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Properties | None
    ) -> None:
        with self._acked:
            self._acks[mid] = int(reason.value)
            self._acked.notify_all()

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with self._acked:
            self._acks[mid] = max(int(r.value) for r in reasons)
            self._acked.notify_all()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))


# -- the production broker for tests ---------------------------------------------------------------


@dataclass
class SecureBroker:
    """``broker/mosquitto.prod.conf`` running with temporary files (see the module docstring)."""

    process: ConfiguredMosquitto
    root: Path
    fleet_port: int
    cert_port: int
    password_port: int
    pki: Path
    password_file: Path
    acl_file: Path
    fleet_credentials: Credentials
    passwords: dict[str, Credentials] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return certs.ca_files(self.pki).cert_file

    def server_tls(self) -> TlsSettings:
        """TLS that verifies the broker (for the password listener)."""
        return TlsSettings(ca_file=str(self.ca_file))

    def issue(self, device_id: str, **kwargs: Any) -> certs.CertFiles:
        """A client certificate from the broker's CA (``fleet.ops.certs.issue`` keywords)."""
        return certs.issue(self.pki, device_id, **kwargs)

    def device_tls(self, device_id: str) -> TlsSettings:
        """TLS with ``device_id``'s client certificate, issued now if it has none."""
        files = certs.device_files(self.pki, device_id)
        if not files.cert_file.exists():
            files = self.issue(device_id)
        return TlsSettings(str(self.ca_file), str(files.cert_file), str(files.key_file))

    def enroll(self, device_id: str) -> Credentials:
        """Give ``device_id`` a password and make the running broker accept it."""
        creds = enroll(
            device_id,
            password_file=self.password_file,
            secrets_file=self.root / "secrets" / f"{device_id}.password",
            acl_file=self.acl_file,
        )
        self.passwords[device_id] = creds
        self.reload_until_accepted(creds)
        return creds

    def reload_until_accepted(self, creds: Credentials, timeout_s: float = 5.0) -> None:
        """SIGHUP the broker and wait until ``creds`` can log in."""
        self.process.reload()
        deadline = time.monotonic() + timeout_s
        while True:
            raw = RawClient(self.fleet_port, username=creds.username, password=creds.password)
            try:
                if raw.connect() == 0:
                    return
            finally:
                raw.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"broker did not accept {creds.username} after a reload")
            time.sleep(0.05)

    def raw(self, device_id: str | None, *, auth: str = "cert", client_id: str = "") -> RawClient:
        """An unconnected ``RawClient``: ``auth`` "cert" (TLS client certificate), "password"
        (TLS + password), "fleet" (loopback + password; ``device_id`` None = fleet manager)."""
        if auth == "cert":
            assert device_id is not None
            return RawClient(self.cert_port, client_id=client_id, tls=self.device_tls(device_id))
        creds = self.fleet_credentials if device_id is None else self.passwords[device_id]
        port = self.password_port if auth == "password" else self.fleet_port
        tls = self.server_tls() if auth == "password" else None
        return RawClient(
            port, client_id=client_id, username=creds.username, password=creds.password, tls=tls
        )


@pytest.fixture(scope="module", name="secure_broker")
def secure_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """``broker/mosquitto.prod.conf`` on free loopback ports, with a CA, a server certificate,
    the ACL from ``fleet.ops.enroll`` and accounts for the fleet manager, ``dev-a`` and
    ``dev-b``."""
    require_mosquitto()
    root = tmp_path_factory.mktemp("secure-broker")
    etc = root / "etc"
    pki = etc / "certs"
    for sub in ("data", "log", "run"):
        (root / sub).mkdir()
    certs.init_ca(pki, cn="SparseFleet test CA")
    certs.issue_server(pki, hosts=("localhost", HOST))
    password_file = etc / "sparsefleet" / "passwd"
    acl_file = etc / "sparsefleet" / "acl"
    ensure_acl(acl_file)
    fleet = enroll_fleet_manager(
        password_file=password_file, secrets_file=root / "secrets" / "fleet-manager.password"
    )
    passwords = {
        d: enroll(d, password_file=password_file, secrets_file=root / "secrets" / f"{d}.password")
        for d in ("dev-a", "dev-b")
    }
    ports = {PROD_PORTS[name]: free_port(HOST) for name in ("fleet", "cert", "password")}
    config = root / "mosquitto.conf"
    config.write_text(render_prod_config(PROD_CONFIG.read_text(), root, ports))
    process = ConfiguredMosquitto(config, list(ports.values()), cwd=root)
    process.log_file = root / "log" / "mosquitto.log"
    broker = SecureBroker(
        process=process,
        root=root,
        fleet_port=ports[PROD_PORTS["fleet"]],
        cert_port=ports[PROD_PORTS["cert"]],
        password_port=ports[PROD_PORTS["password"]],
        pki=pki,
        password_file=password_file,
        acl_file=acl_file,
        fleet_credentials=fleet,
        passwords=passwords,
    )
    for device_id in passwords:
        broker.issue(device_id)
    process.start()
    try:
        yield broker
    finally:
        process.stop()


class SecureClients:
    """Builds ``MqttTransport`` clients for a ``SecureBroker``; ``close_all`` closes them."""

    def __init__(self, broker: SecureBroker) -> None:
        self.broker = broker
        self._clients: list[MqttTransport] = []
        self._raw: list[RawClient] = []

    def fleet(self, *, connect: bool = True, **kwargs: Any) -> MqttTransport:
        """The fleet manager, on the loopback listener with its password."""
        creds = self.broker.fleet_credentials
        return self._make(
            creds.username,
            self.broker.fleet_port,
            connect,
            username=creds.username,
            password=creds.password,
            **kwargs,
        )

    def device(
        self, device_id: str, *, auth: str = "cert", connect: bool = True, **kwargs: Any
    ) -> MqttTransport:
        """A device over TLS: ``auth="cert"`` (client certificate, issued on demand) or
        ``"password"`` (its enrolled password, enrolled on demand)."""
        if auth == "cert":
            tls = self.broker.device_tls(device_id)
            return self._make(device_id, self.broker.cert_port, connect, tls=tls, **kwargs)
        if auth != "password":
            raise ValueError(f"unknown auth {auth!r}; known: cert, password")
        creds = self.broker.passwords.get(device_id) or self.broker.enroll(device_id)
        return self._make(
            device_id,
            self.broker.password_port,
            connect,
            username=creds.username,
            password=creds.password,
            tls=self.broker.server_tls(),
            **kwargs,
        )

    def factory(self, *, auth: str = "cert", **kwargs: Any) -> Callable[[str], MqttTransport]:
        """A ``TransportFactory``: device id -> unconnected ``MqttTransport`` over TLS."""
        return lambda device_id: self.device(device_id, auth=auth, connect=False, **kwargs)

    def raw(self, device_id: str | None, **kwargs: Any) -> RawClient:
        """``SecureBroker.raw``, closed after the test."""
        client = self.broker.raw(device_id, **kwargs)
        self._raw.append(client)
        return client

    def close_all(self) -> None:
        for client in self._clients:
            client.close(timeout_s=1.0)
        for raw in self._raw:
            raw.close()

    def _make(self, client_id: str, port: int, connect: bool, **kwargs: Any) -> MqttTransport:
        kwargs.setdefault("session_expiry_s", 0)
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 1.0)
        kwargs.setdefault("publish_timeout_s", 5.0)
        client = MqttTransport(client_id, host=HOST, port=port, **kwargs)
        self._clients.append(client)
        if connect:
            client.connect(timeout_s=5.0)
        return client


@pytest.fixture(name="secure_mqtt")
def secure_mqtt_fixture(secure_broker: SecureBroker) -> Iterator[SecureClients]:
    """Clients for ``secure_broker``, closed after the test."""
    clients = SecureClients(secure_broker)
    try:
        yield clients
    finally:
        clients.close_all()


def mosquitto_client(name: str) -> str:
    """Path of ``mosquitto_pub`` / ``mosquitto_sub``, or skip with the install command."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: sudo apt-get install mosquitto-clients")
    return path

"""The mosquitto_broker role, converged into a scratch root and then run for real.

The role's configuration must be broker/mosquitto.prod.conf (the reviewed one) with this host's
paths and ports, and its ACL exactly what ``fleet.ops.enroll.render_acl`` writes; re-running it must
not rehash the fleet manager's password (changed=0); and a mosquitto started on the rendered
files must let in the fleet manager and an enrolled device, over TLS where the device listeners
are, and nobody else.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from ansible_harness import REPO, Ansible, PlaybookRun, require_mosquitto, write_inventory
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device.wire.broker import find_mosquitto, free_port, is_listening
from fleet.ops.certs import init_ca, issue, issue_server
from fleet.ops.enroll import enroll, render_acl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PREFIX = "lab/fl"
FLEET_USER = "fleet-manager"
FLEET_PASSWORD = "fleet-secret-77a1"


@dataclass(frozen=True)
class Ports:
    fleet: int
    cert: int
    password: int


@dataclass(frozen=True)
class ConvergedBroker:
    root: Path
    certs: Path
    ports: Ports
    first: PlaybookRun
    second: PlaybookRun

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="module")
def converged(ansible: Ansible, tmp_path_factory: pytest.TempPathFactory) -> ConvergedBroker:
    require_mosquitto()
    base = tmp_path_factory.mktemp("broker-role")
    certs = base / "certs"
    init_ca(certs)
    issue_server(certs, hosts=("localhost", "127.0.0.1"))
    issue(certs, "pi-cert")
    ports = Ports(free_port(), free_port(), free_port())
    # As root, mosquitto drops to mosquitto_broker_user after reading its configuration: the
    # test's files belong to root, so it stays root (DESIGN section 11). Otherwise it runs as us.
    account = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    root = base / "root"
    host = {
        "ansible_connection": "local",
        "mosquitto_broker_root": str(root),
        "mosquitto_broker_manage_packages": False,
        "mosquitto_broker_user": account,
        "mosquitto_broker_group": group,
        "mosquitto_broker_topics_prefix": PREFIX,
        "mosquitto_broker_fleet_username": FLEET_USER,
        "mosquitto_broker_fleet_password": FLEET_PASSWORD,
        "mosquitto_broker_python": sys.executable,
        "mosquitto_broker_fleet_listener_port": ports.fleet,
        "mosquitto_broker_cert_listener_port": ports.cert,
        "mosquitto_broker_password_listener_port": ports.password,
        "mosquitto_broker_tls_ca_src": str(certs / "ca.crt"),
        "mosquitto_broker_tls_cert_src": str(certs / "server.crt"),
        "mosquitto_broker_tls_key_src": str(certs / "server.key"),
    }
    inventory = write_inventory(base / "hosts.yml", {"broker": {"hub": host}})
    first = ansible.playbook("site.yml", inventory, "-vvv")
    assert first.returncode == 0, first.explain()
    second = ansible.playbook("site.yml", inventory)
    return ConvergedBroker(root, certs, ports, first, second)


def test_second_converge_changes_nothing(converged: ConvergedBroker) -> None:
    """The fleet manager's password is checked against its stored hash, not rehashed (a new
    salt every run would report a change and reload the broker on every run)."""
    assert converged.first.changed("hub") > 0
    assert converged.second.returncode == 0, converged.second.explain()
    assert converged.second.changed("hub") == 0, converged.second.explain()


def test_fleet_password_never_reaches_the_output(converged: ConvergedBroker) -> None:
    assert FLEET_PASSWORD not in converged.first.output
    assert FLEET_PASSWORD not in converged.second.output


def test_acl_is_what_fleet_enroll_renders(converged: ConvergedBroker) -> None:
    """One ACL for the whole project: the role's template and ``render_acl`` must not drift."""
    acl = converged.path("etc/mosquitto/sparsefleet/acl").read_text()
    assert acl == render_acl(PREFIX, FLEET_USER)


def _directives(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_config_has_the_settings_of_the_reviewed_production_config(
    converged: ConvergedBroker,
) -> None:
    """Same directives in the same order (per listener) as broker/mosquitto.prod.conf, so a
    setting added there for a reason is not missing on provisioned brokers."""
    rendered = converged.path("etc/mosquitto/mosquitto.conf").read_text()
    reviewed = (REPO / "broker" / "mosquitto.prod.conf").read_text()
    assert _directives(rendered) == _directives(reviewed)
    assert f"password_file {converged.path('etc/mosquitto/sparsefleet/passwd')}\n" in rendered
    assert f"listener {converged.ports.fleet} 127.0.0.1\n" in rendered


def test_private_files_are_not_world_readable(converged: ConvergedBroker) -> None:
    for relative in ("sparsefleet/passwd", "sparsefleet/acl", "certs/server.key"):
        mode = converged.path(f"etc/mosquitto/{relative}").stat().st_mode & 0o777
        assert mode == 0o640, (relative, oct(mode))


@pytest.fixture(scope="module")
def running_broker(converged: ConvergedBroker) -> Iterator[subprocess.Popen[bytes]]:
    """mosquitto on the rendered configuration (its own paths, ports and files)."""
    conf = converged.path("etc/mosquitto/mosquitto.conf")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        ports = converged.ports
        while not all(is_listening("127.0.0.1", p) for p in (ports.fleet, ports.cert)):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = converged.path("var/log/mosquitto/mosquitto.log")
                text = log.read_text() if log.exists() else "(no log)"
                pytest.fail(f"mosquitto did not start on the rendered config: {text[-3000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _connect(
    port: int,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
) -> int:
    """Connect once; the CONNACK reason code (0 = accepted), or -1 without any CONNACK."""
    done = threading.Event()
    code: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if ca is not None:
        client.tls_set(
            ca_certs=str(ca),
            certfile=str(cert[0]) if cert else None,
            keyfile=str(cert[1]) if cert else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

    def on_connect(c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        code.append(reason.value)
        done.set()

    client.on_connect = on_connect
    # A refused TLS handshake or a plain client on a TLS port ends without any CONNACK.
    client.on_disconnect = lambda *_: done.set()
    try:
        client.connect("127.0.0.1", port)
    except (OSError, ssl.SSLError):
        return -1
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return code[0] if code else -1


def test_fleet_manager_logs_in_on_the_loopback_listener(
    converged: ConvergedBroker, running_broker: subprocess.Popen[bytes]
) -> None:
    port = converged.ports.fleet
    assert _connect(port, client_id=FLEET_USER, username=FLEET_USER, password=FLEET_PASSWORD) == 0
    assert _connect(port, client_id="x", username=FLEET_USER, password="wrong") != 0
    assert _connect(port, client_id="anon") != 0


def test_enrolled_device_logs_in_over_tls_after_a_reload(
    converged: ConvergedBroker, running_broker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """`fleet devices enroll` writes into the role's password file; after SIGHUP (the role's
    reload) the device logs in on the password listener, over TLS verified with the fleet CA."""
    passwd = converged.path("etc/mosquitto/sparsefleet/passwd")
    credentials = enroll("pi-pass", password_file=passwd, secrets_file=tmp_path / "pi-pass")
    running_broker.send_signal(signal.SIGHUP)
    ca = converged.certs / "ca.crt"
    port = converged.ports.password
    deadline = time.monotonic() + 10
    code = -1
    while code != 0 and time.monotonic() < deadline:
        code = _connect(
            port, client_id="pi-pass", username="pi-pass", password=credentials.password, ca=ca
        )
        time.sleep(0.2)
    assert code == 0
    assert _connect(port, client_id="pi-pass", username="pi-pass", password="no", ca=ca) != 0
    # The fleet manager's plain listener is not reachable with TLS, and vice versa.
    assert _connect(port, client_id="p", username="pi-pass", password=credentials.password) != 0


def test_certificate_device_logs_in_on_the_certificate_listener(
    converged: ConvergedBroker, running_broker: subprocess.Popen[bytes]
) -> None:
    ca = converged.certs / "ca.crt"
    cert = (converged.certs / "devices/pi-cert.crt", converged.certs / "devices/pi-cert.key")
    port = converged.ports.cert
    assert _connect(port, client_id="pi-cert", ca=ca, cert=cert) == 0
    assert _connect(port, client_id="no-cert", ca=ca) != 0
    assert re.search(r"\bpi-cert\b", converged.path("var/log/mosquitto/mosquitto.log").read_text())

"""enroll.yml: a new device gets a broker account and its password, and can log in with it.

The broker host is this machine (a local inventory host): `fleet devices enroll` writes into the
password file of a running test mosquitto, the playbook's reload handler sends it SIGHUP, and the
device (a local host converging into a scratch root) receives the password. The proof is the
broker accepting the device with the password file the role wrote.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from ansible_harness import (
    VENV_BIN,
    Ansible,
    WheelBuilder,
    device_vars,
    require_mosquitto,
    write_inventory,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from device import __version__
from device.wire.broker import MosquittoBroker
from fleet.ops.enroll import ensure_acl, set_password

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEVICE = "pi-new"
FLEET_CLI = VENV_BIN / "fleet"


def _connack(broker: MosquittoBroker, username: str, password: str) -> int:
    """The CONNACK reason code for these credentials (0 = accepted, -1 = no CONNACK)."""
    done = threading.Event()
    codes: list[int] = []

    def on_connect(c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        codes.append(reason.value)
        done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5)
    client.username_pw_set(username, password)
    client.on_connect = on_connect
    # A refused TLS handshake or a plain client on a TLS port ends without any CONNACK.
    client.on_disconnect = lambda *_: done.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return codes[0] if codes else -1


def test_enroll_creates_the_account_and_hands_the_password_to_the_device(
    ansible: Ansible, wheels: WheelBuilder, reused_site_dir: Path, tmp_path: Path
) -> None:
    """After enroll.yml the broker accepts the device with the password the role installed;
    a second run changes nothing (no rotation, no reload)."""
    require_mosquitto()
    probe = [str(FLEET_CLI), "devices", "enroll", "--help"]
    if subprocess.run(probe, capture_output=True, timeout=120, check=False).returncode != 0:
        pytest.skip("'fleet devices enroll' does not exist yet (security and CLI issues)")
    auth = tmp_path / "auth"
    passwd, acl = auth / "passwd", auth / "acl"
    set_password(passwd, "watcher", "watcher-secret")
    ensure_acl(acl)
    broker = MosquittoBroker(
        state_dir=tmp_path / "broker",
        allow_anonymous=False,
        extra_config=[f"password_file {passwd}", f"acl_file {acl}"],
    )
    broker.start()
    try:
        root = tmp_path / "root"
        device = {
            "ansible_connection": "local",
            **device_vars(
                root,
                wheel=wheels(__version__),
                version=__version__,
                site_dir=reused_site_dir,
                broker_port=broker.port,
            ),
        }
        shared = {
            "sparsefleet_fleet_cli": str(FLEET_CLI),
            "sparsefleet_topics_prefix": "fl/v1",
            "sparsefleet_broker_password_file": str(passwd),
            "sparsefleet_broker_acl_file": str(acl),
            "sparsefleet_enroll_secrets_dir": str(tmp_path / "enrolled"),
            "sparsefleet_broker_reload_command": ["kill", "-HUP", str(broker.pid)],
        }
        groups = {"broker": {"hub": {"ansible_connection": "local"}}, "devices": {DEVICE: device}}
        inventory = write_inventory(tmp_path / "hosts.yml", groups, shared)

        first = ansible.playbook("enroll.yml", inventory)
        assert first.returncode == 0, first.explain()
        secret = root / "etc/sparsefleet/secrets/mqtt.password"
        password = secret.read_text().strip()
        assert password and password not in first.output
        assert secret.stat().st_mode & 0o777 == 0o600
        assert f'password_file: "{secret}"' in (root / "etc/sparsefleet/device.yaml").read_text()
        assert _connack(broker, DEVICE, password) == 0
        assert _connack(broker, DEVICE, password + "x") != 0

        second = ansible.playbook("enroll.yml", inventory)
        assert second.returncode == 0, second.explain()
        assert second.changed(DEVICE) == 0, second.explain()
        assert secret.read_text().strip() == password
    finally:
        broker.cleanup()

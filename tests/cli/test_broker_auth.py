"""The development broker is authenticated by default (issue 23, item 5).

Before, `fleet broker start` ran mosquitto with anonymous access and no packet limit: anything
on the machine could publish as any device (or take over the fleet manager's session), and a
20 MB payload travelled all the way to the fleet manager before being rejected. These tests use
real mosquitto clients (``mosquitto_pub``) against the broker `fleet broker start` leaves running.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device.errors import BrokerUnavailableError
from device.wire.broker import find_mosquitto, free_port
from fleet.ops.local_broker import MAX_PACKET_BYTES, LocalBroker
from tests.cli.helpers import Fleet


@pytest.fixture
def local(fleet: Fleet) -> Iterator[Fleet]:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs the mosquitto binary: {exc}")
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("needs mosquitto_pub ('apt-get install mosquitto-clients')")
    yield fleet
    LocalBroker(fleet.state_dir / "broker").stop()


def _pub(port: int, *args: str, payload: str | None = None) -> subprocess.CompletedProcess[str]:
    """One QoS 1 publish with mosquitto_pub (MQTT 5); ``payload`` None sends a 1-byte message."""
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1"]
    command += [*args, "-m", payload if payload is not None else "x"]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)


def _start(local: Fleet, *extra: str) -> int:
    port = free_port()
    result = local("broker", "start", "--port", str(port), *extra)
    assert result.exit_code == 0, result.output
    return port


@pytest.mark.integration
def test_anonymous_clients_are_refused_and_enrolled_devices_accepted(local: Fleet) -> None:
    port = _start(local)
    anonymous = _pub(port, "-i", "intruder", "-t", "fl/v1/dev/pi-1/status")
    assert anonymous.returncode != 0, "an anonymous client must not get in"
    assert "not authorized" in anonymous.stderr.lower()

    enrolled = local("devices", "enroll", "pi-1")
    assert enrolled.exit_code == 0, enrolled.output
    assert "reload its password file" in enrolled.stdout  # the local broker, found by itself
    time.sleep(0.3)  # SIGHUP is asynchronous
    password = (local.state_dir / "secrets" / "pi-1.password").read_text().strip()
    ok = _pub(port, "-i", "pi-1", "-u", "pi-1", "-P", password, "-t", "fl/v1/dev/pi-1/events")
    assert ok.returncode == 0, ok.stderr
    wrong = _pub(port, "-i", "pi-1", "-u", "pi-1", "-P", "guess", "-t", "fl/v1/dev/pi-1/events")
    assert wrong.returncode != 0


@pytest.mark.integration
def test_the_fleet_managers_account_is_made_and_recorded(local: Fleet) -> None:
    port = _start(local)
    status = json.loads(local("broker", "status", "--json").stdout)
    assert status["anonymous"] is False and status["username"] == "fleet-manager"
    secret = Path(status["password_file"])
    assert secret.stat().st_mode & 0o077 == 0, "the password file must be private (0600)"
    password = secret.read_text().strip()
    ok = _pub(port, "-i", "probe", "-u", "fleet-manager", "-P", password, "-t", "fl/v1/x")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.integration
def test_a_restart_keeps_the_fleet_managers_password(local: Fleet) -> None:
    """Running clients keep their password across `broker stop` / `broker start`."""
    _start(local)
    before = json.loads(local("broker", "status", "--json").stdout)["password_file"]
    first = Path(before).read_text()
    assert local("broker", "stop").exit_code == 0
    _start(local)
    assert (
        Path(json.loads(local("broker", "status", "--json").stdout)["password_file"]).read_text()
        == first
    )


@pytest.mark.integration
def test_oversized_packets_stop_at_the_broker(local: Fleet) -> None:
    """paho ignores the broker's maximum packet size (DESIGN.md section 11), so a paho client
    is the one that can send a packet above it: the broker must drop it, and a subscriber must
    see only the next, small message."""
    port = _start(local)
    status = json.loads(local("broker", "status", "--json").stdout)
    assert status["max_packet_bytes"] == MAX_PACKET_BYTES
    password = Path(status["password_file"]).read_text().strip()
    login = ["-u", "fleet-manager", "-P", password]
    watch = ["-i", "watcher", *login, "-t", "fl/v1/x", "-C", "1", "-W", "20"]
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", *watch],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # let the subscription settle
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="big", protocol=paho.MQTTv5)
        client.username_pw_set("fleet-manager", password)
        client.connect("127.0.0.1", port)
        client.loop_start()
        client.publish("fl/v1/x", b"\0" * (MAX_PACKET_BYTES + 1024), qos=1)
        time.sleep(1.0)
        client.loop_stop()
        assert _pub(port, "-i", "small", *login, "-t", "fl/v1/x", payload="small").returncode == 0
        out, _ = sub.communicate(timeout=25)
    finally:
        sub.kill()
    assert out.strip() == "small", "the oversized message must not have been delivered"


@pytest.mark.integration
def test_anonymous_access_only_when_asked_and_with_a_warning(local: Fleet) -> None:
    port = free_port()
    result = local("broker", "start", "--port", str(port), "--anonymous")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stdout and "anonymous" in result.stdout
    assert _pub(port, "-i", "anyone", "-t", "fl/v1/anything").returncode == 0


@pytest.mark.integration
def test_an_mqtt_simulation_on_the_local_broker_enrols_its_devices(local: Fleet) -> None:
    """`fleet simulate --transport mqtt` uses the running local broker: its simulated devices
    get accounts, so the run trains over the authenticated broker."""
    _start(local)
    config = local.write_config(rounds=1)
    result = local("simulate", str(config), "--transport", "mqtt", "--devices", "4")
    assert result.exit_code == 0, result.output
    assert "the local broker" in result.stdout or "mqtt://127.0.0.1" in result.stdout
    for i in range(4):
        assert (local.state_dir / "secrets" / f"sim-{i:04d}.password").exists()


@pytest.mark.integration
def test_broker_status_reports_stray_retained_messages(local: Fleet) -> None:
    """Retained messages on fleet topics that nothing should retain (issue 23, item 6)."""
    port = _start(local)
    status = json.loads(local("broker", "status", "--json").stdout)
    assert status["stray_retained"] == []
    password = Path(status["password_file"]).read_text().strip()
    login = ["-u", "fleet-manager", "-P", password]
    assert _pub(port, "-i", "p1", *login, "-r", "-t", "fl/v1/dev/pi-1/cmd").returncode == 0
    assert _pub(port, "-i", "p2", *login, "-r", "-t", "fl/v1/dev/pi-1/status").returncode == 0

    status = json.loads(local("broker", "status", "--json").stdout)
    assert status["stray_retained"] == ["fl/v1/dev/pi-1/cmd"]  # a device's status is expected
    shown = local("broker", "status")
    assert "1 stray retained message" in shown.stdout and "fl/v1/dev/pi-1/cmd" in shown.stdout

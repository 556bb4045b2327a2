"""``fleet-device run`` as a real process against a real mosquitto: birth, SIGTERM, offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.wire import envelope
from device.wire.broker import MosquittoBroker
from device.wire.messages import DeviceStatus
from device.wire.mqtt import MqttTransport

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def retained_status(broker: MosquittoBroker, device_id: str) -> DeviceStatus | None:
    client = MqttTransport(
        f"probe-{time.monotonic_ns()}", host=broker.host, port=broker.port, session_expiry_s=0
    )
    client.connect(timeout_s=5.0)
    try:
        client.subscribe(f"fl/v1/dev/{device_id}/status")
        message = client.get(timeout_s=2.0)
        if message is None:
            return None
        body = envelope.decode(message.payload).body
        assert isinstance(body, DeviceStatus)
        return body
    finally:
        client.close(timeout_s=1.0)


def test_run_announces_online_and_sigterm_leaves_it_offline(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """systemd stops the agent with SIGTERM: it must exit 0 and leave 'offline' behind."""
    config = tmp_path / "device.yaml"
    config.write_text(
        f"device_id: cli-dev\nbroker:\n  url: mqtt://{mosquitto.host}:{mosquitto.port}\n"
        "data:\n  dataset: digits\ntorch_threads: 1\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "device", "run", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            status = retained_status(mosquitto, "cli-dev")
            if status is not None and status.online:
                break
            time.sleep(0.2)
        assert status is not None and status.online, "the agent never announced itself"
        assert status.dataset_size > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    after = retained_status(mosquitto, "cli-dev")
    assert after is not None and not after.online
    assert after.session_epoch == status.session_epoch


def test_two_agents_with_one_device_id_do_not_fight_forever(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Two devices configured with the same id take the session from each other at every
    reconnect, each swallowing the other's commands. One must stop, with exit code 4 and one
    error line naming the id; the other keeps running and still stops cleanly."""
    config = tmp_path / "device.yaml"
    config.write_text(
        f"device_id: cli-twin\nbroker:\n  url: mqtt://{mosquitto.host}:{mosquitto.port}\n"
        "data:\n  dataset: digits\ntorch_threads: 1\n"
    )

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "device", "run", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start()]
    try:
        deadline = time.monotonic() + 30
        while (status := retained_status(mosquitto, "cli-twin")) is None or not status.online:
            assert time.monotonic() < deadline, "the first agent never announced itself"
            time.sleep(0.2)
        procs.append(start())
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the two agents are still fighting"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate(timeout=10)
        assert loser.returncode == 4, err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("fleet-device: error: ") and "'cli-twin'" in last, err
        assert "same client id" in last
        time.sleep(2.0)  # the winner is not kicked again
        assert winner.poll() is None
        winner.send_signal(signal.SIGTERM)
        _, err = winner.communicate(timeout=30)
        assert winner.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

"""`fleet run start|stop|resume` against devices already online on a real mosquitto.

The devices are real ``DeviceAgent``s with their own MQTT connections, in this process, each
holding its partition of the digits (as a Pi holds its own data); the fleet manager is the
`fleet run start` command, exactly as an operator runs it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device.agent import AgentOptions, DeviceAgent
from device.data import Dataset
from device.errors import BrokerUnavailableError
from device.wire.broker import MosquittoBroker, find_mosquitto, free_port
from device.wire.mqtt import MqttTransport
from fleet.runtime.run_control import RunFiles
from fleet.sim.core import PartitionedData, SimSpec
from fleet.state.store import RunStatus, Store
from tests.cli.helpers import Fleet, error_line

pytestmark = pytest.mark.integration

DEVICES = 3


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs the mosquitto binary: {exc}")
    with MosquittoBroker() as running:
        yield running


class _Own:
    """A device's data source: its own partition, whatever the command says (a real device has
    no partition name)."""

    def __init__(self, data: PartitionedData, index: int) -> None:
        self.data, self.index = data, index

    def __call__(self, partition: str) -> Dataset:
        return self.data(str(self.index))


class _SlowAgent(DeviceAgent):
    """A device that takes ``delay_s`` longer for every job (a slow Pi), so that a test can act
    while a round is open."""

    delay_s = 0.0

    def _run(self, job: Any) -> None:
        job.cancelled.wait(self.delay_s)
        super()._run(job)


@pytest.fixture
def online(broker: MosquittoBroker, request: pytest.FixtureRequest) -> Iterator[MosquittoBroker]:
    """Three device agents connected to ``broker``; each job is delayed by ``request.param``
    seconds when the test parametrizes the fixture (indirect)."""
    delay = float(getattr(request, "param", 0.0))
    data = PartitionedData(SimSpec(devices=DEVICES, dataset="digits"))
    agents = []
    for i in range(DEVICES):
        device_id = f"pi-{i}"
        agent = _SlowAgent(
            MqttTransport(device_id, host=broker.host, port=broker.port),
            _Own(data, i),
            AgentOptions(device_id=device_id, dataset_size=data.size(i), session_epoch=1),
        )
        agent.delay_s = delay
        agent.start()
        agents.append(agent)
    yield broker
    for agent in agents:
        agent.stop(timeout_s=5.0)


def test_run_start_trains_with_the_online_devices(fleet: Fleet, online: MosquittoBroker) -> None:
    path = fleet.write_config(run_id="lab", rounds=2)
    result = fleet("--broker", online.url, "run", "start", path, "--wait-devices", str(DEVICES))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"broker {online.url} (--broker)" in out
    assert "round 1/2  3/3 answered" in out and "round 2/2  3/3 answered" in out
    assert "run lab finished: 2 rounds" in out
    with Store(fleet.state_dir) as store:
        assert store.get_run("lab").status is RunStatus.FINISHED
        assert {d.device_id for d in store.list_devices()} == {"pi-0", "pi-1", "pi-2"}
        assert all(r.metrics["accuracy"] > 0.1 for r in store.rounds("lab"))


@pytest.mark.parametrize("online", [1.0], indirect=True, ids=["1s-jobs"])
def test_stop_then_resume_over_the_broker(fleet: Fleet, online: MosquittoBroker) -> None:
    """`fleet run stop` (its stop file) ends the foreground run after the round in progress;
    `fleet run resume` reconnects and finishes it, each round once. Jobs take a second, so the
    request arrives while round 1 is open."""
    path = fleet.write_config(run_id="lab", rounds=4)
    store_dir = fleet.state_dir

    def stop_during_first_round() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (store_dir / "fleet.db").exists():
                with Store(store_dir) as store:
                    if store.rounds("lab"):
                        RunFiles(store_dir, "lab").request_stop()
                        return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_during_first_round)
    stopper.start()
    result = fleet("--broker", online.url, "run", "start", path)
    stopper.join()
    assert result.exit_code == 0, result.output
    assert "run lab stopped after round" in result.stdout
    with Store(fleet.state_dir) as store:
        assert store.get_run("lab").status is RunStatus.STOPPED
        done = len(store.rounds("lab"))
    assert 1 <= done < 4

    result = fleet("--broker", online.url, "run", "resume", "lab")
    assert result.exit_code == 0, result.output
    with Store(fleet.state_dir) as store:
        assert store.get_run("lab").status is RunStatus.FINISHED
        assert [r.round for r in store.rounds("lab")] == [1, 2, 3, 4]


def test_run_start_with_no_device_online_says_how_to_get_some(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    path: Path = fleet.write_config(run_id="empty")
    result = fleet("--broker", broker.url, "run", "start", path, "--wait-s", "0.5")
    assert result.exit_code == 5
    line = error_line(result)
    assert f"no eligible device came online at {broker.url}" in line
    assert "fleet-device run" in line
    with Store(fleet.state_dir) as store:  # nothing was started
        assert store.list_runs() == []


def _publish_status(broker: MosquittoBroker, device_id: str, *, online: bool, at: float) -> None:
    """Publish a device's retained status, as its agent (birth/stop) or the broker (will) does."""
    from device.wire import envelope
    from device.wire.messages import DeviceStatus, Envelope
    from device.wire.topics import Topics

    client = MqttTransport(f"{device_id}-publisher", host=broker.host, port=broker.port)
    client.connect()
    payload = envelope.encode(
        Envelope(
            body=DeviceStatus(
                online=online,
                session_epoch=7,
                agent_version="0.1.0",
                dataset_size=42,
                timestamp_unix_s=at,
            )
        )
    )
    client.publish(Topics().dev_status(device_id), payload, qos=1, retain=True)
    client.close()


def test_status_reads_presence_from_the_broker(fleet: Fleet, broker: MosquittoBroker) -> None:
    """With no run going, `fleet status` still shows who is online now: it reads the retained
    statuses; a device that stopped since (its offline status) shows offline."""
    fleet.state_dir.mkdir()
    Store(fleet.state_dir).close()
    now = time.time()
    _publish_status(broker, "pi-a", online=True, at=now - 30)
    _publish_status(broker, "pi-b", online=True, at=now - 30)
    data = json.loads(fleet("--broker", broker.url, "status", "--json").stdout)
    assert data["presence"] == f"presence from {broker.url}"
    assert [(d["device_id"], d["online"]) for d in data["devices"]] == [
        ("pi-a", True),
        ("pi-b", True),
    ]
    assert data["devices"][0]["last_seen"] == pytest.approx(now - 30)  # stamped, not read time

    _publish_status(broker, "pi-b", online=False, at=now)  # pi-b's agent stopped
    data = json.loads(fleet("--broker", broker.url, "status", "--json").stdout)
    assert [(d["device_id"], d["online"]) for d in data["devices"]] == [
        ("pi-a", True),
        ("pi-b", False),
    ]


def test_status_without_a_reachable_broker_shows_the_last_known_state(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    fleet.state_dir.mkdir()
    Store(fleet.state_dir).close()
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = fleet("--broker", url, "status")
    assert result.exit_code == 0
    assert f"broker {url} is unreachable: presence as last recorded" in result.stdout


def test_run_start_continues_an_unfinished_run(fleet: Fleet, online: MosquittoBroker) -> None:
    """A fleet manager restarted by systemd runs `fleet run start` on the same file again: an
    unfinished run with that id continues; a finished one is refused (exit 1)."""
    path = fleet.write_config(run_id="svc", rounds=2)
    RunFiles(fleet.state_dir, "svc").request_stop()  # stops before round 1
    first = fleet("--broker", online.url, "run", "start", path)
    assert first.exit_code == 0, first.output
    assert "run svc stopped after round 0/2" in first.stdout

    again = fleet("--broker", online.url, "run", "start", path)
    assert again.exit_code == 0, again.output
    assert "continuing run svc" in again.stdout and "run svc finished: 2 rounds" in again.stdout

    done = fleet("--broker", online.url, "run", "start", path)
    assert done.exit_code == 1
    assert "run 'svc' is finished; start a new one under another id" in error_line(done)

"""Federated rounds over a real mosquitto: equivalence with memory, crashes, restarts, faults.

Devices are real ``DeviceAgent``s with their own MQTT connections (in this process, or in worker
processes for the simulation); the fleet manager is the real ``Runner``, in a subprocess where a
test kills it with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.wire.broker import MosquittoBroker
from device.wire.mqtt import MqttTransport
from fleet.runtime.runner import RoundReport, Runner, RunSpec
from fleet.sim import simulate
from fleet.sim.core import PartitionedData, SimSpec, device_ids, partition_lookup
from fleet.state.store import Store

pytestmark = pytest.mark.integration

TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.05}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def feddst(rounds: int, k: int, *, timeout_s: float = 30.0, run_id: str = "r") -> RunSpec:
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="feddst",
        rounds=rounds,
        clients_per_round=k,
        strategy_options={
            "clients_per_round": k,
            "training": TRAINING,
            "total_rounds": rounds,
            "readjust_every": 1,
        },
        round_timeout_s=timeout_s,
    )


def checkpoint(store_dir: Path, run_id: str = "r") -> dict[str, np.ndarray]:
    with Store(store_dir, create=False) as store:
        return store.load_checkpoint(run_id).weights


def test_mqtt_run_equals_the_in_memory_run(tmp_path: Path) -> None:
    """Only the transport differs: same seeds give identical tensors and identical byte counts."""
    sim = SimSpec(devices=8, dataset="digits", processes=2)
    run = feddst(rounds=3, k=4)
    memory = simulate(run, sim, tmp_path / "memory", transport="memory")
    mqtt = simulate(run, sim, tmp_path / "mqtt", transport="mqtt")
    wm, wq = checkpoint(tmp_path / "memory"), checkpoint(tmp_path / "mqtt")
    assert all(np.array_equal(wm[n], wq[n]) for n in wm)
    assert [(r.received, r.upload_bytes, r.download_bytes) for r in memory] == [
        (r.received, r.upload_bytes, r.download_bytes) for r in mqtt
    ]


class Devices:
    """In-process device agents, each with its own MQTT connection to ``broker``."""

    def __init__(self, broker: MosquittoBroker, sim: SimSpec) -> None:
        self.broker = broker
        self.sim = sim
        self.data = PartitionedData(sim)
        self.agents: dict[str, DeviceAgent] = {}

    def start(self, index: int) -> DeviceAgent:
        device_id = device_ids(self.sim.devices)[index]
        transport = MqttTransport(
            device_id,
            host=self.broker.host,
            port=self.broker.port,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        )
        agent = DeviceAgent(
            transport,
            self.data,
            AgentOptions(device_id=device_id, dataset_size=self.data.size(index)),
        )
        agent.start()
        self.agents[device_id] = agent
        return agent

    def stop_all(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):  # a killed agent's transport is gone already
                agent.stop(timeout_s=2.0)


@pytest.fixture
def make_devices(mosquitto_factory: Any, tmp_path: Path) -> Iterator[Any]:
    """``make_devices(n)`` starts a persistent mosquitto and ``n`` device agents on it."""
    fleets: list[Devices] = []

    def make(count: int) -> Devices:
        broker = mosquitto_factory(persistence=True, state_dir=tmp_path / "broker")
        fleet = Devices(broker, SimSpec(devices=count, dataset="digits"))
        for i in range(count):
            fleet.start(i)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop_all()


def run_fleet_manager(
    devices: Devices, run: RunSpec, store_dir: Path, **kwargs: Any
) -> list[RoundReport]:
    transport = MqttTransport(
        "fleet-manager",
        host=devices.broker.host,
        port=devices.broker.port,
        manual_ack=True,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
    )
    with Store(store_dir) as store:
        runner = Runner(
            run, transport, store, partition_for=partition_lookup(devices.sim.devices), **kwargs
        )
        runner.connect()
        try:
            runner.wait_for_devices(len(devices.agents), timeout_s=10.0)
            return runner.run()
        finally:
            transport.close()


FLEET_MANAGER = """
import json, sys, torch
from pathlib import Path
from device.wire.mqtt import MqttTransport
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import partition_lookup
from fleet.state.store import Store
torch.set_num_threads(1)
spec = RunSpec.from_json(json.loads(sys.argv[1]))
host, port, store_dir, devices = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
transport = MqttTransport("fleet-manager", host=host, port=port, manual_ack=True,
                          reconnect_min_s=0.1, reconnect_max_s=0.5)
with Store(store_dir) as store:
    runner = Runner(spec, transport, store, partition_for=partition_lookup(devices))
    runner.connect()
    runner.wait_for_devices(devices, timeout_s=20.0)
    runner.run()
    transport.close()
print("finished")
"""


def spawn_fleet_manager(devices: Devices, run: RunSpec, store_dir: Path) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-c",
        FLEET_MANAGER,
        json.dumps(run.to_json()),
        devices.broker.host,
        str(devices.broker.port),
        str(store_dir),
        str(len(devices.agents)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stored_updates(store_dir: Path, run_id: str = "r") -> list[tuple[int, str, str]]:
    if not (store_dir / "fleet.db").exists():
        return []
    with Store(store_dir, create=False) as store:
        rows = []
        for record in store.rounds(run_id) if _has_run(store, run_id) else []:
            for update in store.updates_for_round(run_id, record.round):
                rows.append((update.round, update.device_id, str(update.status)))
        return rows


def _has_run(store: Store, run_id: str) -> bool:
    return any(r.run_id == run_id for r in store.list_runs())


def test_kill_9_of_the_fleet_manager_then_resume_loses_and_doubles_nothing(
    make_devices: Any, tmp_path: Path
) -> None:
    """After SIGKILL mid-round, a restarted fleet manager finishes the run: every acknowledged
    update is stored once and counted once, and the model equals an uninterrupted run's."""
    devices = make_devices(6)
    run = feddst(rounds=3, k=6)
    store_dir = tmp_path / "store"
    proc = spawn_fleet_manager(devices, run, store_dir)
    try:
        # Kill it once round 2 has some of its updates stored (and so acknowledged).
        wait_for(
            lambda: any(r == 2 for r, _, _ in stored_updates(store_dir)), 60.0, "round 2 updates"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = spawn_fleet_manager(devices, run, store_dir)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    rows = stored_updates(store_dir)
    assert len(rows) == len({(r, d) for r, d, _ in rows})  # stored once
    assert sorted((r, d) for r, d, s in rows if s == "counted") == [
        (r, d) for r in (1, 2, 3) for d in device_ids(6)
    ]  # every acknowledged update counted, exactly once
    reference = tmp_path / "reference"
    simulate(run, SimSpec(devices=6, dataset="digits"), reference, evaluate_on_test=False)
    wk, wr = checkpoint(store_dir), checkpoint(reference)
    assert all(np.array_equal(wk[n], wr[n]) for n in wk)


def test_broker_restart_mid_round_the_round_completes(make_devices: Any, tmp_path: Path) -> None:
    """mosquitto restarts (persistence on) while devices train: everyone reconnects, resumes
    their sessions, and the round completes with every update."""
    devices = make_devices(4)
    run = feddst(rounds=2, k=4)
    restarted = threading.Event()

    def restart_once(kind: str, payload: Any) -> None:
        if kind == "event" and not restarted.is_set():
            restarted.set()
            threading.Thread(target=devices.broker.restart, daemon=True).start()

    reports = run_fleet_manager(devices, run, tmp_path / "store", on_progress=restart_once)
    assert restarted.is_set()
    assert [len(r.received) for r in reports] == [4, 4]


def test_devices_killed_mid_round_close_it_by_deadline_and_are_not_reselected(
    make_devices: Any, tmp_path: Path
) -> None:
    """30% of the devices die while training: the round closes at its deadline with the others,
    and the next round selects only devices that are online."""
    devices = make_devices(10)
    victims = device_ids(10)[:3]
    killed = threading.Event()

    def kill_when_training(kind: str, payload: Any) -> None:
        if kind == "event" and payload["round"] == 1 and not killed.is_set():
            killed.set()
            for device_id in victims:
                transport = devices.agents[device_id].transport
                assert isinstance(transport, MqttTransport)
                transport.kill()

    run = RunSpec(
        run_id="r",
        model_name="mlp",
        strategy="fedavg",
        rounds=2,
        clients_per_round=10,
        strategy_options={"clients_per_round": 10, "training": {**TRAINING, "epochs": 30}},
        round_timeout_s=4.0,
    )
    reports = run_fleet_manager(devices, run, tmp_path / "store", on_progress=kill_when_training)
    first, second = reports
    assert first.closed_by == "deadline"
    assert set(first.received) == set(device_ids(10)[3:])
    assert not set(second.selected) & set(victims)
    assert len(second.selected) == 7


def test_a_device_that_reconnects_during_a_round_still_gets_its_command(
    make_devices: Any, tmp_path: Path
) -> None:
    """Persistent sessions: a device whose connection is down when its command is sent gets the
    command when it comes back, and the round completes with its update."""
    devices = make_devices(3)
    away = device_ids(3)[2]
    agent = devices.agents[away]
    assert isinstance(agent.transport, MqttTransport)
    transport: MqttTransport = agent.transport
    reconnected = threading.Event()

    def drop_then_return(kind: str, payload: Any) -> None:
        # When the first device accepts round 1, cut the last device off for a moment: paho
        # reconnects with the same session and the broker delivers what it queued meanwhile.
        if kind == "event" and payload["round"] == 1 and not reconnected.is_set():
            reconnected.set()
            sock = transport._client.socket()
            if sock is not None:
                sock.close()

    reports = run_fleet_manager(
        devices, feddst(rounds=1, k=3), tmp_path / "store", on_progress=drop_then_return
    )
    assert reconnected.is_set()
    assert away in reports[0].received

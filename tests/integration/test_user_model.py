"""A user's model over a real mosquitto: a registered name from a throw-away package, offers in
the devices' retained status, selection by capability, and a digest mismatch refused.

The package is written at test time (tests/model_packages.py) with installed metadata that
registers ``user_tiny`` in the entry-point group ``sparsefleet.models``; the fleet manager and
the devices (each with its own MQTT connection) find it there. ``odd-1`` builds another layout
for the same name (as with another version of the package) and must refuse every round naming
both digests; ``old-1`` announces no models (an older agent) and must never be selected.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.model_id import digest_of, offers
from device.model_ref import ModelRef
from device.wire.mqtt import MqttTransport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec
from fleet.state.store import Store
from tests.model_packages import make_package, unique_name

pytestmark = pytest.mark.integration

DEVICES = ("dev-a", "dev-b", "odd-1", "old-1")


def test_a_registered_user_model_runs_over_mosquitto_and_a_mismatch_is_refused(
    mosquitto: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    package = unique_name()
    site = make_package(tmp_path / "site", package, entry_points={"user_tiny": f"{package}:build"})
    monkeypatch.syspath_prepend(str(site))
    ref = ModelRef(name="user_tiny", kwargs={"width": 10})
    announced = offers([ref])
    assert announced[0].architecture_digest == digest_of(ref)

    sim = SimSpec(devices=len(DEVICES), dataset="digits")
    data = PartitionedData(sim)
    agents: list[DeviceAgent] = []
    for i, device_id in enumerate(DEVICES):
        transport = MqttTransport(device_id, host=mosquitto.host, port=mosquitto.port)
        options = AgentOptions(
            device_id=device_id,
            dataset_size=data.size(i),
            models=() if device_id.startswith("old-") else announced,
        )
        agents.append(DeviceAgent(transport, data, options))
    for agent in agents:
        agent.start()
    spec = RunSpec(
        run_id="user-tiny",
        model_name=ref.text,
        strategy="feddst",
        rounds=2,
        clients_per_round=3,
        strategy_options={
            "clients_per_round": 3,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "total_rounds": 2,
            "readjust_every": 1,
        },
        round_timeout_s=60.0,
    )
    index = {device_id: str(i) for i, device_id in enumerate(DEVICES)}
    store = Store(tmp_path / "state")
    try:
        runner = Runner(
            spec,
            MqttTransport("fleet-manager", host=mosquitto.host, port=mosquitto.port),
            store,
            partition_for=lambda d: index.get(d, ""),
        )
        runner.connect()
        assert runner.wait_for_devices(3, 30.0) == 3  # old-1 is online but cannot build it
        reports = runner.run()
        runner.transport.close()
        registry = DeviceRegistry(store)
        odd = registry.get("odd-1")
        assert registry.get("dev-a").models == announced  # from the retained birth
        assert registry.get("old-1").models == ()
        stored = {r.round: r for r in store.rounds("user-tiny")}
        assert all("old-1" not in stored[r].selected for r in (1, 2))
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.stop(timeout_s=5.0)
        store.close()
    assert [sorted(r.received) for r in reports] == [["dev-a", "dev-b"]] * 2
    assert all(r.failed == ("odd-1",) for r in reports)
    assert odd.counters.failures == 2
    assert "model 'user_tiny{\"width\":10}': this device builds architecture" in odd.last_failure
    assert f"the run's model is {digest_of(ref).hex()[:16]}" in odd.last_failure
    assert "fc1.weight [10, 64] vs [11, 64] here" in odd.last_failure

"""The run's label space travels with its model over a real mosquitto.

A run declares ``classes``; every model snapshot carries them. ``own-1`` keeps images in class
directories and a config without ``classes``: it takes the run's and trains. ``odd-1`` lists
other classes in its config: each of its jobs fails with an error naming both lists (a device
error in the registry), and the round closes with the others; nothing is trained against a
label space the run did not declare.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.local_data import LocalData
from device.wire.mqtt import MqttTransport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec
from fleet.state.store import Store
from tests.device.userdata import bar_images, image_spec

pytestmark = pytest.mark.integration

DIGITS = tuple(f"digit-{i}" for i in range(10))


def test_devices_take_the_runs_classes_and_one_that_disagrees_fails_its_jobs(
    mosquitto: Any, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    images = bar_images(tmp_path / "own", per_class=10, classes=DIGITS[:3])
    data = PartitionedData(SimSpec(devices=2, dataset="digits"))
    sources: dict[str, Any] = {
        "dev-0": data.source_for(0),
        "dev-1": data.source_for(1),
        "own-1": LocalData(image_spec(images, classes=None, eval_fraction=0.0)),
        "odd-1": LocalData(image_spec(bar_images(tmp_path / "odd"), eval_fraction=0.0)),
    }
    agents = [
        DeviceAgent(
            MqttTransport(device_id, host=mosquitto.host, port=mosquitto.port),
            source,
            AgentOptions(device_id, dataset_size=30 if device_id.startswith("dev-") else 0),
        )
        for device_id, source in sources.items()
    ]
    for agent in agents:
        agent.start()
    spec = RunSpec(
        run_id="labelled",
        model_name="mlp",
        strategy="fedavg",
        rounds=2,
        clients_per_round=4,
        strategy_options={"clients_per_round": 4, "training": {"epochs": 1, "lr": 0.05}},
        round_timeout_s=60.0,
        classes=DIGITS,
    )
    store = Store(tmp_path / "state")
    try:
        runner = Runner(
            spec,
            MqttTransport("fleet-manager", host=mosquitto.host, port=mosquitto.port),
            store,
            partition_for={"dev-0": "0", "dev-1": "1"}.get,
        )
        runner.connect()
        assert runner.wait_for_devices(4, 30.0) == 4
        reports = runner.run()
        runner.transport.close()
        odd = DeviceRegistry(store).get("odd-1")
        own = DeviceRegistry(store).get("own-1")
        assert store.get_run("labelled").config["classes"] == list(DIGITS)
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.stop(timeout_s=5.0)
        store.close()
    assert [sorted(r.received) for r in reports] == [["dev-0", "dev-1", "own-1"]] * 2
    assert all(r.failed == ("odd-1",) for r in reports)
    assert own.dataset_size == 30  # its three class directories, counted at its first job
    assert odd.counters.failures == 2
    assert "data.classes in the device config (left, middle, right)" in odd.last_failure
    assert "the run's classes (digit-0, digit-1" in odd.last_failure

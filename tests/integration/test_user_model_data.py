"""A user's own model and data over a real mosquitto, with federated evaluation on.

The model comes from a throw-away package written into ``tmp_path`` at test time (on the path
of this process and, through PYTHONPATH, of the simulated devices' worker processes); the data
from an image-folder directory and a directory of sensor CSVs made at test time. `fleet
simulate --transport mqtt` partitions the data into per-device directories, and `fleet run
status --json` must show the federated figures of the evaluated rounds. A device with broken data
is one device error while the round closes with the others, over mosquitto as in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.local_data import LocalData
from device.wire.mqtt import MqttTransport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec, device_ids, partition_lookup
from fleet.state.store import Store
from tests.cli.helpers import Fleet
from tests.device.userdata import bad_data, bar_images, model_package, sensor_csvs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PACKAGE = "sf_test_user_models"

IMAGES_RUN = """\
run:
  id: images
  model:
    factory: "{package}:build"
    kwargs: {{hidden: 16, classes: 3}}
    input_shape: [1, 8, 8]
    num_classes: 3
  strategy: feddst
  rounds: 3
  clients_per_round: 3
  round_timeout_s: 120
  training: {{epochs: 2, lr: 0.1, batch_size: 8}}
  options: {{density: 0.5, readjust_every: 1}}
  evaluate: {{every: 2, fraction: 1.0, min_devices: 2, timeout_s: 60}}
data:
  dataset: imagefolder
  data_dir: images
  classes: [left, middle, right]
  options: {{channels: 1, resize: [8, 8]}}
  partition: dirichlet
  partition_options: {{beta: 1.0, min_size: 6}}
simulation:
  devices: 4
  processes: 2
"""

SENSOR_RUN = """\
run:
  id: sensors
  model:
    factory: "{package}:build_sensor"
    kwargs: {{features: 3, window: 8, classes: 2}}
    input_shape: [3, 8]
    num_classes: 2
  strategy: fedavg
  rounds: 2
  clients_per_round: 3
  round_timeout_s: 120
  training: {{epochs: 2, lr: 0.1, batch_size: 8}}
  evaluate: {{every: 1, fraction: 1.0, min_devices: 2, timeout_s: 60}}
data:
  dataset: csv
  data_dir: sensors
  classes: [walk, run]
  options: {{label_column: activity, timestamp_column: t, window: 8, stride: 4}}
  evaluate: false
  partition: iid
simulation:
  devices: 3
  processes: 1
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The throw-away model package, importable here and in spawned device processes."""
    root = model_package(tmp_path / "site", PACKAGE)
    monkeypatch.syspath_prepend(str(root))
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{root}{os.pathsep}{pythonpath}" if pythonpath else str(root))
    return PACKAGE


def _status(fleet: Fleet, run_id: str) -> dict[str, Any]:
    result = fleet("run", "status", run_id, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_a_users_model_and_data_train_over_mosquitto_with_federated_evaluation(
    tmp_path: Path, user_package: str
) -> None:
    fleet = Fleet(state_dir=tmp_path / "state", tmp=tmp_path)
    bar_images(tmp_path / "images", per_class=24)
    sensor_csvs(tmp_path / "sensors", files=3, blocks=8, rows=16)

    images = tmp_path / "images.yaml"
    images.write_text(IMAGES_RUN.format(package=user_package))
    result = fleet("simulate", images, "--transport", "mqtt")
    assert result.exit_code == 0, result.output
    status = _status(fleet, "images")
    assert status["status"] == "finished"
    assert status["config"]["model_ref"]["factory"] == f"{user_package}:build"
    rounds = {r["round"]: r for r in status["rounds"]}
    assert rounds[1]["federated_accuracy"] is None  # every 2 rounds, and the last
    for round_ in (2, 3):
        assert rounds[round_]["federated_devices"] == 4  # fraction 1.0: idle devices too
        assert rounds[round_]["federated_examples"] > 0
        assert 0.0 <= rounds[round_]["federated_accuracy"] <= 1.0
        assert rounds[round_]["accuracy"] is not None  # the held-out test set as well
    # Each simulated device read its own directory: a symlink tree of the user's images.
    device_dirs = sorted((fleet.state_dir / "simdata" / "images").iterdir())
    assert [d.name for d in device_dirs] == device_ids(4)
    assert all(p.is_symlink() for p in device_dirs[0].rglob("*.png"))

    sensors = tmp_path / "sensors.yaml"
    sensors.write_text(SENSOR_RUN.format(package=user_package))
    result = fleet("simulate", sensors, "--transport", "mqtt")
    assert result.exit_code == 0, result.output
    status = _status(fleet, "sensors")
    assert status["status"] == "finished"
    for entry in status["rounds"]:  # no server-side test set: federated evaluation measures
        assert entry["accuracy"] is None
        assert entry["federated_devices"] == 3 and 0.0 <= entry["federated_accuracy"] <= 1.0
    assert status["federated_accuracy"] == status["rounds"][-1]["federated_accuracy"]


def test_bad_data_over_mosquitto_is_one_device_error_and_the_round_closes(
    tmp_path: Path, mosquitto_factory: Any
) -> None:
    torch.set_num_threads(1)
    broker = mosquitto_factory()
    sim = SimSpec(devices=2, dataset="digits")
    data = PartitionedData(sim)

    def transport(device_id: str) -> MqttTransport:
        return MqttTransport(device_id, host=broker.host, port=broker.port)

    agents = [
        DeviceAgent(transport(d), data.source_for(i), AgentOptions(d, dataset_size=data.size(i)))
        for i, d in enumerate(device_ids(2))
    ]
    bad = bad_data("corrupt image", tmp_path)
    agents.append(DeviceAgent(transport("pi-bad"), LocalData(bad), AgentOptions("pi-bad")))
    for agent in agents:
        agent.start()
    spec = RunSpec(
        run_id="bad",
        model_name="mlp",
        strategy="fedavg",
        rounds=1,
        clients_per_round=3,
        strategy_options={"clients_per_round": 3, "training": {"epochs": 1, "lr": 0.05}},
        round_timeout_s=120.0,
    )
    fleet_manager = MqttTransport(
        "fleet-manager", host=broker.host, port=broker.port, manual_ack=True
    )
    try:
        with Store(tmp_path / "state") as store:
            runner = Runner(spec, fleet_manager, store, partition_for=partition_lookup(2))
            runner.connect()
            assert runner.wait_for_devices(3, 30.0) == 3
            (report,) = runner.run()
            info = DeviceRegistry(store).get("pi-bad")
    finally:
        fleet_manager.close()
        for agent in agents:
            agent.stop(timeout_s=5.0)
    assert report.closed_by == "all_answered"
    assert report.received == tuple(device_ids(2)) and report.failed == ("pi-bad",)
    assert info.last_failure.startswith("data error: ") and "000.png" in info.last_failure

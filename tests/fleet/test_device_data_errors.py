"""A device's own data through the real agent and runner, over the in-memory broker: bad data is
one device error and the round closes with the others; growing data is used and reported.
(The same device error over mosquitto: tests/integration/test_user_model_data.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.local_data import LocalData
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.topics import Topics
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.runner import RoundReport, Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec, partition_lookup, start_agents
from fleet.state.store import Store
from tests.device.userdata import BAD_DATA, IMAGE_CLASSES, bad_data, bar_images, image_spec

TRAINING = {"epochs": 1, "batch_size": 8, "lr": 0.05}
BAD = "pi-bad"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def one_round(k: int, rounds: int = 1) -> RunSpec:
    return RunSpec(
        run_id="d",
        model_name="mlp",  # 1x8x8 in, 10 logits: reads digits and the 8x8 bar images alike
        strategy="fedavg",
        rounds=rounds,
        clients_per_round=k,
        strategy_options={"clients_per_round": k, "training": TRAINING},
        round_timeout_s=60.0,
    )


def run(
    store: Store, broker: MemoryBroker, spec: RunSpec, devices: int, **kwargs: Any
) -> list[RoundReport]:
    runner = Runner(spec, MemoryTransport(broker, "fleet-manager"), store, **kwargs)
    runner.connect()
    assert runner.wait_for_devices(devices, 10.0) == devices
    try:
        return runner.run()
    finally:
        runner.transport.close()


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_fails_the_devices_job_and_the_round_closes_with_the_others(
    kind: str, tmp_path: Path
) -> None:
    sim = SimSpec(devices=2, dataset="digits")
    broker, topics = MemoryBroker(), Topics()
    agents = start_agents(
        lambda d: MemoryTransport(broker, d), sim, PartitionedData(sim), topics, {}, range(2)
    )
    bad = DeviceAgent(
        MemoryTransport(broker, BAD), LocalData(bad_data(kind, tmp_path)), AgentOptions(BAD)
    )
    bad.start()
    agents.append(bad)
    try:
        with Store(tmp_path / "state") as store:
            (report,) = run(store, broker, one_round(k=3), 3, partition_for=partition_lookup(2))
            info = DeviceRegistry(store).get(BAD)
    finally:
        for agent in agents:
            agent.stop()
    assert report.closed_by == "all_answered"  # not held open until its deadline
    assert report.received == ("sim-0000", "sim-0001") and report.failed == (BAD,)
    # One device error, naming the file or setting, as `fleet status` shows it.
    assert info.counters.failures == 1
    assert info.last_failure.startswith("data error: ") and BAD_DATA[kind] in info.last_failure


def test_the_agent_survives_bad_data_and_trains_once_it_is_fixed(tmp_path: Path) -> None:
    """A failed job is not a crashed agent: the next job re-reads the data, now readable."""
    root = tmp_path / "img"
    broker = MemoryBroker()
    agent = DeviceAgent(
        MemoryTransport(broker, BAD), LocalData(image_spec(root)), AgentOptions(BAD)
    )
    agent.start()
    fixed: list[int] = []

    def fix_after_round_one(kind: str, payload: Any) -> None:
        if kind == "round_closed" and payload["report"].round == 1:
            bar_images(root, per_class=4)
            fixed.append(1)

    try:
        with Store(tmp_path / "state") as store:
            reports = run(
                store, broker, one_round(k=1, rounds=2), 1, on_progress=fix_after_round_one
            )
    finally:
        agent.stop()
    assert fixed and reports[0].failed == (BAD,) and reports[1].received == (BAD,)


def test_growing_data_is_trained_on_and_reported(tmp_path: Path) -> None:
    """Images recorded between rounds are used by the next job; the device reports the new
    counts (its status), and its update's example count (the aggregation weight) grows."""
    root = bar_images(tmp_path / "img", per_class=4)
    spec = image_spec(root, eval_fraction=0.0)
    broker = MemoryBroker()
    agent = DeviceAgent(MemoryTransport(broker, BAD), LocalData(spec), AgentOptions(BAD))
    agent.start()

    def record_more(kind: str, payload: Any) -> None:
        if kind == "round_closed" and payload["report"].round == 1:
            more = bar_images(tmp_path / "more", per_class=2, seed=9)
            for name in IMAGE_CLASSES:
                for image in (more / name).iterdir():
                    image.rename(root / name / f"new-{image.name}")

    try:
        with Store(tmp_path / "state") as store:
            run(store, broker, one_round(k=1, rounds=2), 1, on_progress=record_more)
            examples = [store.updates_for_round("d", r)[0].num_examples for r in (1, 2)]
            registered = DeviceRegistry(store).get(BAD)
    finally:
        agent.stop()
    assert examples == [12, 18]
    assert (registered.dataset_size, registered.eval_examples) == (18, 0)

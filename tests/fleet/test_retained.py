"""What a run leaves retained on the broker, and which retained messages are strays (issue 23,
item 6).

A retained message published onto a fleet topic by someone else stayed on the broker after the
run ended (a retained command is replayed to its device at every reconnect). The runner now
clears what it owns when a run finishes or is stopped; ``stray_retained`` names what nobody
should hold retained, for `fleet broker status`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device.wire import envelope
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import Envelope, RoundCommand
from device.wire.topics import Topics
from fleet.runtime.presence import stray_retained
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec, fault_plan, partition_lookup, start_agents
from fleet.state.store import Store

SIM = SimSpec(devices=3, dataset="digits")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("stop_early", [False, True], ids=["finished", "stopped"])
def test_a_run_that_ends_leaves_nothing_of_its_own_retained(
    tmp_path: Path, stop_early: bool
) -> None:
    topics = Topics()
    broker = MemoryBroker()
    agents = start_agents(
        lambda d: MemoryTransport(broker, d),
        SIM,
        PartitionedData(SIM),
        topics,
        fault_plan(SIM),
        range(SIM.devices),
    )
    planted = topics.dev_cmd("sim-0002")
    other = MemoryTransport(broker, "someone")
    other.connect()
    other.publish(planted, b"not a command", qos=1, retain=True)
    assert broker.retained(planted) == b"not a command"
    run = RunSpec(
        run_id="r",
        model_name="mlp",
        strategy="fedavg",
        rounds=2,
        clients_per_round=3,
        strategy_options={"clients_per_round": 3, "training": {"epochs": 1}},
        round_timeout_s=20.0,
    )
    store = Store(tmp_path / "state")
    try:
        runner = Runner(
            run,
            MemoryTransport(broker, "fleet-manager"),
            store,
            topics=topics,
            partition_for=partition_lookup(SIM.devices),
        )
        if stop_early:
            runner.on_progress = lambda kind, _: runner.stop() if kind == "round_closed" else None
        runner.connect()
        runner.wait_for_devices(SIM.devices, timeout_s=10.0)
        reports = runner.run()
        runner.transport.close()
        assert len(reports) == (1 if stop_early else 2)
        assert store.get_run("r").status == ("stopped" if stop_early else "finished")
    finally:
        store.close()
        for agent in agents:
            agent.stop()
    assert broker.retained(topics.run_model("r")) is None, "the run's model stays retained"
    assert broker.retained(planted) is None, "a planted retained command survived the run"
    assert broker.retained(topics.dev_status("sim-0000")) is not None  # births are the devices'


def test_strays_are_what_nobody_should_hold_retained() -> None:
    topics = Topics()
    retained = [
        topics.dev_status("pi-1"),
        topics.fleet_status(),
        topics.run_model("live"),
        topics.run_model("ended"),
        topics.dev_cmd("pi-1"),
        topics.dev_update("pi-1", "live", 3),
        topics.dev_events("pi-1"),
        "fl/v1/not/a/fleet/topic",
    ]
    assert stray_retained(topics, retained, running_runs=["live"]) == sorted(
        [
            topics.run_model("ended"),
            topics.dev_cmd("pi-1"),
            topics.dev_update("pi-1", "live", 3),
            topics.dev_events("pi-1"),
            "fl/v1/not/a/fleet/topic",
        ]
    )


def test_an_agent_ignores_a_retained_command() -> None:
    """A command somebody left retained on a device's command topic would be replayed at every
    reconnect; the agent acts only on commands the fleet manager sent (never retained)."""
    topics = Topics()
    broker = MemoryBroker()
    planter = MemoryTransport(broker, "someone")
    planter.connect()
    command = Envelope(
        body=RoundCommand(model_version=1, model_digest=b"\0" * 32),
        run_id="r",
        round=1,
        device_id="sim-0000",
        correlation_id="r/1/sim-0000",
    )
    planter.publish(topics.dev_cmd("sim-0000"), envelope.encode(command), qos=1, retain=True)
    events = MemoryTransport(broker, "spy")
    events.connect()
    events.subscribe(topics.all_events())
    agents = start_agents(
        lambda d: MemoryTransport(broker, d), SIM, PartitionedData(SIM), topics, {}, [0]
    )
    try:
        message = events.get(timeout_s=1.0)
    finally:
        for agent in agents:
            agent.stop()
    assert message is None, "the agent acted on a retained command"

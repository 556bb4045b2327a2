"""Replayed updates are judged as docs/security.md says (issue 23, item 4).

Anyone who can publish on a device's update topic can replay what that device sent before. Two
things went wrong: a genuine round-1 update replayed during round 3 was rejected as
``decode:unknown_mask`` (decoding looked up a mask version long gone) instead of
``stale_round``; and an exact replay of an accepted update after its round closed was counted
as a ``late`` rejection against the honest device, so a replayer could inflate any device's
rejection count. Now the round in the topic is judged before decoding, and an exact replay of a
stored update for the round that just closed is ignored.

FedDST readjusts every round here, so each round's masks are new: the round-1 mask version is
unknown by round 3, which is what made decoding fail first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.topics import Topics
from device.wire.transport import Message
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec, fault_plan, partition_lookup, start_agents
from fleet.state.store import Store

SIM = SimSpec(devices=4, dataset="digits")
VICTIM = "sim-0001"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_replays_are_ignored_or_stale_never_decoded_nor_counted_late(tmp_path: Path) -> None:
    run = RunSpec(
        run_id="replay",
        model_name="mlp",
        strategy="feddst",
        rounds=3,
        clients_per_round=4,
        strategy_options={
            "clients_per_round": 4,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "total_rounds": 6,
            "readjust_every": 1,
        },
        round_timeout_s=30.0,
    )
    broker = MemoryBroker()
    topics = Topics()
    agents = start_agents(
        lambda d: MemoryTransport(broker, d),
        SIM,
        PartitionedData(SIM),
        topics,
        fault_plan(SIM),
        range(SIM.devices),
    )
    spy = MemoryTransport(broker, "spy")  # sees what the victim really sent
    spy.connect()
    spy.subscribe(topics.all_updates(run.run_id))
    replayer = MemoryTransport(broker, "replayer")
    replayer.connect()
    captured: list[Message] = []
    replayed: list[str] = []

    def round_one_update() -> Message:
        while not captured:
            message = spy.get(timeout_s=5.0)
            assert message is not None, "the spy saw no update"
            spy.ack(message)
            if message.topic == topics.dev_update(VICTIM, run.run_id, 1):
                captured.append(message)
        return captured[0]

    def replay(kind: str, payload: Any) -> None:
        if kind == "round_closed" and payload["report"].round == 1 and not replayed:
            original = round_one_update()
            replayer.publish(original.topic, original.payload, qos=1)
            replayed.append("after its round closed")
        elif kind == "round_closed" and payload["report"].round == 2 and len(replayed) == 1:
            original = round_one_update()
            replayer.publish(original.topic, original.payload, qos=1)
            replayed.append("a round later")

    store = Store(tmp_path / "state")
    try:
        runner = Runner(
            run,
            MemoryTransport(broker, "fleet-manager"),
            store,
            topics=topics,
            partition_for=partition_lookup(SIM.devices),
            on_progress=replay,
        )
        runner.connect()
        runner.wait_for_devices(SIM.devices, timeout_s=10.0)
        reports = runner.run()
        runner.transport.close()

        assert replayed == ["after its round closed", "a round later"]
        assert [len(r.received) for r in reports] == [4, 4, 4]
        rejections = [(r.round, r.device_id, r.reason) for r in store.rejections(run_id="replay")]
        # The exact replay right after round 1 closed counts against nobody; the one after
        # round 2 closed (round 1 is then two rounds old) is judged by its round, before any
        # mask is looked up.
        assert rejections == [(1, VICTIM, "stale_round")]
        assert store.get_device(VICTIM).rejections == {"stale_round": 1}
        stored = store.get_update("replay", 1, VICTIM)
        assert stored is not None and stored.load_payload() == captured[0].payload
    finally:
        store.close()
        for agent in agents:
            agent.stop()

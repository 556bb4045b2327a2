"""The agent and value precisions: an unknown one is refused out loud; int8 keeps a residual."""

from __future__ import annotations

import torch

from device.agent import AgentOptions, DeviceAgent
from device.data import Dataset
from device.wire import envelope
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import (
    Envelope,
    JobEvent,
    JobState,
    LocalTraining,
    RoundCommand,
    ValueDType,
)
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.topics import Topics
from tests.device.test_job import make_data, make_snapshot

torch.set_num_threads(1)
TOPICS = Topics()
SETTINGS = LocalTraining(epochs=1, batch_size=8, lr=0.05)


def start(broker: MemoryBroker) -> tuple[DeviceAgent, MemoryTransport]:
    data = make_data()
    dataset = Dataset(x=data.x, y=data.y, num_classes=10)
    agent = DeviceAgent(
        MemoryTransport(broker, "dev-1"), lambda partition: dataset, AgentOptions("dev-1")
    )
    fleet = MemoryTransport(broker, "fleet-manager")
    fleet.connect()
    fleet.subscribe(TOPICS.all_updates())
    fleet.subscribe(TOPICS.dev_events("dev-1"))
    agent.start()
    return agent, fleet


def command_payload(round_: int, digest: bytes, **fields: int) -> bytes:
    command = RoundCommand(
        model_version=3, model_digest=digest, training=SETTINGS, upload_dtype=ValueDType.INT8
    )
    payload = envelope.encode(
        Envelope(body=command, run_id="run-1", round=round_, device_id="dev-1")
    )
    if not fields:
        return payload
    msg = pb.Envelope()
    msg.ParseFromString(payload)
    for name, value in fields.items():
        setattr(msg.round_command, name, value)
    return msg.SerializeToString()


def next_body(fleet: MemoryTransport, kind: type) -> object:
    while (message := fleet.get(timeout_s=30.0)) is not None:
        body = envelope.decode(message.payload).body
        if isinstance(body, JobEvent) and body.state in (JobState.ACCEPTED, JobState.TRAINING):
            continue
        if isinstance(body, kind):
            return body
        if isinstance(body, JobEvent) and body.state is JobState.UPLOADED:
            continue
        raise AssertionError(f"unexpected {body}")
    raise AssertionError(f"no {kind.__name__} arrived")


def test_an_unknown_precision_is_refused_with_a_clear_reason() -> None:
    """A command from a newer fleet manager must not be dropped in silence: the device answers
    REJECTED naming the field and the precisions it knows, so the round goes on without it."""
    broker = MemoryBroker()
    agent, fleet = start(broker)
    try:
        for field in ("upload_dtype", "download_dtype"):
            fleet.publish(TOPICS.dev_cmd("dev-1"), command_payload(1, b"x" * 32, **{field: 42}))
            event = next_body(fleet, JobEvent)
            assert isinstance(event, JobEvent)
            assert event.state is JobState.REJECTED
            assert f"round_command.{field}: unknown value precision 42" in event.reason
            assert "int8" in event.reason
    finally:
        agent.stop(timeout_s=5.0)


def test_an_int8_round_keeps_a_residual_for_the_next_one() -> None:
    broker = MemoryBroker()
    agent, fleet = start(broker)
    try:
        snapshot = make_snapshot(0.3)
        fleet.publish(
            TOPICS.run_model("run-1"),
            envelope.encode(Envelope(body=snapshot, run_id="run-1"), dtype=ValueDType.INT8),
            retain=True,
        )
        fleet.publish(TOPICS.dev_cmd("dev-1"), command_payload(1, snapshot.digest))
        message = fleet.get(timeout_s=60.0)
        while message is not None and "/up/" not in message.topic:
            message = fleet.get(timeout_s=60.0)
        assert message is not None, "no update arrived"
    finally:
        agent.stop(timeout_s=5.0)
    residual = agent.feedback.residual("run-1", "fc1.weight")
    assert residual is not None and float(abs(residual).max()) > 0
    assert envelope.peek(message.payload).kind == "update"

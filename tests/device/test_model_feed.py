"""Which models a device receives: only while it has jobs (and a linger time after), patches
against the masks it holds, the self-contained snapshot only when it holds none or other masks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.data import Dataset
from device.errors import DecodeError
from device.model_feed import ModelFeed
from device.wire import envelope
from device.wire.codec import KnownMask, model_digest
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import Envelope, ModelSnapshot, RoundCommand
from device.wire.topics import TopicKind, Topics
from tests.device.test_job import SETTINGS, make_data, make_snapshot

torch.set_num_threads(1)

RUN = "run-1"
BASE = make_snapshot(0.3)


def version_of(version: int, masks: dict[str, np.ndarray], mask_version: int) -> ModelSnapshot:
    """The global model of ``version``: BASE's weights scaled, zero off ``masks``."""
    weights = {name: array * (1 + version / 100) for name, array in BASE.weights.items()}
    for name, mask in masks.items():
        weights[name] = np.where(mask, weights[name] + 0.01, 0).astype(np.float32)
    digest = model_digest(weights, masks)
    return ModelSnapshot("mlp", version, digest, mask_version, weights, masks)


class Fleet:
    """The fleet manager's side, by hand: each version retained on the model topic, and on the
    patch topic against the previous version's masks (as fleet.runtime.commands does)."""

    def __init__(self, broker: MemoryBroker, topics: Topics) -> None:
        self.topics = topics
        self.transport = MemoryTransport(broker, "fleet-manager")
        self.transport.connect()
        self.transport.subscribe(topics.all_updates())
        self.previous: ModelSnapshot | None = None
        self.snapshots: dict[int, ModelSnapshot] = {}

    def publish(self, snap: ModelSnapshot) -> None:
        env = Envelope(body=snap, run_id=RUN)
        full = envelope.encode(env)
        patch = full
        if self.previous is not None:
            prev = self.previous
            book = {n: KnownMask(prev.mask_version, m) for n, m in prev.masks.items()}
            patch = envelope.encode(env, book=book)
        self.transport.publish(self.topics.run_model(RUN), full, retain=True)
        self.transport.publish(self.topics.run_patch(RUN), patch, retain=True)
        self.previous = snap
        self.snapshots[snap.version] = snap

    def train(self, device_id: str, round_: int, version: int) -> int | None:
        """Command a round on ``version``; the model version the update names."""
        command = RoundCommand(
            model_version=version, model_digest=self.snapshots[version].digest, training=SETTINGS
        )
        env = Envelope(body=command, run_id=RUN, round=round_, device_id=device_id)
        self.transport.publish(self.topics.dev_cmd(device_id), envelope.encode(env))
        message = self.transport.get(timeout_s=30.0)
        assert message is not None, f"no update for round {round_}"
        self.transport.ack(message)
        peek = envelope.peek(message.payload)
        assert peek.kind == "update"
        return peek.model_version


def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_device_follows_patches_while_busy_and_receives_nothing_when_idle() -> None:
    broker, topics = MemoryBroker(), Topics()
    data = make_data()
    dataset = Dataset(x=data.x, y=data.y, num_classes=10)
    transport = MemoryTransport(broker, "dev-1")
    options = AgentOptions(device_id="dev-1", model_linger_s=0.5)
    agent = DeviceAgent(transport, lambda partition: dataset, options)
    feed = agent.models
    fleet = Fleet(broker, topics)
    masks = dict(BASE.masks)
    agent.start()
    try:
        fleet.publish(version_of(3, masks, 3))
        assert fleet.train("dev-1", 1, 3) == 3  # nothing held: the self-contained snapshot
        assert (feed.snapshots, feed.patches) == (1, 0)
        assert feed.subscriptions(RUN) == {TopicKind.RUN_PATCH}  # left once received

        fleet.publish(version_of(4, masks, 3))  # lingering: followed as a patch
        until(lambda: feed.patches == 1)
        assert feed.held(RUN).version == 4  # type: ignore[union-attr]

        until(lambda: not feed.subscriptions(RUN), timeout_s=5.0)  # linger over
        received = feed.received_bytes
        fleet.publish(version_of(5, masks, 3))  # idle: these never reach the device
        fleet.publish(version_of(6, masks, 3))
        time.sleep(0.3)
        assert feed.received_bytes == received

        # Holding version 4 with the same masks: the retained patch of 6 is enough.
        assert fleet.train("dev-1", 2, 6) == 6
        assert (feed.snapshots, feed.patches) == (1, 2)

        # A mask change while idle: the patch of 8 refers to version 7's masks, not held.
        until(lambda: not feed.subscriptions(RUN), timeout_s=5.0)
        changed = {name: mask.copy() for name, mask in masks.items()}
        changed["fc1.weight"][0, :8] = ~changed["fc1.weight"][0, :8]
        fleet.publish(version_of(7, changed, 7))
        fleet.publish(version_of(8, changed, 7))
        assert fleet.train("dev-1", 3, 8) == 8
        assert feed.snapshots == 2
        held = feed.held(RUN)
        assert held is not None and held.version == 8
        assert np.array_equal(held.masks["fc1.weight"], changed["fc1.weight"])
    finally:
        agent.stop()


def test_a_patch_gives_the_job_the_same_weights_as_the_snapshot() -> None:
    """The model a job trains from is the same whichever way it arrived."""
    broker, topics = MemoryBroker(), Topics()
    fleet = Fleet(broker, topics)
    fleet.publish(version_of(3, dict(BASE.masks), 3))
    changed = {name: mask.copy() for name, mask in BASE.masks.items()}
    changed["fc2.weight"][1, :5] = ~changed["fc2.weight"][1, :5]
    fleet.publish(version_of(4, changed, 4))
    via_patch = ModelFeed(MemoryTransport(broker, "a"), topics)
    via_full = ModelFeed(MemoryTransport(broker, "b"), topics)
    full3 = envelope.encode(Envelope(body=fleet.snapshots[3], run_id=RUN))
    via_patch.receive(TopicKind.RUN_MODEL, RUN, full3)
    retained = broker.retained(topics.run_patch(RUN))
    assert retained is not None
    via_patch.receive(TopicKind.RUN_PATCH, RUN, retained)
    full4 = broker.retained(topics.run_model(RUN))
    assert full4 is not None
    via_full.receive(TopicKind.RUN_MODEL, RUN, full4)
    a, b = via_patch.held(RUN), via_full.held(RUN)
    assert a is not None and b is not None and a.version == b.version == 4
    assert via_patch.patches == 1 and len(retained) < len(full4)
    for name in b.weights:
        assert np.array_equal(a.weights[name], b.weights[name]), name
    for name in b.masks:
        assert np.array_equal(a.masks[name], b.masks[name]), name


def test_a_corrupt_patch_asks_for_the_snapshot_and_keeps_the_model_held() -> None:
    """A patch that does not decode never replaces the model held; a waiting job gets the
    self-contained snapshot instead."""
    broker, topics = MemoryBroker(), Topics()
    transport = MemoryTransport(broker, "dev-1")
    transport.connect()
    feed = ModelFeed(transport, topics)
    snap = version_of(3, dict(BASE.masks), 3)
    feed.receive(TopicKind.RUN_MODEL, RUN, envelope.encode(Envelope(body=snap, run_id=RUN)))
    feed.watch(RUN, 4)
    assert feed.subscriptions(RUN) == {TopicKind.RUN_PATCH}
    patch = envelope.encode(Envelope(body=version_of(4, dict(BASE.masks), 3), run_id=RUN))
    with pytest.raises(DecodeError):
        feed.receive(TopicKind.RUN_PATCH, RUN, patch[:-7])
    held = feed.held(RUN)
    assert held is not None and held.version == 3
    assert feed.subscriptions(RUN) == {TopicKind.RUN_PATCH, TopicKind.RUN_MODEL}


def test_linger_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="linger"):
        ModelFeed(MemoryTransport(MemoryBroker(), "d"), Topics(), linger_s=-1)

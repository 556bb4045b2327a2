"""Chunked updates in sharded aggregation, against a real mosquitto.

With a maximum packet size far below an update's size, every update travels as a manifest and
several chunks, and the shared subscription spreads those packets over three workers, so no
worker can reassemble one alone. The workers reassemble through the store. What matters: each
update is counted exactly once, nothing is left in the chunk tables, and the new model is the
in-process (unsharded) aggregate bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.wire.broker import MosquittoBroker
from device.wire.chunking import plan_publish
from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics
from fleet.runtime.aggregator import AggregatorWorker
from fleet.state.store import Store
from tests.integration.conftest import BrokerFactory
from tests.integration.test_sharded import (
    DEVICES,
    RUN,
    _model,
    _reference,
    _Round,
    _same,
    _updates,
    _wait_stored,
)

pytestmark = pytest.mark.slow  # a broker and three workers: about 10 s here

MAX_PACKET = 200  # bytes: an update (about 250 B) needs several chunks


@pytest.fixture
def tiny_broker(mosquitto_factory: BrokerFactory) -> Iterator[MosquittoBroker]:
    yield mosquitto_factory(max_packet_size=MAX_PACKET)


class _Workers:
    """Three in-process workers (threads), each with its own client and store handle."""

    def __init__(self, broker: MosquittoBroker, state: Path, count: int) -> None:
        self.stop = threading.Event()
        self.workers: list[AggregatorWorker] = []
        self.threads: list[threading.Thread] = []
        for i in range(count):
            wid = f"{RUN}-agg-{i}"
            transport = MqttTransport(
                wid,
                host=broker.host,
                port=broker.port,
                manual_ack=True,
                reassembly=AggregatorWorker.RECEIVE_LIMITS,
            )
            worker = AggregatorWorker(transport, Store(state), RUN, wid)
            worker.connect()
            self.workers.append(worker)
            thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        for w in self.workers:
            w.transport.close()
            w.store.close()


def test_chunks_spread_over_three_workers_count_once(
    tiny_broker: MosquittoBroker, tmp_path: Path
) -> None:
    payloads = _updates(_model())
    topic = Topics().dev_update(DEVICES[0], RUN, 1)
    chunks, _ = plan_publish(
        topic, payloads[DEVICES[0]], qos=1, retain=False, max_packet_bytes=MAX_PACKET
    )
    assert chunks >= 3, "the broker limit must force chunking"
    r = _Round(tiny_broker, tmp_path / "state")
    workers = _Workers(tiny_broker, tmp_path / "state", 3)
    try:
        r.coordinator.wait_for_workers([w.worker_id for w in workers.workers], timeout_s=30)
        r.publish(payloads, DEVICES)
        # Publish every update twice: redelivered chunks must not count an update again.
        r.publish(payloads, DEVICES[:3])
        _wait_stored(r.store, len(DEVICES), timeout_s=30)
        stored = r.store.updates_for_round(RUN, 1)
        assert sorted(u.device_id for u in stored) == DEVICES  # each exactly once
        holders = [w for w in workers.workers if w.chunks_stored > 0]
        assert len(holders) >= 2, "the broker did not spread the chunks; nothing was tested"
        assert sum(w.accepted for w in workers.workers) == len(DEVICES)
        model, recovered, _ = r.finish(timeout_s=10)
        assert recovered == ()
        assert _same(model, _reference())
        assert r.store.chunk_bytes_held(RUN) == 0
    finally:
        workers.close()
        r.close()

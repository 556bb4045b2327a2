"""Sharded aggregation against a real mosquitto: worker processes on a shared subscription.

What matters: how updates are spread over workers must not change one bit of the new global
model (K = 1 vs K = 3), and a worker killed with SIGKILL mid-round must lose nothing (its
acknowledged updates are recovered from the store, its unacknowledged ones from its session).
Devices are replaced by one publisher of deterministic FedDST updates, so no training runs.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.wire import envelope
from device.wire.broker import MosquittoBroker
from device.wire.codec import SparseTensor, model_digest
from device.wire.messages import DeviceUpdate, Envelope
from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics
from fleet.runtime.aggregator import Coordinator, RoundContext, start_workers
from fleet.runtime.runner import RunSpec
from fleet.state.store import Store
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import aggregate_exact
from fleet.strategies.base import GlobalModel
from tests.integration.conftest import BrokerFactory

pytestmark = pytest.mark.slow  # worker processes import torch: several seconds each here

RUN = "shard"
DEVICES = [f"dev-{i:02d}" for i in range(8)]
SHAPES = {"conv.weight": (8, 10), "fc.bias": (6,)}
KEPT = 24


def _model() -> GlobalModel:
    rng = np.random.default_rng(0)
    mask = np.zeros(80, dtype=bool)
    mask[rng.choice(80, KEPT, replace=False)] = True
    mask = mask.reshape(SHAPES["conv.weight"])
    conv = np.where(mask, rng.standard_normal(mask.shape), 0).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    return GlobalModel(0, {"conv.weight": conv, "fc.bias": bias}, {"conv.weight": mask}, "tiny")


def _updates(model: GlobalModel) -> dict[str, bytes]:
    """One FedDST update per device: its own mask of the budget's size, mixed magnitudes."""
    rng = np.random.default_rng(1)
    digest = model_digest(model.weights, model.masks)
    out = {}
    for device_id in DEVICES:
        mask = np.zeros(80, dtype=bool)
        mask[rng.choice(80, KEPT, replace=False)] = True
        mask = mask.reshape(SHAPES["conv.weight"])
        scale = 10.0 ** rng.integers(-6, 3, size=SHAPES["conv.weight"])
        delta = (rng.standard_normal(SHAPES["conv.weight"]) * scale).astype(np.float32)
        bias = rng.standard_normal(6).astype(np.float32)
        deltas = {
            "conv.weight": SparseTensor.from_dense(np.where(mask, delta, 0), mask),
            "fc.bias": SparseTensor.from_dense(bias),
        }
        body = DeviceUpdate(0, digest, deltas, num_examples=int(rng.integers(1, 900)))
        out[device_id] = envelope.encode(
            Envelope(body=body, run_id=RUN, round=1, device_id=device_id)
        )
    return out


def _open_round(state: Path) -> Store:
    model = _model()
    strategy = create_strategy("feddst", clients_per_round=len(DEVICES))
    strategy.load_state_dict({"budget/conv.weight": np.array(KEPT, dtype=np.int64)})
    spec = RunSpec(RUN, "tiny", "feddst", 1, len(DEVICES), {"clients_per_round": len(DEVICES)})
    store = Store(state)
    store.create_run(RUN, config=spec.to_json(), strategy="feddst", model_name="tiny")
    store.set_run_status(RUN, "running")
    store.save_checkpoint(
        RUN, 0, model.weights, model.masks, strategy.state_dict(), {"mask_version": 0}
    )
    store.open_round(RUN, 1, selected=DEVICES, deadline=time.time() + 600, model_version_in=0)
    return store


def _wait_stored(store: Store, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(store.updates_for_round(RUN, 1, statuses=("accepted",))) >= count:
            return
        time.sleep(0.1)
    got = len(store.updates_for_round(RUN, 1))
    raise AssertionError(f"only {got} of {count} updates were stored")


class _Round:
    """A broker, a store with round 1 open, a coordinator and a device publisher."""

    def __init__(self, broker: MosquittoBroker, state: Path) -> None:
        self.broker = broker
        self.state = state
        self.url = f"mqtt://{broker.host}:{broker.port}"
        self.store = _open_round(state)
        self.coord_transport = MqttTransport(
            "coordinator", host=broker.host, port=broker.port, manual_ack=True
        )
        self.coordinator = Coordinator(self.coord_transport, self.store, RUN)
        self.coordinator.connect()
        self.devices = MqttTransport("devices", host=broker.host, port=broker.port)
        self.devices.connect()
        self.procs: list[subprocess.Popen[bytes]] = []

    def workers(self, count: int, first: int = 0) -> list[subprocess.Popen[bytes]]:
        procs = start_workers(count, self.url, self.state, RUN, first=first)
        self.procs += procs
        ids = [f"{RUN}-agg-{i}" for i in range(first, first + count)]
        self.coordinator.wait_for_workers(ids, timeout_s=60)
        return procs

    def publish(self, payloads: dict[str, bytes], devices: list[str]) -> None:
        topics = Topics()
        for device_id in devices:
            self.devices.publish(topics.dev_update(device_id, RUN, 1), payloads[device_id])

    def finish(self, timeout_s: float = 10.0) -> tuple[GlobalModel, tuple[str, ...], int]:
        ctx = RoundContext.load(self.store, RUN)
        assert ctx is not None
        counted = [u.device_id for u in self.store.updates_for_round(RUN, 1)]
        model, handover = self.coordinator.collect(
            ctx.strategy, 1, ctx.model, counted, timeout_s=timeout_s
        )
        return model, handover.recovered, len(handover.partials)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.devices.close()
        self.coord_transport.close()
        self.store.close()


@pytest.fixture
def big_broker(mosquitto_factory: BrokerFactory) -> Iterator[MosquittoBroker]:
    yield mosquitto_factory(max_packet_size=16 * 1024 * 1024)


def _reference() -> GlobalModel:
    """The same round aggregated in this process, without MQTT or workers."""
    model = _model()
    strategy = create_strategy("feddst", clients_per_round=len(DEVICES))
    strategy.load_state_dict({"budget/conv.weight": np.array(KEPT, dtype=np.int64)})
    ctx_results = []
    digest = model_digest(model.weights, model.masks)
    from fleet.strategies.validate import reconstruct

    for device_id, payload in _updates(model).items():
        body = envelope.decode(payload).body
        assert isinstance(body, DeviceUpdate)
        ctx_results.append(reconstruct(body, model, device_id=device_id, model_digest=digest))
    return aggregate_exact(strategy, 1, model, ctx_results)


def _same(a: GlobalModel, b: GlobalModel) -> bool:
    return all(a.weights[n].tobytes() == b.weights[n].tobytes() for n in a.weights) and all(
        np.array_equal(a.masks[n], b.masks[n]) for n in a.masks
    )


@pytest.mark.parametrize("workers", [1, 3])
def test_k_workers_give_the_reference_model(
    big_broker: MosquittoBroker, tmp_path: Path, workers: int
) -> None:
    """K = 1 and K = 3 workers both produce the in-process exact aggregate, bit for bit, from
    partial sums alone (the coordinator recovers nothing)."""
    r = _Round(big_broker, tmp_path / "state")
    try:
        r.workers(workers)
        r.publish(_updates(_model()), DEVICES)
        _wait_stored(r.store, len(DEVICES))
        model, recovered, partials = r.finish()
        assert recovered == ()
        assert 1 <= partials <= workers
        assert _same(model, _reference())
    finally:
        r.close()


def test_sigkilled_worker_loses_nothing(big_broker: MosquittoBroker, tmp_path: Path) -> None:
    """Kill one of two workers after it acknowledged updates and before any handover: its
    stored updates are recovered by the coordinator, the rest reach its restarted session, and
    the model is the reference one."""
    r = _Round(big_broker, tmp_path / "state")
    try:
        _, victim = r.workers(2)
        payloads = _updates(_model())
        r.publish(payloads, DEVICES[:4])
        _wait_stored(r.store, 4)
        victim_had = [
            u.device_id
            for u in r.store.updates_for_round(RUN, 1)
            if u.meta.get("worker") == f"{RUN}-agg-1"
        ]
        assert victim_had, "round robin gave the victim nothing to lose"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        r.publish(payloads, DEVICES[4:])
        r.workers(1, first=1)  # the same id: resumes the dead worker's session
        _wait_stored(r.store, len(DEVICES))
        model, recovered, _ = r.finish(timeout_s=3.0)
        assert set(victim_had) <= set(recovered)
        assert _same(model, _reference())
    finally:
        r.close()

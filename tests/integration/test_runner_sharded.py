"""The real ``Runner`` with aggregator workers against a real mosquitto.

What matters: handing aggregation to K worker processes must not change one bit of any global
model (the runner alone, K = 1 and K = 3 give the same checkpoints for the same run and seeds),
the runner itself must not decode the rounds' updates (the workers stored every one of them),
and a worker killed with SIGKILL in the middle of a round loses nothing: its acknowledged updates
are recovered from the store by the coordinator, the rest reach its restarted session, and the
model is again the one the runner alone computes. Devices are real ``DeviceAgent``s training the
small MLP on digits, so each run takes a few seconds plus the workers' start-up (torch import).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.errors import BrokerUnavailableError
from device.wire.broker import MosquittoBroker, find_mosquitto
from device.wire.mqtt import MqttTransport
from fleet.runtime.aggregator import Coordinator, LocalWorkers
from fleet.runtime.runner import RoundReport, Runner, RunSpec
from fleet.sim.core import PartitionedData, SimSpec, device_ids, partition_lookup
from fleet.state.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RUN = "sharded"
DEVICES = 4
ROUNDS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    """One torch thread for every run, the module-scoped reference included: a different
    thread count changes the devices' float reductions, and so their updates, by an ulp."""
    torch.set_num_threads(1)


def _spec(strategy: str = "feddst") -> RunSpec:
    """Every device in every round (k = n, so which devices count never depends on timing).

    ``feddst``: a mask readjustment every round (votes and top-k go through the sums).
    ``prunefl``: the initial pruning at one device in round 0 (the runner's own job, never a
    worker's) and a reconfiguration every round from the summed squared gradients.
    """
    training = {"epochs": 1, "batch_size": 32, "lr": 0.05}
    options: dict[str, Any] = {"clients_per_round": DEVICES, "training": training}
    if strategy == "feddst":
        options |= {"total_rounds": ROUNDS, "readjust_every": 1}
    else:
        options |= {
            "initial_pruning": True,
            "rounds_per_reconfig": 1,
            "max_reconfigs": 2,
            "reconfig_every": 1,
        }
    return RunSpec(
        run_id=RUN,
        model_name="mlp",
        strategy=strategy,
        rounds=ROUNDS,
        clients_per_round=DEVICES,
        strategy_options=options,
        round_timeout_s=120.0,
    )


@dataclass
class Outcome:
    """What a run left behind: every checkpoint's tensors, the reports, the stored updates'
    workers and the rounds' handover metrics."""

    checkpoints: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    reports: list[RoundReport]
    stored_by: dict[tuple[int, str], str | None]
    round_metrics: dict[int, Mapping[str, Any]]
    restarts: int = 0
    killed: list[str] = field(default_factory=list)


def _client(broker: MosquittoBroker, client_id: str, **kwargs: Any) -> MqttTransport:
    return MqttTransport(
        client_id,
        host=broker.host,
        port=broker.port,
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
        **kwargs,
    )


def run_fleet(
    state: Path, workers: int, *, kill_first_worker: bool = False, strategy: str = "feddst"
) -> Outcome:
    """One whole run on a fresh broker: ``DEVICES`` agents, the runner, and ``workers`` local
    worker processes (0: the runner aggregates alone). ``kill_first_worker``: SIGKILL the
    worker that stored round 1's first update as soon as the runner sees it."""
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"integration test needs a mosquitto broker: {exc}")
    broker = MosquittoBroker(max_packet_size=16 * 1024 * 1024)
    sim = SimSpec(devices=DEVICES, dataset="digits")
    data = PartitionedData(sim)
    killed: list[str] = []
    with contextlib.ExitStack() as stack:
        broker.start()
        stack.callback(broker.cleanup)
        store = stack.enter_context(Store(state))
        coordinator = pool = None
        if workers:
            coord_transport = _client(broker, "fleet-coordinator", manual_ack=True)
            stack.callback(coord_transport.close)
            coordinator = Coordinator(coord_transport, store, RUN)
            coordinator.connect()
            url = f"mqtt://{broker.host}:{broker.port}"
            pool = LocalWorkers(workers, url, state, RUN)
            stack.callback(pool.stop)
            pool.start()
            coordinator.wait_for_workers(pool.ids, timeout_s=120)
        for i, device_id in enumerate(device_ids(DEVICES)):
            agent = DeviceAgent(
                _client(broker, device_id),
                data,
                AgentOptions(device_id=device_id, dataset_size=data.size(i), torch_threads=1),
            )
            agent.start()
            stack.callback(agent.stop, timeout_s=2.0)

        def on_progress(event: str, info: Mapping[str, Any]) -> None:
            if not (kill_first_worker and pool is not None and event == "update" and not killed):
                return
            row = store.get_update(RUN, int(info["round"]), str(info["device_id"]))
            assert row is not None
            victim = str(row.meta["worker"])
            os.kill(pool.procs[pool.ids.index(victim)].pid, signal.SIGKILL)
            pool.procs[pool.ids.index(victim)].wait(10)
            killed.append(victim)

        transport = _client(broker, "fleet-manager", manual_ack=True)
        stack.callback(transport.close)
        runner = Runner(
            _spec(strategy),
            transport,
            store,
            partition_for=partition_lookup(DEVICES),
            coordinator=coordinator,
            supervise=None if pool is None else pool.respawn_dead,
            handover_timeout_s=3.0,
            on_progress=on_progress,
        )
        runner.connect()
        assert runner.wait_for_devices(DEVICES, timeout_s=30.0) == DEVICES
        reports = runner.run()
        checkpoints = {}
        for record in store.checkpoints(RUN):
            ck = store.load_checkpoint(RUN, record.version)
            checkpoints[record.version] = (dict(ck.weights), dict(ck.masks))
        stored_by = {
            (r, u.device_id): u.meta.get("worker")
            for r in range(1, ROUNDS + 1)
            for u in store.updates_for_round(RUN, r)
        }
        metrics = {r.round: r.metrics for r in store.rounds(RUN)}
        return Outcome(
            checkpoints,
            reports,
            stored_by,
            metrics,
            restarts=0 if pool is None else pool.restarts,
            killed=killed,
        )


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """The reference: the same run with the runner aggregating alone."""
    return run_fleet(tmp_path_factory.mktemp("alone") / "state", workers=0)


def assert_same_models(a: Outcome, b: Outcome) -> None:
    assert sorted(a.checkpoints) == sorted(b.checkpoints)
    assert len(a.checkpoints) >= ROUNDS + 1
    for version, (weights, masks) in a.checkpoints.items():
        other_weights, other_masks = b.checkpoints[version]
        for name in weights:
            assert weights[name].tobytes() == other_weights[name].tobytes(), (version, name)
        for name in masks:
            assert np.array_equal(masks[name], other_masks[name]), (version, name)
    assert [r.received for r in a.reports] == [r.received for r in b.reports]


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_give_the_runners_own_models_bit_for_bit(
    alone: Outcome, tmp_path: Path, workers: int
) -> None:
    """K = 1 and K = 3 workers: every checkpoint equals the unsharded run's, bit for bit; every
    update was stored by a worker (the runner decoded none) and the handover came from partial
    sums (nothing recovered, as no worker died)."""
    sharded = run_fleet(tmp_path / "state", workers)
    assert_same_models(alone, sharded)
    assert all(alone.stored_by[key] is None for key in alone.stored_by)
    assert set(sharded.stored_by) == set(alone.stored_by)
    assert all(w is not None and w.startswith(f"{RUN}-agg-") for w in sharded.stored_by.values())
    for round_ in range(1, ROUNDS + 1):
        metrics = sharded.round_metrics[round_]
        assert metrics["recovered"] == 0
        assert 1 <= metrics["partials"] <= workers


def test_worker_killed_mid_round_loses_nothing(alone: Outcome, tmp_path: Path) -> None:
    """SIGKILL the worker that stored round 1's first update: the supervisor restarts it under
    the same id, the coordinator recovers what it had acknowledged from the store, and every
    model is still the unsharded run's."""
    sharded = run_fleet(tmp_path / "state", workers=2, kill_first_worker=True)
    assert len(sharded.killed) == 1
    assert sharded.restarts >= 1
    assert sharded.round_metrics[1]["recovered"] >= 1
    assert_same_models(alone, sharded)


def test_prunefl_with_workers_gives_the_runners_own_models(tmp_path: Path) -> None:
    """PruneFL: the initial pruning job (round 0) stays with the runner, the rounds' updates and
    their squared gradients go through two workers' sums, and every checkpoint (the pruned
    initial model and each reconfigured one) equals the runner-alone run's, bit for bit."""
    alone = run_fleet(tmp_path / "alone", workers=0, strategy="prunefl")
    sharded = run_fleet(tmp_path / "sharded", workers=2, strategy="prunefl")
    assert_same_models(alone, sharded)
    densities = {
        version: tuple(float(m.mean()) for m in masks.values())
        for version, (_, masks) in alone.checkpoints.items()
    }
    assert len(set(densities.values())) >= 3, f"no pruning or no reconfiguration: {densities}"
    assert all(w is not None for w in sharded.stored_by.values())

"""The round runner over the in-memory broker, with real agents, codec, store and strategies.

These are the algorithm-level end-to-end tests: fast (digits + mlp), deterministic, no broker.
The same runner runs over mosquitto in tests/integration/test_runtime.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.wire import envelope
from device.wire.codec import SparseTensor
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import DeviceUpdate, Envelope
from device.wire.topics import Topics
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim import simulate
from fleet.sim.core import (
    Faults,
    PartitionedData,
    SimSpec,
    fault_plan,
    partition_lookup,
    start_agents,
)
from fleet.state.store import Store

TRAINING = {"epochs": 2, "batch_size": 32, "lr": 0.05}
# Chance on the 10 digit classes is 0.1; a federated mlp that learns anything useful clears 0.6
# after a few rounds (full-batch local training reaches ~0.95), so 0.6 separates "learns" from
# "broken aggregation" with a wide margin in both directions.
ABOVE_CHANCE = 0.6


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def spec(strategy: str, rounds: int = 4, run_id: str = "t", **options: Any) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy=strategy,
        rounds=rounds,
        clients_per_round=5,
        strategy_options={"clients_per_round": 5, "training": TRAINING, **options},
        round_timeout_s=30.0,
    )


SIM = SimSpec(devices=10, dataset="digits")


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("fedavg", {}),
        ("fedavgm", {}),
        ("feddst", {"total_rounds": 4, "readjust_every": 2}),
        ("prunefl", {"reconfig_every": 2, "max_reconfigs": 3}),
    ],
)
def test_each_strategy_learns_digits(
    strategy: str, options: dict[str, Any], tmp_path: Path
) -> None:
    """Every algorithm, through agents, codec and store, must end well above chance."""
    reports = simulate(spec(strategy, **options), SIM, tmp_path)
    assert len(reports) == 4
    assert reports[-1].metrics["accuracy"] > ABOVE_CHANCE
    assert all(len(r.received) == 5 for r in reports)


def test_feddst_keeps_density_at_budget_every_round(tmp_path: Path) -> None:
    """FedDST's promise is a fixed budget: mask voting must re-prune to it every round."""
    reports = simulate(spec("feddst", density=0.3, total_rounds=4, readjust_every=1), SIM, tmp_path)
    with Store(tmp_path, create=False) as store:
        total = None
        for record in store.checkpoints("t"):
            checkpoint = store.load_checkpoint("t", record.version)
            kept = sum(int(m.sum()) for m in checkpoint.masks.values())
            numel = sum(m.size for m in checkpoint.masks.values())
            total = total or kept
            assert kept == total, f"version {record.version} keeps {kept}, budget {total}"
            assert abs(kept / numel - 0.3) < 1e-3
    assert [round(r.density, 3) for r in reports] == [0.3] * 4


def test_feddst_masks_move_when_readjusting(tmp_path: Path) -> None:
    """Readjustment rounds must actually change the global mask (else it is static pruning)."""
    simulate(spec("feddst", total_rounds=4, readjust_every=1, alpha=0.3), SIM, tmp_path)
    with Store(tmp_path, create=False) as store:
        first = store.load_checkpoint("t", 0).masks
        last = store.load_checkpoint("t").masks
    assert any(not np.array_equal(first[n], last[n]) for n in first)


def test_prunefl_density_moves_and_time_model_decreases(tmp_path: Path) -> None:
    """PruneFL prunes the dense start and its modelled round time falls with the density."""
    reports = simulate(spec("prunefl", reconfig_every=2, max_reconfigs=3), SIM, tmp_path)
    assert reports[0].density < 1.0  # the initial pruning happened before round 1
    from fleet.strategies.base import GlobalModel
    from fleet.strategies.prunefl import PruneFLOptions, cost_model

    with Store(tmp_path, create=False) as store:
        dense = store.load_checkpoint("t", 0)
        pruned = store.load_checkpoint("t")
    shapes = {n: w.shape for n, w in dense.weights.items()}
    pruned_names = list(pruned.masks)
    cost = cost_model([(None, 134)], shapes, pruned_names, PruneFLOptions())
    t_dense = cost.time(GlobalModel(0, dense.weights, {}, "mlp"))
    t_pruned = cost.time(GlobalModel(1, pruned.weights, pruned.masks, "mlp"))
    assert t_pruned < t_dense


def final_weights(store_dir: Path, run_id: str = "t") -> dict[str, np.ndarray]:
    with Store(store_dir, create=False) as store:
        return store.load_checkpoint(run_id).weights


def test_same_seed_gives_the_same_final_model(tmp_path: Path) -> None:
    """Reproducibility: seeds come from names, so two runs are bit-identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    simulate(spec("feddst", rounds=3, total_rounds=3, readjust_every=1), SIM, a)
    simulate(spec("feddst", rounds=3, total_rounds=3, readjust_every=1), SIM, b)
    wa, wb = final_weights(a), final_weights(b)
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)


def test_resume_after_stop_gives_the_same_model_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """A restarted fleet manager continues from the store and ends where it would have."""
    full = tmp_path / "full"
    simulate(spec("fedavgm", rounds=3), SIM, full)

    broken = tmp_path / "broken"
    broker = MemoryBroker()
    data = PartitionedData(SIM)
    topics = Topics()
    agents = start_agents(
        lambda d: MemoryTransport(broker, d), SIM, data, topics, fault_plan(SIM), range(10)
    )
    try:
        for stop_after in (1, None):
            store = Store(broken)
            runner = Runner(
                spec("fedavgm", rounds=3),
                MemoryTransport(broker, "fleet-manager"),
                store,
                partition_for=partition_lookup(10),
            )

            def stop_early(
                kind: str, payload: Any, runner: Runner = runner, after: int | None = stop_after
            ) -> None:
                if kind == "round_closed" and payload["report"].round == after:
                    runner.stop()

            runner.on_progress = stop_early
            runner.connect()
            runner.wait_for_devices(10, 10.0)
            reports = runner.run()
            runner.transport.close()
            store.close()
            assert [r.round for r in reports] == ([1] if stop_after else [2, 3])
    finally:
        for agent in agents:
            agent.stop()
    wf, wb = final_weights(full), final_weights(broken)
    assert all(np.array_equal(wf[n], wb[n]) for n in wf)


def test_bad_updates_are_rejected_and_never_touch_the_model(tmp_path: Path) -> None:
    """A device's message must never corrupt the global model: a run in which a forger injects
    bad updates for a selected device ends bit-identical to the same run without them."""
    # All 10 devices are selected and one never answers, so every round stays open until its
    # deadline and the forged messages are judged while the round is open.
    sim = SimSpec(devices=10, dataset="digits", faults=Faults(never_answer=0.1))
    silent = next(d for d, kind in fault_plan(sim).items() if kind == "never")
    run = RunSpec(
        run_id="t",
        model_name="mlp",
        strategy="fedavg",
        rounds=2,
        clients_per_round=10,
        strategy_options={"clients_per_round": 10, "training": TRAINING},
        round_timeout_s=3.0,
    )
    clean = tmp_path / "clean"
    simulate(run, sim, clean)

    topics = Topics()
    broker = MemoryBroker()
    agents = start_agents(
        lambda d: MemoryTransport(broker, d),
        sim,
        PartitionedData(sim),
        topics,
        fault_plan(sim),
        range(10),
    )
    forger = MemoryTransport(broker, "forger")
    forger.connect()
    runner_ref: list[Runner] = []
    forged: list[str] = []

    def forge(kind: str, payload: Any) -> None:
        if kind != "update" or forged:
            return
        round_ = payload["round"]
        model, digest = runner_ref[0].model, runner_ref[0].model_digest
        assert model is not None
        names = sorted(model.weights)
        good = {n: SparseTensor.from_dense(np.zeros_like(model.weights[n])) for n in names}
        nan = {
            **good,
            names[0]: SparseTensor.from_dense(np.full_like(good[names[0]].to_dense(), np.nan)),
        }
        bad_shape = {**good, names[0]: SparseTensor.from_dense(np.zeros((3, 3), np.float32))}
        v = model.version
        variants = {
            "nan": Envelope(DeviceUpdate(v, digest, nan, 10), "t", round_, silent),
            "shape": Envelope(DeviceUpdate(v, digest, bad_shape, 10), "t", round_, silent),
            "round": Envelope(DeviceUpdate(v, digest, good, 10), "t", round_ + 5, silent),
            "device": Envelope(DeviceUpdate(v, digest, good, 10), "t", round_, "sim-0099"),
            "version": Envelope(DeviceUpdate(v + 7, digest, good, 10), "t", round_, silent),
        }
        for name, env in variants.items():
            topic = topics.dev_update(silent, "t", env.round)
            forger.publish(topic, envelope.encode(env))
            forged.append(name)
        forger.publish(topics.dev_update(silent, "t", round_), b"\x00garbage\xff" * 10)
        forged.append("garbage")

    dirty = tmp_path / "dirty"
    store = Store(dirty)
    try:
        runner = Runner(
            run,
            MemoryTransport(broker, "fleet-manager"),
            store,
            partition_for=partition_lookup(10),
            on_progress=forge,
        )
        runner_ref.append(runner)
        runner.connect()
        runner.wait_for_devices(10, 10.0)
        reports = runner.run()
        reasons = store.rejection_counts(run_id="t")
    finally:
        for agent in agents:
            agent.stop()
        store.close()
    assert forged == ["nan", "shape", "round", "device", "version", "garbage"]
    assert {
        "non_finite",
        "wrong_shape",
        "future_round",
        "device_mismatch",
        "wrong_model_version",
    } <= set(reasons), reasons
    assert any(reason.startswith("decode:") for reason in reasons), reasons
    assert reports[0].rejected == 6
    wc, wd = final_weights(clean), final_weights(dirty)
    assert all(np.array_equal(wc[n], wd[n]) for n in wc)


def test_silent_devices_close_the_round_by_deadline(tmp_path: Path) -> None:
    """k-of-n: with devices that never answer, rounds still end (by the deadline)."""
    sim = SimSpec(devices=10, dataset="digits", faults=Faults(never_answer=0.5))
    run = RunSpec(
        run_id="t",
        model_name="mlp",
        strategy="fedavg",
        rounds=2,
        clients_per_round=8,
        strategy_options={"clients_per_round": 8, "training": TRAINING},
        round_timeout_s=1.5,
    )
    reports = simulate(run, sim, tmp_path)
    assert all(r.closed_by == "deadline" for r in reports)
    assert all(0 < len(r.received) < 8 for r in reports)


def test_each_aggregated_round_records_its_aggregation_time(tmp_path: Path) -> None:
    """``aggregate_s`` (wall seconds of aggregation) is what the dashboard and /metrics show
    as the aggregation time; a round that aggregated must carry it."""
    simulate(spec("fedavg", rounds=2), SIM, tmp_path)
    with Store(tmp_path, create=False) as store:
        times = [r.metrics.get("aggregate_s") for r in store.rounds("t")]
    assert len(times) == 2
    assert all(isinstance(t, float) and 0.0 <= t < 60.0 for t in times), times

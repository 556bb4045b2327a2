"""Buffered asynchronous rounds (mode: async): staleness, mask-version mapping, and the loop
end to end over the in-memory broker with a mixed simulated fleet.

Why it matters: an asynchronous fleet manager aggregates updates trained on older models. If a
stale delta landed in the wrong coordinates, or an update were counted twice after a crash, the
global model would silently drift; if a vanished device kept its slot, the run would stall.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.errors import ConfigError, ValidationError
from device.wire import envelope
from device.wire.codec import SparseTensor, model_digest
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import DeviceUpdate, Envelope
from device.wire.topics import Topics
from fleet.runtime.async_judge import judge_update
from fleet.runtime.async_options import AsyncOptions
from fleet.runtime.model_history import ModelHistory
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim import simulate
from fleet.sim.core import (
    Faults,
    PartitionedData,
    SimSpec,
    device_ids,
    fault_plan,
    partition_lookup,
    start_agents,
)
from fleet.sim.fleet_classes import DeviceClass, assign_classes
from fleet.state.store import Store
from fleet.strategies.base import ClientResult, GlobalModel
from fleet.strategies.fedavg import FedAvg
from fleet.strategies.nested import aggregate_nested
from fleet.strategies.staleness import map_to_current, staleness_weight

CLASSES = (
    DeviceClass("slow", 0.5, speed=0.1, memory_mb=512),
    DeviceClass("fast", 0.5, speed=1.0, memory_mb=4096),
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- staleness and mask-version mapping (unit) ---------------------------------------------------


def test_staleness_weight_is_one_over_sqrt_one_plus_s() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(1) == pytest.approx(1 / math.sqrt(2))
    assert staleness_weight(4) == pytest.approx(1 / math.sqrt(5))
    with pytest.raises(ValueError):
        staleness_weight(-1)


def _models() -> tuple[GlobalModel, GlobalModel]:
    """Version 3 (mask: positions 0-3) and version 5 after a readjustment (positions 2-5)."""
    old_mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    new_mask = np.array([0, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    old_w = np.where(old_mask, 1.0, 0.0).astype(np.float32)
    new_w = np.where(new_mask, 2.0, 0.0).astype(np.float32)
    bias_old, bias_new = np.full(2, 1.0, np.float32), np.full(2, 5.0, np.float32)
    old = GlobalModel(3, {"w": old_w, "b": bias_old}, {"w": old_mask}, "mlp")
    new = GlobalModel(5, {"w": new_w, "b": bias_new}, {"w": new_mask}, "mlp")
    return old, new


def test_a_stale_delta_keeps_its_surviving_positions_and_drops_the_rest() -> None:
    old, new = _models()
    # The device trained version 3: +0.4 on positions 0..3, +0.4 on the bias.
    trained = {
        "w": np.where(old.masks["w"], 1.4, 0.0).astype(np.float32),
        "b": old.weights["b"] + 0.4,
    }
    result = ClientResult("d", 10, trained, {"w": old.masks["w"]})
    weight = staleness_weight(2)
    mapped, dropped = map_to_current(result, old, new, weight)
    assert dropped == 2  # positions 0 and 1 left the mask
    assert mapped.masks["w"].tolist() == [False, False, True, True, False, False, False, False]
    np.testing.assert_allclose(mapped.weights["w"][2:4], 2.0 + weight * 0.4, rtol=1e-6)
    assert not mapped.weights["w"][[0, 1, 4, 5, 6, 7]].any()  # joined positions: not held
    np.testing.assert_allclose(mapped.weights["b"], 5.0 + weight * 0.4, rtol=1e-6)


def test_a_fresh_update_maps_to_itself() -> None:
    _, new = _models()
    grown = new.masks["w"].copy()
    grown[7] = True  # a FedDST device's grown position: its vote for the next mask
    trained = {"w": np.where(grown, 2.5, 0.0).astype(np.float32), "b": new.weights["b"] + 1}
    result = ClientResult("d", 10, trained, {"w": grown})
    mapped, dropped = map_to_current(result, new, new, staleness_weight(0))
    assert dropped == 0
    assert np.array_equal(mapped.masks["w"], grown)
    np.testing.assert_array_equal(mapped.weights["w"], trained["w"])


def test_the_staleness_weight_scales_the_aggregated_step() -> None:
    """FedBuff's step: global + n-weighted mean of w(s) * delta, applied by the strategy."""
    old, new = _models()
    trained = {
        "w": np.where(old.masks["w"], 1.4, 0.0).astype(np.float32),
        "b": old.weights["b"] + 0.4,
    }
    stale, _ = map_to_current(ClientResult("a", 10, trained, {"w": old.masks["w"]}), old, new, 0.5)
    fresh_w = {
        "w": np.where(new.masks["w"], 2.2, 0.0).astype(np.float32),
        "b": new.weights["b"] + 0.2,
    }
    fresh = ClientResult("b", 10, fresh_w, {"w": new.masks["w"]})
    aggregated = aggregate_nested(FedAvg(), 1, new, [stale, fresh], {"a": stale.masks})
    np.testing.assert_allclose(aggregated.weights["b"], 5.0 + (0.5 * 0.4 + 0.2) / 2, rtol=1e-6)
    # Positions 4 and 5 joined the mask after the stale update's version: only the fresh one
    # holds them, so its value is not diluted by the stale update's absence.
    np.testing.assert_allclose(aggregated.weights["w"][4:6], 2.2, rtol=1e-6)


def test_model_history_keeps_the_newest_versions() -> None:
    history = ModelHistory(keep=2)
    old, new = _models()
    history.add(old, b"o", None)
    history.add(new, b"n", None)
    assert history.get(3) is None  # 5 - 2 + 1 = 4 is the oldest kept
    held = history.get(5)
    assert held is not None and held.digest == b"n"
    assert history.book_for(5) is not None and history.book_for(4) is None


def test_async_options_are_checked() -> None:
    for bad in (
        {"concurrency": 0},
        {"concurrency": 4, "buffer": 5},
        {"max_staleness": -1},
        {"job_timeout_s": 0},
    ):
        with pytest.raises(ConfigError):
            AsyncOptions(**bad)


def _payload(model: GlobalModel, version: int, digest: bytes, round_: int = 2) -> bytes:
    deltas = {
        name: SparseTensor(
            shape=w.shape,
            mask=model.masks.get(name, np.ones(w.shape, dtype=bool)),
            values=np.full(
                int(model.masks.get(name, np.ones(w.shape, bool)).sum()), 0.1, np.float32
            ),
        )
        for name, w in model.weights.items()
    }
    update = DeviceUpdate(model_version=version, model_digest=digest, deltas=deltas, num_examples=5)
    return envelope.encode(Envelope(body=update, run_id="r", round=round_, device_id="d"))


@pytest.mark.parametrize(
    ("version", "reason"),
    [(9, "future_model_version"), (1, "too_stale"), (3, "unknown_model_version")],
)
def test_updates_naming_an_unusable_model_version_are_rejected(version: int, reason: str) -> None:
    _, new = _models()
    history = ModelHistory(keep=3)  # holds 3..5 once 5 is added, but only 4 and 5 are given
    v4 = GlobalModel(4, new.weights, new.masks, "mlp")
    history.add(v4, model_digest(v4.weights, v4.masks), None)
    history.add(new, model_digest(new.weights, new.masks), None)
    with pytest.raises(ValidationError) as err:
        judge_update(
            _payload(new, version, b"\0" * 32), "d", 2, {}, history, FedAvg(), "r",
            10**6, 3, 5,
        )  # fmt: skip
    assert err.value.reason == reason


def test_an_update_of_a_held_version_is_judged_against_that_version() -> None:
    old, new = _models()
    history = ModelHistory(keep=3)
    for model in (old, new):
        history.add(model, model_digest(model.weights, model.masks), None)
    digest = model_digest(old.weights, old.masks)
    item = judge_update(_payload(old, 3, digest), "d", 2, {}, history, FedAvg(), "r", 10**6, 3, 5)
    assert item.version == 3
    np.testing.assert_allclose(item.result.weights["w"][:4], 1.1, rtol=1e-6)


# -- end to end over the in-memory broker -----------------------------------------------------


def _spec(run_id: str = "t", rounds: int = 8, **async_options: Any) -> RunSpec:
    options = {"concurrency": 6, "buffer": 3, "max_staleness": 3, "job_timeout_s": 20.0}
    options.update(async_options)
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="feddst",
        rounds=rounds,
        clients_per_round=6,
        strategy_options={
            "clients_per_round": 6,
            "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "total_rounds": rounds,
            "readjust_every": 2,
            "density": 0.3,
        },
        round_timeout_s=20.0,
        budgets={"slow": 0.1},
        mode="async",
        async_options=AsyncOptions(**options),
    )


def _assert_counted_once(store: Store, run_id: str) -> int:
    """Every stored update was counted in exactly one aggregation step."""
    rows = [u for r in store.rounds(run_id) for u in store.updates_for_round(run_id, r.round)]
    assert rows
    assert all(u.status == "counted" and u.counted_in_round is not None for u in rows)
    assert not store.undecided_updates(run_id)
    total = sum(int(r.metrics.get("buffered", 0)) for r in store.rounds(run_id))
    assert total == len(rows)
    return total


def test_async_feddst_with_budgets_learns_on_a_mixed_fleet(tmp_path: Path) -> None:
    sim = SimSpec(devices=12, dataset="digits", classes=CLASSES)
    # max_staleness 8: a speed-0.1 device can lag a few versions, and this test wants every
    # update accepted (too_stale is covered by its own test).
    reports = simulate(_spec(max_staleness=8), sim, tmp_path)
    assert len(reports) == 8
    assert all(r.closed_by == "k_of_n" and r.rejected == 0 for r in reports)
    assert reports[-1].metrics["accuracy"] > 0.6
    assert max(r.metrics["staleness_max"] for r in reports) >= 1  # slow devices lag behind
    assert [round(r.density, 3) for r in reports] == [0.3] * 8
    plan = assign_classes(device_ids(12), CLASSES, sim.seed)
    with Store(tmp_path, create=False) as store:
        _assert_counted_once(store, "t")
        assert store.rejection_counts(run_id="t") == {}
        for r in store.rounds("t"):
            for u in store.updates_for_round("t", r.round):
                if plan[u.device_id].name == "slow":
                    assert round(float(u.meta["density"]), 2) == 0.1


def test_a_device_that_stops_answering_frees_its_slot_after_the_job_timeout(
    tmp_path: Path,
) -> None:
    """Silent devices hold their slots only for job_timeout_s: once freed they are commanded
    again (they are still online), which could not happen if they held their slots forever."""
    sim = SimSpec(devices=6, dataset="digits", faults=Faults(never_answer=0.34))
    silent = {d for d, kind in fault_plan(sim).items() if kind == "never"}
    assert len(silent) == 2
    # 30 steps of at least one local job each last well over 0.3 s, so the silent devices'
    # slots must have timed out (and they are commanded again) before the run ends.
    run = _spec(rounds=30, concurrency=6, buffer=2, job_timeout_s=0.3)
    reports = simulate(run, SimSpec(devices=6, dataset="digits", faults=sim.faults), tmp_path)
    commanded = [d for r in reports for d in r.selected if d in silent]
    assert len(commanded) > len(silent), f"silent devices commanded only {commanded}"


class _Crash(BaseException):
    """Stands for kill -9: nothing of the runner's in-memory state survives, nothing is
    cleaned up (a BaseException passes the runner's own exception handlers)."""


def test_async_resume_after_a_crash_counts_no_update_twice(tmp_path: Path) -> None:
    sim = SimSpec(devices=12, dataset="digits", classes=CLASSES)
    broker = MemoryBroker()
    topics = Topics()
    data = PartitionedData(sim)
    agents = start_agents(
        lambda d: MemoryTransport(broker, d), sim, data, topics, fault_plan(sim), range(12)
    )
    try:
        store = Store(tmp_path)
        runner = Runner(
            _spec(rounds=6),
            MemoryTransport(broker, "fleet-manager"),
            store,
            partition_for=partition_lookup(12),
        )
        seen: list[int] = []

        def crash_mid_step(kind: str, payload: Any) -> None:
            if kind == "update" and payload["round"] == 3:
                seen.append(payload["received"])
                if len(seen) == 2:  # two updates of step 3 are stored and acknowledged
                    raise _Crash

        runner.on_progress = crash_mid_step
        runner.connect()
        runner.wait_for_devices(12, 10.0)
        with pytest.raises(_Crash):
            runner.run()
        kill = getattr(runner.transport, "kill", None)
        assert kill is not None
        kill()
        store.close()
        with Store(tmp_path, create=False) as store:
            open_round = store.find_open_round("t")
            assert open_round is not None and open_round.round == 3
            assert len(store.undecided_updates("t")) >= 2
            resumed = Runner(
                _spec(rounds=6),
                MemoryTransport(broker, "fleet-manager"),
                store,
                partition_for=partition_lookup(12),
            )
            resumed.connect()
            resumed.wait_for_devices(12, 10.0)
            reports = resumed.run()
            assert [r.round for r in reports] == [3, 4, 5, 6]
            _assert_counted_once(store, "t")
            assert store.get_run("t").status == "finished"
    finally:
        for agent in agents:
            agent.stop()


def test_an_async_run_spec_survives_its_json_form() -> None:
    """fleet run resume relaunches from the stored JSON: mode and options must come back."""
    spec = _spec(max_staleness=2)
    again = RunSpec.from_json(spec.to_json())
    assert again.mode == "async" and again.async_options == spec.async_options
    assert again.budgets == spec.budgets

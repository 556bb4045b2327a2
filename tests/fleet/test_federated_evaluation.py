"""Federated evaluation: sampling, the weighted combination, reply validation, and the runner's
evaluations over the in-memory broker with real agents (digits + mlp, so each run is short)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.agent import AgentOptions, DeviceAgent
from device.errors import ValidationError
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import JobState
from device.wire.topics import Topics
from fleet.runtime.evaluation import EvaluationReply, check_reply, combine, sample_devices
from fleet.runtime.runner import Runner, RunSpec
from fleet.runtime.spec import FederatedEvaluation
from fleet.sim.core import PartitionedData, SimSpec, device_ids, partition_lookup, start_agents
from fleet.state.store import Store

TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.05}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- the pure parts ---------------------------------------------------------------------------


def test_combine_weights_each_device_by_its_examples() -> None:
    """A device with 3x the examples counts 3x: the result is the accuracy over all examples
    pooled, not the mean of the devices' accuracies."""
    replies = [
        EvaluationReply("a", loss=0.5, accuracy=0.9, examples=300),
        EvaluationReply("b", loss=2.0, accuracy=0.3, examples=100),
    ]
    out = combine(replies)
    assert out["federated_accuracy"] == pytest.approx(np.average([0.9, 0.3], weights=[300, 100]))
    assert out["federated_loss"] == pytest.approx(np.average([0.5, 2.0], weights=[300, 100]))
    assert out["federated_examples"] == 400 and out["federated_devices"] == 2
    assert out["federated_accuracy"] != pytest.approx(0.6)  # not the unweighted mean


def test_combine_of_nothing_is_nothing() -> None:
    assert combine([]) == {}


def test_a_believable_reply_is_accepted_as_sent() -> None:
    reply = check_reply("a", {"loss": 0.7, "accuracy": 0.8, "examples": 40.0}, limit=40)
    assert reply == EvaluationReply("a", 0.7, 0.8, 40)


def test_a_reply_claiming_more_examples_than_the_device_has_is_rejected() -> None:
    """The example count weights the combination: a device inflating it would dominate the
    federated accuracy, so it may not exceed what the device reported having."""
    with pytest.raises(ValidationError) as info:
        check_reply("a", {"loss": 0.7, "accuracy": 0.8, "examples": 41.0}, limit=40)
    assert info.value.reason == "eval_examples"
    with pytest.raises(ValidationError):  # a device that reported nothing has nothing
        check_reply("a", {"loss": 0.7, "accuracy": 0.8, "examples": 1.0}, limit=0)


@pytest.mark.parametrize(
    "metrics",
    [
        {"loss": math.nan, "accuracy": 0.8, "examples": 10.0},
        {"loss": -0.1, "accuracy": 0.8, "examples": 10.0},
        {"loss": 0.5, "accuracy": 1.2, "examples": 10.0},
        {"loss": 0.5, "accuracy": 0.8, "examples": 0.0},
        {"loss": 0.5, "accuracy": 0.8, "examples": 2.5},
        {"loss": 0.5, "accuracy": 0.8},
        {"loss": 0.5, "accuracy": math.inf, "examples": 10.0},
    ],
)
def test_malformed_metrics_are_rejected(metrics: dict[str, float]) -> None:
    with pytest.raises(ValidationError) as info:
        check_reply("a", metrics, limit=100)
    assert info.value.reason == "eval_metrics"


def test_sample_size_is_the_fraction_but_at_least_min_devices() -> None:
    pool = [f"d{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    assert len(sample_devices(pool, FederatedEvaluation(fraction=0.25), rng)) == 3  # ceil 2.5
    assert len(sample_devices(pool, FederatedEvaluation(fraction=0.1, min_devices=4), rng)) == 4
    assert sample_devices(pool[:2], FederatedEvaluation(min_devices=5), rng) == ["d0", "d1"]
    assert sample_devices([], FederatedEvaluation(), rng) == []


def test_the_sample_is_a_pure_function_of_the_seed() -> None:
    pool = [f"d{i}" for i in range(20)]
    settings = FederatedEvaluation(fraction=0.3)
    first = sample_devices(pool, settings, np.random.default_rng(7))
    assert first == sample_devices(list(reversed(pool)), settings, np.random.default_rng(7))
    assert set(first) <= set(pool) and first == sorted(first) and len(set(first)) == 6


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"every": 0}, "every"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"min_devices": 0}, "min_devices"),
        ({"timeout_s": 0.0}, "timeout_s"),
    ],
)
def test_settings_out_of_range_are_refused(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FederatedEvaluation(**settings)


def test_every_nth_round_and_the_last_are_due() -> None:
    settings = FederatedEvaluation(every=2)
    assert [r for r in range(1, 6) if settings.due(r, 5)] == [2, 4, 5]


def test_the_settings_survive_the_stored_spec() -> None:
    """A resumed run must evaluate as the started one did: the settings travel in RunSpec's
    JSON."""
    spec = _spec(rounds=2, evaluate=FederatedEvaluation(every=2, fraction=0.5, timeout_s=9.0))
    assert RunSpec.from_json(spec.to_json()) == spec


# -- through the runner -----------------------------------------------------------------------


def _spec(rounds: int, evaluate: FederatedEvaluation | None, run_id: str = "fe") -> RunSpec:
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="fedavg",
        rounds=rounds,
        clients_per_round=2,
        strategy_options={"clients_per_round": 2, "training": TRAINING},
        round_timeout_s=30.0,
        evaluate=evaluate,
    )


class _Inflating(DeviceAgent):
    """A device that claims 1000 more evaluation examples than it evaluated on."""

    def _event_for(self, job: Any, state: JobState, reason: str = "", metrics: Any = None) -> None:
        if state is JobState.EVALUATED and metrics:
            metrics = {**metrics, "examples": metrics["examples"] + 1000}
        super()._event_for(job, state, reason, metrics)


def _run(
    tmp_path: Path, spec: RunSpec, sim: SimSpec, liar: str | None = None
) -> tuple[Store, list[Any], PartitionedData]:
    broker, topics = MemoryBroker(), Topics()
    data = PartitionedData(sim)
    honest = [i for i, d in enumerate(device_ids(sim.devices)) if d != liar]
    agents = start_agents(lambda d: MemoryTransport(broker, d), sim, data, topics, {}, honest)
    if liar is not None:
        index = device_ids(sim.devices).index(liar)
        counts = data.counts(index)
        agent = _Inflating(
            MemoryTransport(broker, liar),
            data.source_for(index),
            AgentOptions(
                device_id=liar, dataset_size=counts.train, eval_examples=counts.evaluation
            ),
        )
        agent.start()
        agents.append(agent)
    store = Store(tmp_path / "state")
    reports: list[Any] = []
    try:
        runner = Runner(
            spec,
            MemoryTransport(broker, "fleet-manager"),
            store,
            topics=topics,
            partition_for=partition_lookup(sim.devices),
            on_progress=lambda kind, p: (
                reports.append(p["report"]) if kind == "round_closed" else None
            ),
        )
        runner.connect()
        runner.wait_for_devices(sim.devices, 10.0)
        runner.run()
        runner.transport.close()
    finally:
        for agent in agents:
            agent.stop()
    return store, reports, data


def test_due_rounds_store_the_devices_combined_measure(tmp_path: Path) -> None:
    """Rounds 2 and 3 (every 2, and the last) carry federated metrics computed from the
    sampled devices' test shares; round 1 has none. No server-side test set is needed."""
    sim = SimSpec(devices=4, dataset="digits")
    spec = _spec(rounds=3, evaluate=FederatedEvaluation(every=2, fraction=0.5, min_devices=2))
    store, reports, data = _run(tmp_path, spec, sim)
    with store:
        rounds = {r.round: r.metrics for r in store.rounds("fe")}
    assert "federated_accuracy" not in rounds[1]
    shares = [data.counts(i).evaluation for i in range(4)]
    for round_ in (2, 3):
        metrics = rounds[round_]
        assert metrics["federated_devices"] == 2  # ceil(0.5 * 4)
        assert 0.0 <= metrics["federated_accuracy"] <= 1.0 and metrics["federated_loss"] > 0
        # Two of the four devices' shares, whichever two the seeded sample took.
        pairs = {shares[i] + shares[j] for i in range(4) for j in range(i + 1, 4)}
        assert metrics["federated_examples"] in pairs
        assert "accuracy" not in metrics  # no server-side evaluator in this run
    # The live view (progress callback) sees the same figures as the store.
    assert reports[1].metrics["federated_accuracy"] == rounds[2]["federated_accuracy"]


def test_an_inflated_reply_is_rejected_counted_and_left_out(tmp_path: Path) -> None:
    sim = SimSpec(devices=3, dataset="digits")
    spec = _spec(rounds=1, evaluate=FederatedEvaluation(fraction=1.0, min_devices=1))
    store, _, data = _run(tmp_path, spec, sim, liar="sim-0001")
    with store:
        metrics = store.get_round("fe", 1).metrics
        rejections = store.rejections(run_id="fe")
    assert metrics["federated_devices"] == 2 and metrics["federated_rejected"] == 1
    assert metrics["federated_examples"] == data.counts(0).evaluation + data.counts(2).evaluation
    assert [(r.device_id, r.reason) for r in rejections] == [("sim-0001", "eval_examples")]


def test_too_few_answers_store_no_accuracy(tmp_path: Path) -> None:
    """Below min_devices the combination would not represent the fleet: it is skipped, and
    says so, rather than stored as if it did."""
    sim = SimSpec(devices=2, dataset="digits")
    spec = _spec(rounds=1, evaluate=FederatedEvaluation(min_devices=3, timeout_s=5.0))
    store, _, _ = _run(tmp_path, spec, sim)
    with store:
        metrics = store.get_round("fe", 1).metrics
    assert "federated_accuracy" not in metrics
    assert metrics["federated_skipped"] == 1 and metrics["federated_devices"] == 2

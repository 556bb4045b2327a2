"""A device's round job: the snapshot it trains from, and the kernels its profile picks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import device.agent as agent_module
from device.agent import AgentOptions, DeviceAgent
from device.data import Dataset
from device.errors import ConfigError
from device.job import (
    kernel_plan_for,
    load_model,
    run_round_job,
    snapshot_tensors,
    start_values_on_masks,
)
from device.models import create_model
from device.sparse.masks import initial_masks
from device.sparse.nested import nested_masks
from device.trainer import train_round
from device.wire import envelope
from device.wire.codec import model_digest
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import (
    DeviceProfile,
    DeviceUpdate,
    Envelope,
    LayerProfile,
    LocalTraining,
    ModelSnapshot,
    ProfilePoint,
    RoundCommand,
)
from device.wire.sparse_weights import SparseWeights
from device.wire.topics import Topics

torch.set_num_threads(1)

SETTINGS = LocalTraining(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)


@dataclass(frozen=True)
class Data:
    x: torch.Tensor
    y: torch.Tensor


def make_data(n: int = 32) -> Data:
    g = torch.Generator().manual_seed(0)
    return Data(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def make_snapshot(density: float = 0.3) -> ModelSnapshot:
    """An ``mlp`` global model as a device receives it: weights zero off the masks, read-only."""
    model = create_model("mlp", seed=1)
    weights = dict(model.named_parameters())
    masks = initial_masks(
        {n: weights[n] for n in ("fc1.weight", "fc2.weight")},
        {"fc1.weight": density, "fc2.weight": density},
    )
    arrays = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    mask_arrays = {n: m.numpy().copy() for n, m in masks.items()}
    for name, mask in mask_arrays.items():
        arrays[name][~mask] = 0.0
    for array in (*arrays.values(), *mask_arrays.values()):
        array.flags.writeable = False  # as decoded from the wire
    return ModelSnapshot("mlp", 3, model_digest(arrays, mask_arrays), 3, arrays, mask_arrays)


def profile_of(model_name: str, fc1_sparse_s: dict[float, float]) -> DeviceProfile:
    """A profile in which fc1's sparse step takes ``fc1_sparse_s[d]`` against 1 ms dense."""
    return DeviceProfile(
        model_name=model_name,
        batch_size=8,
        step_overhead_s=1e-4,
        layers=(
            LayerProfile(
                "fc1.weight",
                64 * 64,
                tuple(ProfilePoint(d, 1e-3, s) for d, s in sorted(fc1_sparse_s.items())),
            ),
            LayerProfile(
                "fc2.weight", 64 * 10, tuple(ProfilePoint(d, 1e-4, 1e-3) for d in (0.1, 1.0))
            ),
        ),
    )


FC1_WINS_BELOW_HALF = {0.1: 2e-4, 0.3: 4e-4, 0.5: 1.2e-3, 1.0: 3e-3}


def test_the_plan_follows_the_profile_at_the_snapshots_densities() -> None:
    """A layer computes sparsely only where this device measured that to be faster."""
    profile = profile_of("mlp", FC1_WINS_BELOW_HALF)
    assert kernel_plan_for(profile, make_snapshot(0.3)) == {"fc1.weight"}
    assert kernel_plan_for(profile, make_snapshot(1.0)) == frozenset()


def test_under_a_density_budget_the_plan_follows_the_budgets_densities() -> None:
    """A device trains its nested subnetwork, so the plan is chosen at that density: a layer
    whose sparse step only wins below the global density computes sparsely under a budget."""
    profile = profile_of("mlp", {0.1: 2e-4, 0.3: 2e-3, 1.0: 3e-3})
    snapshot = make_snapshot(0.3)
    assert kernel_plan_for(profile, snapshot) == frozenset()
    assert kernel_plan_for(profile, snapshot, budget=0.1) == {"fc1.weight"}
    assert kernel_plan_for(profile, snapshot, budget=0.5) == frozenset()  # above: the global mask


def test_no_profile_or_a_profile_of_another_model_plans_nothing() -> None:
    """Times measured on other shapes say nothing about this model's layers."""
    snapshot = make_snapshot(0.3)
    assert kernel_plan_for(None, snapshot) == frozenset()
    assert kernel_plan_for(profile_of("mnist_cnn", FC1_WINS_BELOW_HALF), snapshot) == frozenset()


def test_a_round_job_trains_from_the_snapshot_without_writing_it() -> None:
    """The job lends the snapshot to the trainer as the round's start (no copy of its own):
    the update must be the one a trainer with its own copy computes, and the snapshot, which
    the agent keeps for later rounds, must not change by a bit."""
    snapshot = make_snapshot(0.3)
    before = {n: a.copy() for n, a in snapshot.weights.items()}
    command = RoundCommand(model_version=3, model_digest=snapshot.digest, training=SETTINGS)
    data = make_data()
    update = run_round_job(snapshot, command, data, seed=5)  # type: ignore[arg-type]

    model, masks = load_model(snapshot)
    reference = train_round(model, masks, data, SETTINGS, seed=5)
    for name, delta in update.deltas.items():
        mask = reference.masks.get(name, torch.ones_like(reference.deltas[name], dtype=torch.bool))
        np.testing.assert_array_equal(delta.values, reference.deltas[name][mask].numpy())
    for name, array in snapshot.weights.items():
        np.testing.assert_array_equal(array, before[name])


def test_start_weights_that_do_not_match_the_model_are_refused() -> None:
    snapshot = make_snapshot(0.3)
    model, masks = load_model(snapshot)
    held = {n: torch.zeros(2) for n in snapshot.weights}
    with pytest.raises(
        ConfigError, match=r"start weight 'fc1.weight' has shape \(2,\), the model \(64, 64\)"
    ):
        train_round(model, masks, make_data(), SETTINGS, seed=1, start_weights=held)
    with pytest.raises(ConfigError, match=r"start weights name entries the model lacks: \['x'\]"):
        train_round(
            model, masks, make_data(), SETTINGS, seed=1, start_weights={"x": held["fc1.bias"]}
        )


def test_start_weights_for_some_entries_give_the_same_round() -> None:
    """The caller may hold the start of some entries only (a device keeps pruned tensors sparse):
    the round keeps the rest itself and the deltas are the same."""
    snapshot = make_snapshot(0.3)
    updates = []
    for names in (None, ("fc1.bias",), ()):
        model, masks = load_model(snapshot)
        held = None
        if names is not None:
            held = {n: torch.from_numpy(np.array(snapshot.weights[n])) for n in names}
        updates.append(train_round(model, masks, make_data(), SETTINGS, seed=1, start_weights=held))
    for other in updates[1:]:
        for name, delta in updates[0].deltas.items():
            assert torch.equal(other.deltas[name], delta), name


def test_the_agent_trains_with_the_kernels_its_profile_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device with a profile must use it: the round job gets the plan the profile picks."""
    plans: list[frozenset[str]] = []
    real = agent_module.run_round_job

    def spy(*args: object, **kwargs: object) -> DeviceUpdate:
        plans.append(kwargs["kernel_plan"])  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_module, "run_round_job", spy)
    broker, topics = MemoryBroker(), Topics()
    data = make_data()
    dataset = Dataset(x=data.x, y=data.y, num_classes=10)
    agent = DeviceAgent(
        MemoryTransport(broker, "dev-1"),
        lambda partition: dataset,
        AgentOptions(device_id="dev-1", profile=profile_of("mlp", FC1_WINS_BELOW_HALF)),
    )
    fleet = MemoryTransport(broker, "fleet-manager")
    fleet.connect()
    fleet.subscribe(topics.all_updates())
    agent.start()
    try:
        snapshot = make_snapshot(0.3)
        fleet.publish(
            topics.run_model("run-1"),
            envelope.encode(Envelope(body=snapshot, run_id="run-1")),
            retain=True,
        )
        command = RoundCommand(model_version=3, model_digest=snapshot.digest, training=SETTINGS)
        fleet.publish(
            topics.dev_cmd("dev-1"),
            envelope.encode(Envelope(body=command, run_id="run-1", round=1, device_id="dev-1")),
        )
        message = fleet.get(timeout_s=30.0)
    finally:
        agent.stop(timeout_s=5.0)
    assert message is not None, "no update arrived"
    assert plans == [frozenset({"fc1.weight"})]


@pytest.mark.parametrize("prox_mu", [0.0, 0.01])
def test_a_snapshot_kept_sparse_trains_the_same_round_as_a_dense_one(prox_mu: float) -> None:
    """The agent keeps received models with their weights sparse (``SparseWeights``): a round
    job from such a snapshot gives the update of the dense snapshot, bit for bit, FedProx too."""
    dense = make_snapshot(0.1)
    payload = envelope.encode(Envelope(body=dense, run_id="r"))
    kept = envelope.decode(payload, sparse_weights=True).body
    assert isinstance(kept, ModelSnapshot) and isinstance(kept.weights, SparseWeights)
    training = LocalTraining(epochs=1, batch_size=8, lr=0.05, momentum=0.9, prox_mu=prox_mu)
    command = RoundCommand(model_version=3, model_digest=dense.digest, training=training)
    updates = [run_round_job(s, command, make_data(), seed=5) for s in (dense, kept)]
    for name, delta in updates[0].deltas.items():
        other = updates[1].deltas[name]
        assert np.array_equal(other.mask, delta.mask), name
        assert np.array_equal(other.values, delta.values), name


def test_a_sparse_snapshots_kept_values_are_the_rounds_start_where_its_masks_are() -> None:
    """The start of a pruned tensor on its mask is the received model's own kept values
    (shared, not copied), only where the round starts on the mask they travelled with: not
    under a density budget's nested mask, nor for a dense snapshot."""
    dense = make_snapshot(0.1)
    kept = envelope.decode(envelope.encode(Envelope(body=dense, run_id="r")), sparse_weights=True)
    snapshot = kept.body
    assert isinstance(snapshot, ModelSnapshot) and isinstance(snapshot.weights, SparseWeights)
    masks = snapshot_tensors(snapshot.masks)
    held = start_values_on_masks(snapshot.weights, masks)
    assert set(held) == {"fc1.weight", "fc2.weight"}
    for name, values in held.items():
        sparse = snapshot.weights.sparse(name)
        assert sparse is not None
        assert values.data_ptr() == sparse.values.ctypes.data
    nested = snapshot_tensors(nested_masks(snapshot.weights, snapshot.masks, 0.05))
    assert start_values_on_masks(snapshot.weights, nested) == {}
    assert start_values_on_masks(dense.weights, masks) == {}

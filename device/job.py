"""One device job as a pure function: global model + command + local data -> update.

Kept apart from the agent (which does the networking) so that the same code runs in the agent's
worker thread, in a simulation's process pool, and in tests without a transport. Everything in and
out is picklable plain data (numpy arrays and dataclasses).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from device.data import Dataset
from device.model_id import check_model, snapshot_ref
from device.models import empty_model
from device.prune_init import initial_prune
from device.seeding import derive_seed
from device.sparse.nested import nested_densities, nested_masks
from device.trainer import RoundResult, evaluate, train_round
from device.wire.codec import SparseTensor, model_digest
from device.wire.messages import (
    BoolArray,
    DeviceProfile,
    DeviceUpdate,
    EvaluateCommand,
    FloatArray,
    InitialPruneCommand,
    InitialPruneResult,
    ModelSnapshot,
    RoundCommand,
)
from device.wire.sparse_weights import SparseWeights


def job_seed(run_id: str, round_: int, device_id: str) -> int:
    """The seed of a device's local round: blake2b of ``run/round/device`` (never ``hash()``)."""
    return derive_seed(run_id, round_, device_id)


def load_model(snapshot: ModelSnapshot) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Build the snapshot's model with its weights and its masks (bool tensors, by name).

    The weights are copied into the model once, one tensor at a time (the snapshot stays the
    caller's, unchanged; weights kept sparse, ``SparseWeights``, are made dense one by one);
    the masks are shared with the snapshot, read-only like every mask here. The model is built
    from the snapshot's reference (``device.model_id.snapshot_ref``) and must have the
    snapshot's architecture digest (``ArchitectureMismatchError`` otherwise, before any weight
    is loaded).
    """
    model = empty_model(snapshot_ref(snapshot))
    check_model(model, snapshot)
    state = model.state_dict()
    missing = set(state) - set(snapshot.weights)
    extra = set(snapshot.weights) - set(state)
    if missing or extra:
        raise ValueError(
            f"model {snapshot.model_name!r} does not match the snapshot: "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for name in state:
        model.load_state_dict(snapshot_tensors({name: snapshot.weights[name]}), strict=False)
    return model, snapshot_tensors(snapshot.masks)


def snapshot_tensors(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, torch.Tensor]:
    """Tensors that share memory with a snapshot's arrays (no copy), to be read, never written.

    Decoded snapshots hold read-only arrays (views of the received payload); torch warns that
    it cannot protect them, which is moot here, so that one warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(np.asarray(array)) for name, array in arrays.items()}


def start_values_on_masks(
    weights: Mapping[str, npt.NDArray[Any]], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The kept values of the received model's pruned tensors whose round starts on the mask
    they travelled with (no density budget), shared, not copied: the round's start of those
    tensors on their masks (``train_round(start_on_masks=...)``)."""
    if not isinstance(weights, SparseWeights):
        return {}
    found: dict[str, npt.NDArray[Any]] = {}
    for name, mask in masks.items():
        sparse = weights.sparse(name) if name in weights else None
        if sparse is not None and torch.equal(snapshot_tensors({name: sparse.mask})[name], mask):
            found[name] = sparse.values
    return snapshot_tensors(found)


def to_update(
    snapshot: ModelSnapshot, result: RoundResult, *, train_s: float, download_s: float = 0.0
) -> DeviceUpdate:
    """Turn a trainer result into the wire dataclass: deltas on the device's final masks."""
    deltas: dict[str, SparseTensor] = {}
    for name in snapshot.weights:  # the names only: deltas have the weights' shapes
        delta = result.deltas[name].detach().cpu().numpy().astype(np.float32, copy=False)
        if name in result.masks:
            mask: BoolArray = result.masks[name].cpu().numpy().astype(bool, copy=False)
        else:
            mask = np.ones(delta.shape, dtype=bool)
        # All kept (dense tensors, density 1): the values are the delta itself, not a copy.
        values = delta.reshape(-1) if mask.all() else delta[mask]
        deltas[name] = SparseTensor(
            shape=tuple(delta.shape), mask=mask, values=np.ascontiguousarray(values)
        )
    importance: dict[str, FloatArray] = {
        name: g.detach().cpu().numpy().astype(np.float32, copy=False)
        for name, g in result.importance.items()
    }
    return DeviceUpdate(
        model_version=snapshot.version,
        model_digest=snapshot.digest,
        deltas=deltas,
        num_examples=result.num_examples,
        importance=importance,
        local_steps=result.local_steps,
        train_s=train_s,
        download_s=download_s,
        metrics=dict(result.metrics),
    )


def kernel_plan_for(
    profile: DeviceProfile | None, snapshot: ModelSnapshot, budget: float = 0.0
) -> frozenset[str]:
    """The pruned weights to compute with sparse kernels this round (empty: masked dense).

    ``choose_plan`` at the densities the device trains at (the snapshot's masks, or under a
    density ``budget`` > 0 their nested subnetwork's), when this device's profile was
    measured on the snapshot's model; without a profile, or with one of another model, every
    layer stays masked dense (a profile of other shapes says nothing about these). A FedDST
    readjustment keeps each layer's density, so the plan holds for the whole round.
    """
    if profile is None or profile.model_name != snapshot.model_name or not snapshot.masks:
        return frozenset()
    from device.sparse.kernels import choose_plan  # lazy: a device without a profile never needs it

    # The densities the device trains at: the nested subnetwork's under a density budget.
    return choose_plan(profile, nested_densities(snapshot.masks, budget))


def run_round_job(
    snapshot: ModelSnapshot,
    command: RoundCommand,
    data: Dataset,
    *,
    seed: int,
    kernel_plan: frozenset[str] = frozenset(),
    download_s: float = 0.0,
) -> DeviceUpdate:
    """Train the snapshot's sparse subnetwork on ``data`` as ``command`` says; return the update."""
    model, masks = load_model(snapshot)
    if command.density_budget > 0.0:
        # A density budget: train the nested subnetwork of the global mask (the largest
        # magnitudes of each layer's kept weights, device.sparse.nested). The deltas are still
        # taken against the snapshot, so the fleet manager adds them to the global weights.
        masks = snapshot_tensors(
            nested_masks(snapshot.weights, snapshot.masks, command.density_budget)
        )
    # The snapshot is the round's start where it holds dense arrays (and FedProx's reference):
    # the trainer copies none of those. Weights kept sparse (SparseWeights, as the agent keeps
    # them) hold only their fully kept tensors as arrays; the trainer keeps the pruned ones'
    # start on their masks, not a dense copy.
    weights = snapshot.weights
    held = snapshot_tensors(weights.views() if isinstance(weights, SparseWeights) else weights)
    held_on_masks = start_values_on_masks(weights, masks)
    reference = None
    if command.training.prox_mu > 0:
        reference = snapshot_tensors({name: weights[name] for name in weights})
    start = time.perf_counter()
    result = train_round(
        model,
        masks,
        data,
        command.training,
        seed=seed,
        readjust=command.readjust,
        report_importance=command.report_importance,
        global_weights=reference,
        kernel_plan=kernel_plan,
        start_weights=held,
        start_on_masks=held_on_masks,
        deltas_in_place=True,  # the model is this job's scratch: only the update leaves it
    )
    return to_update(snapshot, result, train_s=time.perf_counter() - start, download_s=download_s)


def run_evaluate_job(
    snapshot: ModelSnapshot, command: EvaluateCommand, data: Dataset
) -> Mapping[str, float]:
    """Evaluate the snapshot on local data: ``{"loss": mean loss, "accuracy": 0..1}``."""
    del command  # the version check happens before the job runs
    model, _ = load_model(snapshot)
    loss, accuracy = evaluate(model, data)
    return {"loss": loss, "accuracy": accuracy, "examples": float(len(data.y))}


def run_initial_prune_job(
    snapshot: ModelSnapshot, command: InitialPruneCommand, data: Dataset, *, seed: int
) -> InitialPruneResult:
    """PruneFL's initial pruning on local data; the result is the pruned model (version + 1)."""
    model, _ = load_model(snapshot)
    start = time.perf_counter()
    state, masks, history = initial_prune(
        model,
        data,
        command.training,
        cost_per_param=command.cost_per_param_s,
        c0=command.fixed_cost_s,
        seed=seed,
        rounds_per_reconfig=command.rounds_per_reconfig,
        max_reconfigs=command.max_reconfigs,
        stable_change=command.stable_change,
        stable_count=command.stable_count,
        protect_fraction=command.protect_fraction,
    )
    train_s = time.perf_counter() - start
    weights = {n: t.detach().cpu().numpy().astype(np.float32) for n, t in state.items()}
    mask_arrays = {n: m.cpu().numpy().astype(bool) for n, m in masks.items()}
    pruned = ModelSnapshot(
        model_name=snapshot.model_name,
        version=snapshot.version + 1,
        digest=model_digest(weights, mask_arrays),
        mask_version=snapshot.version + 1,
        weights=weights,
        masks=mask_arrays,
        model_ref=snapshot.model_ref,
        architecture_digest=snapshot.architecture_digest,
        classes=snapshot.classes,
    )
    return InitialPruneResult(
        model=pruned, reconfigs=len(history) - 1, densities=tuple(history[1:]), train_s=train_s
    )

"""``check_sparse`` must be ``reconstruct`` + ``strategy.check_result``, only cheaper.

The sharded aggregator validates on the sparse representation for speed (issue 9). A check
that the sparse path skipped or weakened would let a malformed update into the aggregate, so
every case here runs both paths on the same update and demands the same verdict: the same
``ValidationError`` reason and message, or the same accepted result and the same exact sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from device.errors import ValidationError
from device.wire.codec import SparseTensor, model_digest
from device.wire.messages import DeviceUpdate
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import Accumulator
from fleet.strategies.base import ClientResult, GlobalModel, Strategy
from fleet.strategies.fedavg import FedAvg
from fleet.strategies.validate import ModelIndex, SparseResult, check_sparse, reconstruct

STRATEGIES = ["fedavg", "fedavgm", "prunefl", "feddst"]
SHAPES = {"conv.weight": (6, 5), "fc.weight": (4, 7), "fc.bias": (4,)}


def _model() -> GlobalModel:
    rng = np.random.default_rng(3)
    weights, masks = {}, {}
    for name, shape in SHAPES.items():
        w = rng.standard_normal(shape).astype(np.float32)
        if name != "fc.bias":
            mask = rng.random(shape) < 0.4
            masks[name] = mask
            w = np.where(mask, w, 0).astype(np.float32)
        weights[name] = w
    return GlobalModel(2, weights, masks, "tiny")


MODEL = _model()
DIGEST = model_digest(MODEL.weights, MODEL.masks)


def _update(**changes: object) -> DeviceUpdate:
    """A valid update on the global masks (their own arrays, as an IMPLIED decode gives)."""
    rng = np.random.default_rng(4)
    deltas = {}
    for name, w in MODEL.weights.items():
        mask = MODEL.masks.get(name, np.ones(w.shape, dtype=bool))
        values = (rng.standard_normal(int(mask.sum())) * 0.1).astype(np.float32)
        deltas[name] = SparseTensor(w.shape, mask, values)
    base = DeviceUpdate(2, DIGEST, deltas, num_examples=37, metrics={"loss": 0.5})
    return replace(base, **changes)  # type: ignore[arg-type]


def _with_delta(name: str, tensor: SparseTensor) -> DeviceUpdate:
    u = _update()
    return replace(u, deltas={**u.deltas, name: tensor})


def _moved_mask(name: str, keep_count: bool) -> SparseTensor:
    """The global mask of ``name`` with one position moved (or one added)."""
    mask = MODEL.masks[name].copy()
    on, off = np.flatnonzero(mask), np.flatnonzero(~mask.reshape(-1))
    flat = mask.reshape(-1)
    flat[off[0]] = True
    if keep_count:
        flat[on[0]] = False
    return SparseTensor(mask.shape, mask, np.full(int(mask.sum()), 0.01, dtype=np.float32))


def _cases() -> dict[str, DeviceUpdate]:
    u = _update()
    conv = u.deltas["conv.weight"]
    nan = conv.values.copy()
    nan[1] = np.nan
    bias = u.deltas["fc.bias"]
    partial = np.ones(4, dtype=bool)
    partial[2] = False
    copy_mask = SparseTensor(conv.shape, conv.mask.copy(), conv.values)
    imp = {n: np.ones(SHAPES[n], dtype=np.float32) for n in MODEL.masks}
    return {
        "valid": u,
        "valid_mask_copy": _with_delta("conv.weight", copy_mask),
        "wrong_version": replace(u, model_version=1),
        "wrong_digest": replace(u, model_digest=b"\x00" * len(DIGEST)),
        "zero_examples": replace(u, num_examples=0),
        "too_many_examples": replace(u, num_examples=10**9 + 1),
        "missing_tensor": replace(u, deltas={k: v for k, v in u.deltas.items() if k != "fc.bias"}),
        "unknown_tensor": replace(u, deltas={**u.deltas, "extra": bias}),
        "wrong_shape": _with_delta(
            "fc.bias", SparseTensor((2, 2), np.ones((2, 2), bool), bias.values)
        ),
        "nan_delta": _with_delta("conv.weight", SparseTensor(conv.shape, conv.mask, nan)),
        "inf_after_add": _with_delta(
            "conv.weight",
            SparseTensor(conv.shape, conv.mask, np.full(conv.values.size, 3.4e38, np.float32)),
        ),
        "partial_mask_on_dense": _with_delta(
            "fc.bias", SparseTensor((4,), partial, bias.values[:3].copy())
        ),
        "foreign_mask_same_count": _with_delta("conv.weight", _moved_mask("conv.weight", True)),
        "foreign_mask_more": _with_delta("fc.weight", _moved_mask("fc.weight", False)),
        "importance_valid": replace(u, importance=imp),
        "importance_partial": replace(u, importance={"conv.weight": imp["conv.weight"]}),
        "importance_unpruned": replace(u, importance={**imp, "fc.bias": np.ones(4, np.float32)}),
        "importance_shape": replace(u, importance={**imp, "conv.weight": np.ones(3, np.float32)}),
        "importance_negative": replace(
            u, importance={**imp, "fc.weight": -np.ones(SHAPES["fc.weight"], np.float32)}
        ),
    }


def _model_with_huge_weight() -> GlobalModel:
    w = dict(MODEL.weights)
    conv = w["conv.weight"].copy()
    conv[MODEL.masks["conv.weight"]] = 3.4e38
    w["conv.weight"] = conv
    return GlobalModel(MODEL.version, w, MODEL.masks, "tiny")


def _dense(update: DeviceUpdate, model: GlobalModel, strategy: Strategy) -> ClientResult:
    digest = model_digest(model.weights, model.masks)
    result = reconstruct(update, model, device_id="dev-1", model_digest=digest)
    strategy.check_result(model, result)
    return result


def _sparse(update: DeviceUpdate, model: GlobalModel, strategy: Strategy) -> SparseResult:
    digest = model_digest(model.weights, model.masks)
    return check_sparse(
        update,
        model,
        strategy,
        device_id="dev-1",
        model_digest=digest,
        model_index=ModelIndex(model),
    )


def _verdict(fn: Callable[[], object]) -> tuple[str, str] | object:
    try:
        return fn()
    except ValidationError as exc:
        return (exc.reason, str(exc))


def _same_result(dense: ClientResult, sparse: SparseResult, model: GlobalModel) -> None:
    back = sparse.to_client_result(model)
    assert set(back.weights) == set(dense.weights)
    for name, w in dense.weights.items():
        assert back.weights[name].tobytes() == w.tobytes(), name
    assert set(back.masks) == set(dense.masks)
    for name, m in dense.masks.items():
        assert np.array_equal(back.masks[name], m)
    assert back.num_examples == dense.num_examples and back.metrics == dense.metrics
    assert set(back.importance) == set(dense.importance)


@pytest.mark.parametrize("strategy_name", STRATEGIES)
@pytest.mark.parametrize("case", sorted(_cases()))
def test_sparse_check_gives_the_dense_verdict(strategy_name: str, case: str) -> None:
    """Every single-fault update gets the same reason and message on both paths; valid ones
    give the same result."""
    model = _model_with_huge_weight() if case == "inf_after_add" else MODEL
    update = _cases()[case]
    if case == "inf_after_add":
        update = replace(update, model_digest=model_digest(model.weights, model.masks))
    strategy = create_strategy(strategy_name)
    dense = _verdict(lambda: _dense(update, model, strategy))
    sparse = _verdict(lambda: _sparse(update, model, strategy))
    if isinstance(dense, tuple):
        assert sparse == dense
    else:
        assert isinstance(dense, ClientResult) and isinstance(sparse, SparseResult)
        _same_result(dense, sparse, model)


def _dense_verdict(update: DeviceUpdate, strategy_name: str) -> tuple[str, str] | object:
    return _verdict(lambda: _dense(update, MODEL, create_strategy(strategy_name)))


def test_the_fault_cases_do_fail() -> None:
    """The cases above are real faults: the dense path rejects each one for some strategy,
    so agreement is not agreement on accepting everything."""
    for case, update in _cases().items():
        if case.startswith("valid") or case == "inf_after_add" or case == "importance_valid":
            continue
        verdicts = [_dense_verdict(update, name) for name in STRATEGIES]
        assert any(isinstance(v, tuple) for v in verdicts), case


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_add_sparse_sums_exactly_what_add_sums(strategy_name: str) -> None:
    """The accumulator fed sparse results holds the same exact sums (and finishes to the same
    model) as one fed the dense results of the same updates."""
    strategy = create_strategy(strategy_name)
    if strategy_name == "feddst":
        strategy.load_state_dict(
            {f"budget/{n}": np.array(int(m.sum()), dtype=np.int64) for n, m in MODEL.masks.items()}
        )
    rng = np.random.default_rng(9)
    dense_acc = Accumulator.for_model(strategy_name, MODEL)
    sparse_acc = Accumulator.for_model(strategy_name, MODEL)
    for i in range(5):
        u = _update(num_examples=int(rng.integers(1, 1000)))
        deltas = {
            n: SparseTensor(t.shape, t.mask, (t.values * rng.standard_normal()).astype(np.float32))
            for n, t in u.deltas.items()
        }
        if strategy_name == "feddst" and i % 2:
            deltas["conv.weight"] = _moved_mask("conv.weight", True)
        u = replace(u, deltas=deltas)
        d = reconstruct(u, MODEL, device_id=f"d{i}", model_digest=DIGEST)
        strategy.check_result(MODEL, d)
        dense_acc.add(d)
        sparse_acc.add_sparse(
            check_sparse(u, MODEL, strategy, device_id=f"d{i}", model_digest=DIGEST)
        )
    assert dense_acc.devices == sparse_acc.devices
    for name, t in dense_acc.tensors.items():
        s = sparse_acc.tensors[name]
        assert np.array_equal(t.num.to_float64(), s.num.to_float64()), name
        if t.votes is not None:
            assert s.votes is not None and t.den is not None and s.den is not None
            assert np.array_equal(t.votes, s.votes) and np.array_equal(t.den, s.den)


def test_an_overridden_check_result_is_not_bypassed() -> None:
    """A strategy whose ``check_result`` is not one the sparse path knows gets its own (dense)
    check: a new rule can never be skipped by the fast path."""

    class Strict(FedAvg):
        def check_result(self, model: GlobalModel, result: ClientResult) -> None:
            raise ValidationError("strict says no", reason="strict")

    with pytest.raises(ValidationError) as info:
        _sparse(_update(), MODEL, Strict())
    assert info.value.reason == "strict"

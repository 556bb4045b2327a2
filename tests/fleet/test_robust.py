"""Robust aggregation: clipping, trimmed mean and median against numpy references, in the
strategies, and end to end against a device that scales its update by 100.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.agent import AgentOptions
from device.errors import ConfigError
from device.wire.codec import KnownMask, SparseTensor
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import DeviceUpdate, InitialPruneResult, ValueDType
from device.wire.topics import Topics
from fleet.runtime.runner import RoundReport, Runner, RunSpec
from fleet.sim.core import (
    PartitionedData,
    SimSpec,
    SimulatedAgent,
    device_ids,
    make_evaluator,
    partition_lookup,
)
from fleet.state.store import Store
from fleet.strategies import create_strategy, robust
from fleet.strategies.base import ClientResult, GlobalModel
from fleet.strategies.robust import (
    RobustOptions,
    clip_result,
    clip_scale,
    coordinate_median,
    delta_norm,
    trimmed_mean,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def dense_model(rng: np.random.Generator) -> GlobalModel:
    weights = {
        "a.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "a.bias": rng.normal(size=4).astype(np.float32),
    }
    return GlobalModel(3, weights, {}, "toy")


def result_with_delta(
    model: GlobalModel, delta: dict[str, np.ndarray], n: int = 10
) -> ClientResult:
    weights = {k: (model.weights[k] + delta[k]).astype(np.float32) for k in model.weights}
    return ClientResult("d", n, weights)


# -- clipping --------------------------------------------------------------------------------------


def test_clip_scales_a_large_delta_onto_the_bound_in_the_same_direction() -> None:
    """A delta of norm 10 clipped to 2 keeps its direction and ends with norm 2."""
    rng = np.random.default_rng(0)
    model = dense_model(rng)
    delta = {k: rng.normal(size=w.shape) for k, w in model.weights.items()}
    norm = delta_norm(delta)
    delta = {k: d * (10.0 / norm) for k, d in delta.items()}
    clipped = clip_result(model, result_with_delta(model, delta), 2.0)
    new_delta = {k: clipped.weights[k].astype(np.float64) - model.weights[k] for k in delta}
    assert delta_norm(new_delta) == pytest.approx(2.0, rel=1e-5)
    for k, d in delta.items():
        np.testing.assert_allclose(new_delta[k], d * 0.2, atol=1e-5)
    assert clipped.metrics["clip_scale"] == pytest.approx(0.2)
    assert clipped.num_examples == 10 and clipped.device_id == "d"


def test_clip_leaves_an_update_within_the_bound_untouched() -> None:
    """Honest updates under the bound pass bit for bit (the same object)."""
    rng = np.random.default_rng(1)
    model = dense_model(rng)
    delta = {k: 0.01 * rng.normal(size=w.shape) for k, w in model.weights.items()}
    result = result_with_delta(model, delta)
    assert clip_result(model, result, 1.0) is result
    assert clip_scale(0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="clip_norm"):
        clip_scale(1.0, 0.0)


def test_clip_measures_the_delta_on_the_devices_own_mask() -> None:
    """FedDST: a device that moved its mask is measured on its mask (a grown coordinate counts
    from zero, a dropped one not at all) and stays zero outside it."""
    g = np.array([[1.0, 2.0, 0.0, 0.0]], dtype=np.float32)
    global_mask = np.array([[True, True, False, False]])
    model = GlobalModel(0, {"w": g}, {"w": global_mask}, "toy")
    device_mask = np.array([[True, False, True, False]])  # dropped 1, grew 2
    w = np.array([[1.0, 0.0, 3.0, 0.0]], dtype=np.float32)  # delta on its mask: (0, 3)
    result = ClientResult("d", 5, {"w": w}, masks={"w": device_mask})
    clipped = clip_result(model, result, 1.5)
    np.testing.assert_allclose(clipped.weights["w"], [[1.0, 0.0, 1.5, 0.0]])
    assert clipped.masks["w"] is device_mask


# -- trimmed mean and median against references ------------------------------------------------


def _stack(rng: np.random.Generator, devices: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(devices)]
    arrays[0] = arrays[0] * 1000  # an outlier device, which robust statistics must not follow
    return arrays


def trim_mean_reference(values: np.ndarray, fraction: float) -> float:
    """The textbook definition (as ``scipy.stats.trim_mean``): sort, cut ``floor(fraction * k)``
    values from each end, average the rest."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    cut = math.floor(fraction * ordered.size)
    return float(ordered[cut : ordered.size - cut].mean())


@pytest.mark.parametrize("devices", [1, 2, 5, 10])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.45])
def test_trimmed_mean_matches_the_definition(devices: int, fraction: float) -> None:
    """Dense: per coordinate, the mean after cutting floor(fraction * k) values at each end."""
    arrays = _stack(np.random.default_rng(devices), devices, (6, 7))
    stacked = np.stack(arrays).reshape(devices, -1)
    expected = np.array([trim_mean_reference(stacked[:, j], fraction) for j in range(42)])
    got = trimmed_mean(arrays, trim_fraction=fraction)
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6)


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 9])
def test_median_matches_numpy(devices: int) -> None:
    arrays = _stack(np.random.default_rng(devices), devices, (5, 3))
    expected = np.median(np.stack(arrays).astype(np.float64), axis=0)
    np.testing.assert_allclose(coordinate_median(arrays), expected, rtol=1e-6)


def _masked_reference(
    arrays: list[np.ndarray], masks: list[np.ndarray], fallback: np.ndarray, stat: Any
) -> np.ndarray:
    out = np.array(fallback, dtype=np.float64).reshape(-1)
    flat = [a.reshape(-1) for a in arrays]
    held = [m.reshape(-1) for m in masks]
    for j in range(out.size):
        values = [f[j] for f, m in zip(flat, held, strict=True) if m[j]]
        if values:
            out[j] = stat(np.array(values, dtype=np.float64))
    return out.reshape(fallback.shape)


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_masked_statistics_use_only_each_coordinates_holders(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sparse (FedDST): per coordinate over the devices whose mask holds it, the fallback where
    nobody does; values outside a mask (even NaN) never count. A tiny block size makes the
    coordinates span several blocks."""
    monkeypatch.setattr(robust, "BLOCK", 7)
    rng = np.random.default_rng(7)
    arrays = _stack(rng, 6, (5, 9))
    masks = [rng.random((5, 9)) < 0.6 for _ in arrays]
    masks[1][0, :] = False
    for m in masks:
        m[0, 0] = False  # nobody holds (0, 0)
    for a, m in zip(arrays, masks, strict=True):
        a[~m] = np.nan
    fallback = rng.normal(size=(5, 9)).astype(np.float32)
    if method == "median":
        got = coordinate_median(arrays, masks, fallback)
        ref = _masked_reference(arrays, masks, fallback, np.median)
    else:
        got = trimmed_mean(arrays, masks, 0.2, fallback)
        ref = _masked_reference(arrays, masks, fallback, lambda v: trim_mean_reference(v, 0.2))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got[0, 0] == fallback[0, 0]
    assert got.dtype == np.float32


def test_statistics_refuse_inconsistent_input() -> None:
    a = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="shape"):
        coordinate_median([a, np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="fallback"):
        trimmed_mean([a], [np.ones((2, 2), bool)])
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean([a], trim_fraction=0.5)


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"method": "mode"}, "unknown method 'mode'"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"clip": 1.0}, "unknown robust option"),
        ("median", "must be a mapping"),
    ],
)
def test_bad_robust_options_are_config_errors_naming_the_strategy(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        create_strategy("feddst", robust=value)
    assert str(info.value).startswith("feddst: ")


def test_robust_options_come_from_a_config_mapping() -> None:
    strategy = create_strategy("fedavgm", robust={"clip_norm": 3, "method": "trimmed_mean"})
    options: Any = strategy.options  # type: ignore[attr-defined]
    assert options.robust == RobustOptions(clip_norm=3, method="trimmed_mean")
    assert options.robust.enabled
    assert not RobustOptions().enabled


# -- in the strategies -----------------------------------------------------------------------------


def _results(model: GlobalModel, rng: np.random.Generator, outlier: float) -> list[ClientResult]:
    """Five small honest deltas and, first, one device whose delta is ``outlier`` times larger."""
    out = []
    for i in range(6):
        delta = {k: 0.1 * rng.normal(size=w.shape) for k, w in model.weights.items()}
        if i == 0:
            delta = {k: outlier * d for k, d in delta.items()}
        weights = {k: (model.weights[k] + delta[k]).astype(np.float32) for k in model.weights}
        masks = {k: m.copy() for k, m in model.masks.items()}
        out.append(ClientResult(f"d{i}", 10 + i, weights, masks=masks))
    return out


def _move(a: GlobalModel, b: GlobalModel) -> float:
    return delta_norm({k: b.weights[k].astype(np.float64) - a.weights[k] for k in a.weights})


def test_fedavg_with_clipping_moves_the_model_at_most_the_bound() -> None:
    """A weighted mean of clipped deltas is within the bound, however large the attack."""
    rng = np.random.default_rng(3)
    model = dense_model(rng)
    results = _results(model, rng, outlier=1e4)
    plain = create_strategy("fedavg").aggregate(1, model, results)
    clipped = create_strategy("fedavg", robust={"clip_norm": 0.5}).aggregate(1, model, results)
    assert _move(model, plain) > 100
    assert _move(model, clipped) <= 0.5 * (1 + 1e-6)


def test_fedavgm_with_clipping_bounds_each_step_by_the_momentum_sum() -> None:
    """FedAvgM sums clipped steps: each step is at most server_lr * C / (1 - beta)."""
    rng = np.random.default_rng(4)
    model = dense_model(rng)
    strategy = create_strategy("fedavgm", robust={"clip_norm": 0.5}, beta=0.5)
    for round_ in (1, 2, 3):
        new = strategy.aggregate(round_, model, _results(model, rng, outlier=1e4))
        assert _move(model, new) <= 0.5 / (1 - 0.5) * (1 + 1e-6)
        model = new


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_fedavg_robust_methods_ignore_one_extreme_device(method: str) -> None:
    """With one device in six sending a 1000x delta, the median and the 20%-trimmed mean stay
    within the honest devices' range on every coordinate; the mean does not."""
    rng = np.random.default_rng(5)
    model = dense_model(rng)
    results = _results(model, rng, outlier=1e3)
    options = {"method": method, "trim_fraction": 0.2}
    new = create_strategy("fedavg", robust=options).aggregate(1, model, results)
    for name in model.weights:
        honest = np.stack([r.weights[name] for r in results[1:]])
        assert np.all(new.weights[name] >= honest.min(axis=0) - 1e-6)
        assert np.all(new.weights[name] <= honest.max(axis=0) + 1e-6)
    mean = create_strategy("fedavg").aggregate(1, model, results)
    assert _move(model, mean) > 10 * _move(model, new)


def test_feddst_trimmed_mean_over_holders_and_clipping_keep_the_budget() -> None:
    """FedDST with robust options: the outlier is trimmed per coordinate, the mask still keeps
    exactly the budget, and nothing is non-zero outside it."""
    from fleet.runtime.runner import initial_weights

    weights, prunable = initial_weights("mlp", 0)
    options = {"clients_per_round": 6, "density": 0.3}
    plain = create_strategy("feddst", **options)
    model = plain.initialize(weights, "mlp", prunable, np.random.default_rng(0))
    results = _results(model, np.random.default_rng(6), outlier=1e3)
    for r in results:  # zero outside the mask, as devices send
        for k, m in r.masks.items():
            r.weights[k][~m] = 0.0
    robust_strategy = create_strategy(
        "feddst",
        robust={"clip_norm": 5.0, "method": "trimmed_mean", "trim_fraction": 0.2},
        **options,
    )
    robust_strategy.load_state_dict(plain.state_dict())
    new = robust_strategy.aggregate(1, model, results)
    assert new.nnz() == model.nnz()
    for name, m in new.masks.items():
        assert not np.any(new.weights[name][~m])
    assert _move(model, plain.aggregate(1, model, results)) > 10 * _move(model, new)


def test_robust_off_is_the_plain_strategy_bit_for_bit() -> None:
    """The default and a bound above every delta change nothing: runs without robust options
    stay reproducible across this change."""
    rng = np.random.default_rng(8)
    model = dense_model(rng)
    results = _results(model, rng, outlier=1.0)
    plain = create_strategy("fedavg").aggregate(1, model, results)
    loose = create_strategy("fedavg", robust={"clip_norm": 1e6}).aggregate(1, model, results)
    assert all(np.array_equal(plain.weights[k], loose.weights[k]) for k in model.weights)


# -- end to end: a device that scales its update by 100 -------------------------------------------

ATTACKER = "sim-0003"
FACTOR = 100.0
CLIP = 2.0  # above every honest delta of this run (measured norms: 0.96 to 1.47)
DEVICES = 10
ROUNDS = 3


class ScalingAgent(SimulatedAgent):
    """A poisoning device: trains honestly, then uploads its delta multiplied by ``FACTOR``.
    The update is well-formed, so validation accepts it; only robust aggregation can bound it."""

    def _upload(
        self,
        job: Any,
        body: DeviceUpdate | InitialPruneResult,
        *,
        book: dict[str, KnownMask] | None,
        dtype: ValueDType | None,
    ) -> None:
        if isinstance(body, DeviceUpdate):
            scaled = {
                name: SparseTensor(t.shape, t.mask, (t.values * FACTOR).astype(np.float32))
                for name, t in body.deltas.items()
            }
            body = dataclasses.replace(body, deltas=scaled)
        super()._upload(job, body, book=book, dtype=dtype)


def run_digits(
    store_dir: Path, *, attacker: str | None, rounds: int, **robust: Any
) -> tuple[list[RoundReport], list[dict[str, np.ndarray]]]:
    """A FedAvg run on digits over the in-memory broker with every device in every round;
    returns the round reports and the global model of every version."""
    sim = SimSpec(devices=DEVICES, dataset="digits")
    spec = RunSpec(
        run_id="rb",
        model_name="mlp",
        strategy="fedavg",
        rounds=rounds,
        clients_per_round=DEVICES,
        strategy_options={
            "clients_per_round": DEVICES,
            "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "robust": robust,
        },
        round_timeout_s=120.0,
    )
    broker, topics, data = MemoryBroker(), Topics(), PartitionedData(sim)
    agents = []
    for i, device_id in enumerate(device_ids(DEVICES)):
        cls = ScalingAgent if device_id == attacker else SimulatedAgent
        options = AgentOptions(
            device_id=device_id,
            topics=topics,
            dataset_size=data.size(i),
            torch_threads=0,
            session_epoch=1,
        )
        agent = cls(MemoryTransport(broker, device_id), data, options, None, sim.faults)
        agent.start()
        agents.append(agent)
    store = Store(store_dir)
    try:
        runner = Runner(
            spec,
            MemoryTransport(broker, "fleet-manager"),
            store,
            topics=topics,
            evaluator=make_evaluator("digits", None),
            partition_for=partition_lookup(DEVICES),
        )
        runner.connect()
        runner.wait_for_devices(DEVICES, 30.0)
        reports = runner.run()
        models = [store.load_checkpoint("rb", v).weights for v in range(rounds + 1)]
        return reports, models
    finally:
        for agent in agents:
            agent.stop(timeout_s=5.0)
        store.close()


@dataclasses.dataclass
class Attack:
    clean: list[RoundReport]
    clipped: list[RoundReport]
    clipped_models: list[dict[str, np.ndarray]]
    unclipped: list[RoundReport]
    unclipped_models: list[dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    """Same seeds three times: no attacker; the attacker with clipping; the attacker without
    (one round suffices to show what clipping prevents)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("robust")
    clean, _ = run_digits(root / "clean", attacker=None, rounds=ROUNDS)
    clipped, clipped_models = run_digits(
        root / "clipped", attacker=ATTACKER, rounds=ROUNDS, clip_norm=CLIP
    )
    unclipped, unclipped_models = run_digits(root / "unclipped", attacker=ATTACKER, rounds=1)
    yield Attack(clean, clipped, clipped_models, unclipped, unclipped_models)


def _norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return delta_norm({k: b[k].astype(np.float64) - a[k] for k in a})


def test_with_clipping_a_100x_device_moves_the_model_at_most_the_bound(attack: Attack) -> None:
    """Every round, the global model moves by at most the clip bound; without clipping the same
    device moves it by several times the bound in the first round."""
    moves = [
        _norm(a, b)
        for a, b in zip(attack.clipped_models[:-1], attack.clipped_models[1:], strict=True)
    ]
    assert len(moves) == ROUNDS
    assert all(m <= CLIP * (1 + 1e-5) for m in moves), moves
    assert _norm(*attack.unclipped_models) > 3 * CLIP
    assert all(ATTACKER in r.received for r in [*attack.clipped, *attack.unclipped])


def test_with_clipping_accuracy_stays_within_two_points_of_the_clean_run(attack: Attack) -> None:
    """Clipping turns the attack into one more bounded update: digits accuracy ends within 2
    points of the run without the attacker, while the unclipped attack ruins it at once."""
    clean = attack.clean[-1].metrics["accuracy"]
    clipped = attack.clipped[-1].metrics["accuracy"]
    assert clean > 0.85  # the clean run learns (chance is 0.1)
    assert abs(clipped - clean) <= 0.02, (clipped, clean)
    first_clean = attack.clean[0].metrics["accuracy"]
    assert attack.unclipped[0].metrics["accuracy"] < first_clean - 0.2
    assert not math.isnan(clipped)

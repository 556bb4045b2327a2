"""Strategies: round configuration, aggregation, validation and checkpointed state.

Devices are simulated by small numpy functions (no training): what matters here is what the
server does with what devices send, round after round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from device.errors import ConfigError, NotFoundError, ValidationError
from device.sparse.density import allocate, total_kept
from device.sparse.prunefl import reconfigure
from device.wire.messages import (
    DeviceProfile,
    GrowPolicy,
    InitialPruneResult,
    LayerProfile,
    LocalTraining,
    ModelSnapshot,
    ProfilePoint,
    ValueDType,
)
from fleet.strategies import create_strategy, strategy_names
from fleet.strategies.base import Candidate, ClientResult, GlobalModel, select_uniform
from fleet.strategies.fedavg import FedAvg, FedAvgM, FedAvgMOptions
from fleet.strategies.feddst import FedDST, FedDSTOptions
from fleet.strategies.prunefl import (
    MIN_COST_PER_PARAM,
    CostModel,
    PruneFL,
    PruneFLOptions,
    cost_model,
    device_cost,
    local_steps,
)

SHAPES: dict[str, tuple[int, ...]] = {
    "conv.weight": (6, 2, 3, 3),
    "conv.bias": (6,),
    "fc.weight": (10, 24),
    "fc.bias": (10,),
}
PRUNABLE = ["conv.weight", "fc.weight"]


def init_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def candidates(n: int = 8) -> list[Candidate]:
    return [Candidate(f"dev{i:02d}", num_examples=10 + i) for i in range(n)]


def train(
    model: GlobalModel,
    device: str,
    seed: int,
    *,
    num_examples: int = 20,
    readjust: float = 0.0,
    importance: bool = False,
    profile: DeviceProfile | None = None,
) -> ClientResult:
    """A simulated device round: noise on the kept weights; with ``readjust``, drop that fraction
    of each layer's smallest active weights and grow as many inactive ones (as FedDST does)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for name, w in model.weights.items():
        new = w + rng.normal(scale=0.1, size=w.shape).astype(np.float32)
        if name in model.masks:
            mask = model.masks[name].copy()
            k = int(readjust * mask.sum())
            if k:
                flat = mask.reshape(-1)
                active = np.flatnonzero(flat)
                drop = active[np.argsort(np.abs(new.reshape(-1)[active]), kind="stable")[:k]]
                grow = rng.choice(np.flatnonzero(~flat), size=k, replace=False)
                flat[drop] = False
                flat[grow] = True
            new = np.where(mask, new, 0).astype(np.float32)
            masks[name] = mask
        weights[name] = new
    imp = {n: rng.random(SHAPES[n]).astype(np.float32) for n in model.masks} if importance else {}
    return ClientResult(device, num_examples, weights, masks, imp, profile=profile)


def assert_models_equal(a: GlobalModel, b: GlobalModel) -> None:
    assert a.version == b.version and a.weights.keys() == b.weights.keys()
    for n in a.weights:
        np.testing.assert_array_equal(a.weights[n], b.weights[n])
    assert a.masks.keys() == b.masks.keys()
    for n in a.masks:
        np.testing.assert_array_equal(a.masks[n], b.masks[n])


# -- registry and selection -------------------------------------------------------------------


def test_registry_knows_the_four_strategies() -> None:
    """The CLI and configs name strategies; all four must be reachable by name."""
    assert strategy_names() == ["fedavg", "fedavgm", "feddst", "prunefl"]
    for name in strategy_names():
        assert create_strategy(name).name == name


def test_unknown_strategy_lists_the_known_ones() -> None:
    """A typo in a config must say what the choices are, not just fail."""
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'; known: fedavg, fedavgm"):
        create_strategy("fedprox")


def test_options_from_a_config_file_are_coerced_and_checked() -> None:
    """YAML gives mappings and strings; they become LocalTraining and enums, typos are named."""
    s = create_strategy("feddst", training={"epochs": 10, "lr": 0.05}, grow="random")
    assert isinstance(s, FedDST)
    assert s.options.training == LocalTraining(epochs=10, lr=0.05)
    assert s.options.grow is GrowPolicy.RANDOM
    up = create_strategy("fedavg", upload_dtype="int8")
    assert isinstance(up, FedAvg) and up.options.upload_dtype is ValueDType.INT8
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['densty'\]"):
        create_strategy("feddst", densty=0.1)
    with pytest.raises(ConfigError, match="unknown training option"):
        create_strategy("fedavg", training={"epoch": 1})
    with pytest.raises(ConfigError, match="upload_dtype must be one of"):
        create_strategy("fedavg", upload_dtype="fp64")
    with pytest.raises(ConfigError, match="density"):
        create_strategy("feddst", density=0.0)
    with pytest.raises(ConfigError, match="beta"):
        create_strategy("fedavgm", beta=1.0)


def test_selection_is_uniform_without_replacement_and_reproducible() -> None:
    """Same rng seed, same devices, whatever order the registry lists them in."""
    cands = candidates(10)
    a = select_uniform(cands, 4, np.random.default_rng(3))
    b = select_uniform(list(reversed(cands)), 4, np.random.default_rng(3))
    assert a == b and len(set(a)) == 4
    assert select_uniform(cands, 50, np.random.default_rng(0)) == tuple(c.device_id for c in cands)
    counts = dict.fromkeys((c.device_id for c in cands), 0)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        for d in select_uniform(cands, 3, rng):
            counts[d] += 1
    # Each device is picked with probability 3/10: 600 of 2000 draws, sd ~ 20.5.
    assert all(abs(c - 600) < 100 for c in counts.values())


def test_configure_round_honours_num_select_for_over_selection() -> None:
    """The runner over-selects by asking for more than clients_per_round."""
    s = create_strategy("fedavg", clients_per_round=3)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    assert len(s.configure_round(1, model, candidates(), np.random.default_rng(0)).selected) == 3
    cfg = s.configure_round(1, model, candidates(), np.random.default_rng(0), num_select=5)
    assert len(cfg.selected) == 5
    assert cfg.readjust is None and not cfg.report_importance
    with pytest.raises(ValueError, match="from 1"):
        s.configure_round(0, model, candidates(), np.random.default_rng(0))


def test_round_config_becomes_the_devices_command() -> None:
    """The command carries exactly the strategy's decisions plus the runner's version/digest."""
    s = create_strategy("feddst", training={"epochs": 2}, upload_dtype="fp16")
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    cfg = s.configure_round(1, model, candidates(), np.random.default_rng(0))
    cmd = cfg.command(model.version, b"digest", deadline_unix_s=5.0)
    assert cmd.training.epochs == 2 and cmd.upload_dtype is ValueDType.FP16
    assert cmd.readjust == cfg.readjust and cmd.model_digest == b"digest"


# -- FedAvg and FedAvgM -----------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean() -> None:
    """FedAvg weighs each device by its examples and bumps the version."""
    s = FedAvg()
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    assert model.masks == {} and model.version == 0
    results = [train(model, f"d{i}", i, num_examples=n) for i, n in enumerate([5, 15, 30])]
    new = s.aggregate(1, model, results)
    assert new.version == 1
    for name in SHAPES:
        expected = sum(r.num_examples * r.weights[name].astype(np.float64) for r in results) / 50
        np.testing.assert_allclose(new.weights[name], expected, rtol=1e-5, atol=1e-6)


def test_fedavgm_momentum_matches_a_hand_computation_over_two_rounds() -> None:
    """v1 = d1, w1 = w0 - v1; v2 = beta v1 + d2, w2 = w1 - lr v2 with d = w_global - w_avg."""
    beta, lr = 0.9, 0.5
    s = FedAvgM(FedAvgMOptions(beta=beta, server_lr=lr))
    w0 = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    r1 = [train(w0, "a", 1, num_examples=10), train(w0, "b", 2, num_examples=30)]
    w1 = s.aggregate(1, w0, r1)
    name = "fc.weight"
    avg1 = (10 * r1[0].weights[name].astype(np.float64) + 30 * r1[1].weights[name]) / 40
    v1 = w0.weights[name] - avg1
    np.testing.assert_allclose(w1.weights[name], w0.weights[name] - lr * v1, rtol=1e-5, atol=1e-6)
    r2 = [train(w1, "a", 3, num_examples=20)]
    w2 = s.aggregate(2, w1, r2)
    v2 = beta * v1 + (w1.weights[name] - r2[0].weights[name])
    np.testing.assert_allclose(w2.weights[name], w1.weights[name] - lr * v2, rtol=1e-5, atol=1e-5)
    stored = np.asarray(s.state_dict()[f"momentum/{name}"], dtype=np.float64)
    np.testing.assert_allclose(stored, v2, rtol=1e-5, atol=1e-5)


def test_fedavgm_state_round_trip_continues_identically() -> None:
    """A resumed fleet manager must aggregate exactly as the one that was stopped."""
    a = FedAvgM()
    m0 = a.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    m1 = a.aggregate(1, m0, [train(m0, "a", 1), train(m0, "b", 2)])
    b = FedAvgM()
    b.load_state_dict(a.state_dict())
    r2 = [train(m1, "a", 3), train(m1, "c", 4)]
    assert_models_equal(a.aggregate(2, m1, r2), b.aggregate(2, m1, r2))
    fresh = FedAvgM()
    fresh.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    diff = (
        fresh.aggregate(2, m1, r2).weights["fc.weight"]
        - b.aggregate(3, m1, r2).weights["fc.weight"]
    )
    assert np.abs(diff).max() > 0  # the momentum really is part of the state
    with pytest.raises(ConfigError, match="unexpected"):
        b.load_state_dict({"budget/fc.weight": np.array(3)})


def test_checks_reject_updates_that_must_not_be_averaged() -> None:
    """NaN, wrong shapes, a pruned dense tensor, zero examples: each with its own reason."""
    s = FedAvg()
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    good = train(model, "d", 1)

    def variant(**changes: object) -> ClientResult:
        fields = {
            "device_id": "d",
            "num_examples": good.num_examples,
            "weights": dict(good.weights),
            "masks": dict(good.masks),
        }
        fields.update(changes)
        return ClientResult(**fields)  # type: ignore[arg-type]

    nan = dict(good.weights)
    nan["fc.bias"] = np.full(10, np.nan, dtype=np.float32)
    wrong = dict(good.weights)
    wrong["fc.weight"] = np.zeros((24, 10), dtype=np.float32)
    missing = {k: v for k, v in good.weights.items() if k != "conv.bias"}
    half_mask = np.arange(240).reshape(10, 24) % 2 == 0
    half_zero = dict(good.weights)
    half_zero["fc.weight"] = np.where(half_mask, good.weights["fc.weight"], 0).astype(np.float32)
    cases = {
        "non_finite": variant(weights=nan),
        "bad_shape": variant(weights=wrong),
        "missing_tensor": variant(weights=missing),
        "bad_num_examples": variant(num_examples=0),
        "foreign_mask": variant(weights=half_zero, masks={"fc.weight": half_mask}),
    }
    for reason, result in cases.items():
        with pytest.raises(ValidationError) as err:
            s.check_result(model, result)
        assert err.value.reason == reason
        with pytest.raises(ValidationError):
            s.aggregate(1, model, [good, result])
    s.check_result(model, variant(masks={"fc.weight": np.ones((10, 24), dtype=bool)}))


# -- FedDST -----------------------------------------------------------------------------------


def feddst(**options: object) -> FedDST:
    defaults: dict[str, object] = {"density": 0.3, "clients_per_round": 4}
    defaults.update(options)
    return FedDST(FedDSTOptions(**defaults))  # type: ignore[arg-type]


def test_feddst_initial_masks_follow_the_erk_budget_by_magnitude() -> None:
    """Version 0 keeps ERK's per-layer counts, by magnitude of the initialisation."""
    s = feddst()
    weights = init_weights()
    model = s.initialize(weights, "m", PRUNABLE, np.random.default_rng(0))
    shapes = {n: SHAPES[n] for n in PRUNABLE}
    densities = allocate("erk", shapes, 0.3)
    assert sum(model.nnz().values()) == total_kept(densities, shapes)
    for name in PRUNABLE:
        k = model.nnz()[name]
        assert k == round(densities[name] * math.prod(SHAPES[name]))
        kept = np.abs(weights[name][model.masks[name]])
        assert kept.min() >= np.abs(weights[name][~model.masks[name]]).max()
        assert not np.any(model.weights[name][~model.masks[name]])
    assert "conv.bias" not in model.masks
    assert s.budgets == model.nnz()


def test_feddst_readjusts_on_schedule_with_cosine_alpha() -> None:
    """Rounds 1, 1+R_adj, ... before T_end carry alpha_r = alpha/2 (1 + cos(pi r / T_end))."""
    s = feddst(alpha=0.05, readjust_every=10, total_rounds=100, at_fraction=1.0)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    readjusting = [
        r
        for r in range(1, 101)
        if s.configure_round(r, model, candidates(), np.random.default_rng(r)).readjust
    ]
    assert readjusting == [1, 11, 21, 31, 41]
    cfg = s.configure_round(11, model, candidates(), np.random.default_rng(0))
    assert cfg.readjust is not None
    assert cfg.readjust.alpha == pytest.approx(0.025 * (1 + math.cos(math.pi * 11 / 50)))
    assert cfg.readjust.at_fraction == 1.0 and not cfg.report_importance


def test_feddst_keeps_every_layer_at_its_budget_round_after_round() -> None:
    """Devices move their masks; the server's union + top-k returns to k_l every round."""
    s = feddst(readjust_every=1, total_rounds=20)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    budgets = s.budgets
    first_masks = {n: m.copy() for n, m in model.masks.items()}
    for r in range(1, 6):
        results = [
            train(model, f"d{i}", 100 * r + i, num_examples=10 + i, readjust=0.2) for i in range(4)
        ]
        model = s.aggregate(r, model, results)
        assert model.nnz() == budgets
        for name, mask in model.masks.items():
            assert not np.any(model.weights[name][~mask])
            # Every kept coordinate was held by some device this round (the union).
            assert np.all(mask <= np.logical_or.reduce([res.masks[name] for res in results]))
    assert any(not np.array_equal(first_masks[n], model.masks[n]) for n in PRUNABLE)


def test_feddst_rejects_a_mask_off_budget() -> None:
    """A device may move its mask but not keep more (or fewer) weights than the budget."""
    s = feddst()
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    res = train(model, "d", 1)
    masks = dict(res.masks)
    extra = masks["fc.weight"].copy()
    extra.reshape(-1)[np.flatnonzero(~extra)[0]] = True
    masks["fc.weight"] = extra
    bad = ClientResult("d", 5, res.weights, masks)
    with pytest.raises(ValidationError) as err:
        s.check_result(model, bad)
    assert err.value.reason == "mask_budget"
    shifted = train(model, "d", 2, readjust=0.3)
    s.check_result(model, shifted)  # a moved mask at budget is fine


def test_feddst_state_round_trip_and_determinism() -> None:
    """The budget is server state; the same seeds give the same run."""

    def run(seed: int, resume_after: int | None = None) -> GlobalModel:
        s = feddst(mask_init="random", readjust_every=2, total_rounds=10)
        model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(seed))
        for r in range(1, 5):
            if resume_after is not None and r == resume_after + 1:
                state = s.state_dict()
                s = feddst(mask_init="random", readjust_every=2, total_rounds=10)
                s.load_state_dict(state)
            cfg = s.configure_round(r, model, candidates(), np.random.default_rng(seed + r))
            results = [
                train(model, d, 10 * r + i, readjust=0.1 if cfg.readjust else 0.0)
                for i, d in enumerate(cfg.selected)
            ]
            model = s.aggregate(r, model, results)
        return model

    assert_models_equal(run(1), run(1))
    assert_models_equal(run(1), run(1, resume_after=2))
    assert not np.array_equal(run(1).masks["fc.weight"], run(2).masks["fc.weight"])
    model = run(1)
    with pytest.raises(ConfigError, match="budgets"):
        feddst().aggregate(5, model, [train(model, "d", 1)])


# -- PruneFL ----------------------------------------------------------------------------------


def linear_profile(
    per_param: Mapping[str, float],
    *,
    fixed: float = 1e-3,
    overhead: float = 0.01,
    uplink: float = 0.0,
    downlink: float = 0.0,
) -> DeviceProfile:
    """A profile whose sparse minibatch time is exactly ``fixed + per_param * kept``."""
    layers = []
    for name in PRUNABLE:
        numel = math.prod(SHAPES[name])
        points = tuple(
            ProfilePoint(
                density=d,
                dense_s=fixed + per_param[name] * numel,
                sparse_s=fixed + per_param[name] * d * numel,
            )
            for d in (1.0, 0.5, 0.2, 0.1, 0.05)
        )
        layers.append(LayerProfile(name, numel, points))
    return DeviceProfile("m", 32, overhead, tuple(layers), uplink, downlink)


def prunefl(**options: object) -> PruneFL:
    defaults: dict[str, object] = {
        "clients_per_round": 4,
        "initial_pruning": False,
        "reconfig_every": 2,
    }
    defaults.update(options)
    return PruneFL(PruneFLOptions(**defaults))  # type: ignore[arg-type]


def test_device_cost_recovers_a_linear_profile() -> None:
    """c_l = steps * slope + comm per value; c_0 = steps * (overhead + intercepts) + dense comm.

    The slope, not the average cost at one density, is what a kept parameter really costs."""
    per_param = {"conv.weight": 2e-6, "fc.weight": 5e-6}
    # Small fixed costs, so that the sparse kernel wins below density 1 (as device.sparse.kernels
    # decides with its 10% margin) and the measured times lie on one line.
    profile = linear_profile(per_param, fixed=1e-6, uplink=1e6, downlink=2e6)
    training = LocalTraining(epochs=2, batch_size=10)
    cost = device_cost(profile, 25, SHAPES, PRUNABLE, training, ValueDType.FP16)
    assert cost is not None
    steps = local_steps(25, training)
    assert steps == 6
    comm = 2 / 1e6 + 4 / 2e6
    scale = 10 / 32  # the profile timed minibatches of 32, training uses 10
    for name in PRUNABLE:
        assert cost.per_param[name] == pytest.approx(steps * scale * per_param[name] + comm)
    dense_values = 6 + 10  # the biases travel too
    assert cost.c0 == pytest.approx(steps * scale * (0.01 + 2 * 1e-6) + comm * dense_values)
    incomplete = DeviceProfile("m", 32, 0.01, profile.layers[:1])
    assert device_cost(incomplete, 25, SHAPES, PRUNABLE, training, ValueDType.FP32) is None


def test_cost_model_falls_back_to_flops_without_profiles() -> None:
    """Without any profile every kept parameter costs its FLOPs; c_0 is a share of dense."""
    opts = PruneFLOptions(training=LocalTraining(batch_size=8), fallback_flops_per_s=1e9)
    cost = cost_model([(None, 16), (None, 16)], SHAPES, PRUNABLE, opts)
    per_step = 6 * 8 / 1e9
    assert cost.per_param == pytest.approx({n: 2 * per_step for n in PRUNABLE})
    dense = sum(2 * per_step * math.prod(SHAPES[n]) for n in PRUNABLE)
    assert cost.c0 == pytest.approx(0.15 * dense)
    flat = cost_model([(linear_profile(dict.fromkeys(PRUNABLE, 0.0)), 16)], SHAPES, PRUNABLE, opts)
    assert flat.per_param == dict.fromkeys(PRUNABLE, MIN_COST_PER_PARAM)


def test_prunefl_initial_job_picks_the_configured_largest_or_fastest_device() -> None:
    """Initial pruning runs once, on the device the options name or prefer."""
    slow = linear_profile(dict.fromkeys(PRUNABLE, 1e-5))
    fast = linear_profile(dict.fromkeys(PRUNABLE, 1e-7))
    cands = [
        Candidate("a", 100, slow),
        Candidate("b", 500, slow),
        Candidate("c", 50, fast),
        Candidate("d", 900, None),
    ]
    largest = prunefl(initial_pruning=True)
    model = largest.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    job = largest.initial_job(model, cands)
    assert job is not None and job.device_id == "d" and job.model_version == 0
    fastest = prunefl(initial_pruning=True, initial_select="fastest")
    fastest.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    assert getattr(fastest.initial_job(model, cands), "device_id", None) == "c"
    named = prunefl(initial_pruning=True, initial_device="zz")
    named.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    with pytest.raises(NotFoundError, match="'zz'"):
        named.initial_job(model, cands)
    assert prunefl().initial_job(model, cands) is None  # initial pruning disabled


def test_prunefl_initial_result_becomes_version_one_once() -> None:
    """The pruned model of the initial device starts federated training; a replay is refused."""
    s = prunefl(initial_pruning=True)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    rng = np.random.default_rng(5)
    masks = {n: rng.random(SHAPES[n]) < 0.4 for n in PRUNABLE}
    weights = {
        n: np.where(masks.get(n, True), w, 0).astype(np.float32) for n, w in init_weights(1).items()
    }
    snap = ModelSnapshot("m", 0, b"", 1, weights, masks)
    new = s.on_initial_result(model, InitialPruneResult(snap, 3, (1.0, 0.5, 0.4), 1.0))
    assert new.version == 1 and new.density() == pytest.approx(
        sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
    )
    assert s.initial_job(new, candidates()) is None
    with pytest.raises(ValidationError):
        s.on_initial_result(model, InitialPruneResult(snap, 3, (1.0,), 1.0))
    other = prunefl(initial_pruning=True)
    other.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    bad = ModelSnapshot("m", 0, b"", 1, weights, {"fc.weight": masks["fc.weight"]})
    with pytest.raises(ValidationError) as err:
        other.on_initial_result(model, InitialPruneResult(bad, 1, (1.0,), 1.0))
    assert err.value.reason == "missing_mask"


def test_prunefl_asks_for_importance_every_delta_r_rounds() -> None:
    """Importance is only requested (and paid for) on reconfiguration rounds."""
    s = prunefl(reconfig_every=3)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    flags = []
    for r in range(1, 8):
        cfg = s.configure_round(r, model, candidates(), np.random.default_rng(r))
        flags.append(cfg.report_importance)
        model = s.aggregate(r, model, [train(model, "a", r, importance=cfg.report_importance)])
    assert flags == [False, False, True, False, False, True, False]


def test_prunefl_reconfiguration_prunes_the_costly_layer_and_lowers_t() -> None:
    """With fc 10^4 x costlier per parameter than conv, a reconfiguration shrinks fc, keeps the
    objective's choice, and the modelled round time T goes down."""
    per_param = {"conv.weight": 1e-8, "fc.weight": 1e-4}
    profile = linear_profile(per_param, fixed=1e-5, overhead=1e-4)
    s = prunefl(reconfig_every=2, protect_fraction=0.5)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    r1 = [train(model, f"d{i}", i, profile=profile) for i in range(3)]
    model = s.aggregate(1, model, r1)
    assert model.density() == 1.0  # not a reconfiguration round
    t_before = s.time_model(model)
    r2 = [train(model, f"d{i}", 10 + i, importance=True, profile=profile) for i in range(3)]
    new = s.aggregate(2, model, r2)
    fc_density = new.nnz()["fc.weight"] / new.masks["fc.weight"].size
    conv_density = new.nnz()["conv.weight"] / new.masks["conv.weight"].size
    assert fc_density < 1.0 and fc_density < conv_density
    assert s.time_model(new) < t_before
    assert s.reconfigurations == 1
    # The server applied device.sparse.prunefl.reconfigure to the summed importance.
    cost = s.cost
    assert cost is not None
    importance = {n: np.sum([r.importance[n] for r in r2], axis=0) for n in PRUNABLE}
    mean = {
        n: np.sum([r.num_examples * r.weights[n].astype(np.float64) for r in r2], axis=0) / 60
        for n in PRUNABLE
    }
    expected = reconfigure(importance, mean, model.masks, cost.per_param, cost.c0, s.protect_d(2))
    for n in PRUNABLE:
        np.testing.assert_array_equal(new.masks[n], expected[n])
        assert not np.any(new.weights[n][~new.masks[n]])


def test_prunefl_retries_a_reconfiguration_that_got_no_importance() -> None:
    """If no device delivered importance, the next round asks again instead of skipping ahead."""
    s = prunefl(reconfig_every=2)
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    model = s.aggregate(1, model, [train(model, "a", 1)])
    model = s.aggregate(2, model, [train(model, "a", 2)])  # due, but no importance came
    assert s.reconfigurations == 0 and s.reconfiguration_due(3)
    model = s.aggregate(3, model, [train(model, "a", 3, importance=True)])
    assert s.reconfigurations == 1 and not s.reconfiguration_due(4) and s.reconfiguration_due(5)


def test_prunefl_d_decays_with_its_half_life() -> None:
    """d halves every d_half_life rounds, so later reconfigurations disturb the model less."""
    s = prunefl(protect_fraction=0.3, d_half_life=100)
    assert s.protect_d(0) == pytest.approx(0.3)
    assert s.protect_d(100) == pytest.approx(0.15)
    assert s.protect_d(300) == pytest.approx(0.0375)


def test_prunefl_rejects_foreign_masks_and_partial_importance() -> None:
    """Between reconfigurations every device trains exactly the global mask."""
    s = prunefl()
    model = s.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    moved = train(model, "d", 1)
    masks = dict(moved.masks)
    masks["fc.weight"] = masks["fc.weight"].copy()
    masks["fc.weight"][0, 0] = False
    weights = dict(moved.weights)
    weights["fc.weight"] = np.where(masks["fc.weight"], weights["fc.weight"], 0).astype(np.float32)
    with pytest.raises(ValidationError) as err:
        s.check_result(model, ClientResult("d", 5, weights, masks))
    assert err.value.reason == "foreign_mask"
    partial = train(model, "d", 2, importance=True)
    imp = {"fc.weight": partial.importance["fc.weight"]}
    with pytest.raises(ValidationError) as err:
        s.check_result(model, ClientResult("d", 5, partial.weights, partial.masks, imp))
    assert err.value.reason == "bad_importance"


def test_prunefl_state_round_trip_gives_identical_reconfigurations() -> None:
    """Resuming from state_dict reproduces the same masks, weights and time model."""
    profile = linear_profile({"conv.weight": 1e-8, "fc.weight": 1e-6})

    def rounds(s: PruneFL, model: GlobalModel, start: int, stop: int) -> GlobalModel:
        for r in range(start, stop):
            report = s.configure_round(r, model, candidates(), np.random.default_rng(r))
            results: Sequence[ClientResult] = [
                train(model, d, 100 * r + i, importance=report.report_importance, profile=profile)
                for i, d in enumerate(report.selected)
            ]
            model = s.aggregate(r, model, results)
        return model

    a = prunefl(reconfig_every=3)
    model = a.initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    mid = rounds(a, model, 1, 5)
    b = prunefl(reconfig_every=3)
    b.load_state_dict(a.state_dict())
    end_a, end_b = rounds(a, mid, 5, 8), rounds(b, mid, 5, 8)
    assert a.reconfigurations == b.reconfigurations == 2
    assert_models_equal(end_a, end_b)
    assert a.time_model(end_a) == b.time_model(end_b)
    with pytest.raises(ConfigError, match="missing"):
        b.load_state_dict({"reconfigs": np.array(1)})


def test_cost_model_counts_an_unmasked_model_as_dense() -> None:
    """FedAvg's dense model can be timed with PruneFL's cost model for comparisons."""
    cost = CostModel(c0=1.0, per_param={"fc.weight": 0.5})
    dense = FedAvg().initialize(init_weights(), "m", PRUNABLE, np.random.default_rng(0))
    assert cost.time(dense) == pytest.approx(1.0 + 0.5 * 240)

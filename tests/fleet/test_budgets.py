"""Per-device density budgets: nested subnetworks, their validation and their aggregation.

Why it matters: a slow device trains a subset of the global mask; if the subset were not the
same on both sides, or the aggregation averaged zeros in where a device did not train, the
global model would be corrupted by exactly the devices budgets are meant to include.
"""

from __future__ import annotations

import numpy as np
import pytest

from device.errors import ConfigError, ValidationError
from device.sparse.nested import (
    global_density,
    largest_first,
    nested_count,
    nested_densities,
    nested_masks,
)
from device.wire import envelope
from device.wire.messages import (
    DeviceProfile,
    Envelope,
    LayerProfile,
    LocalTraining,
    ProfilePoint,
    Readjust,
    RoundCommand,
)
from fleet.strategies.aggregate import masked_weighted_mean
from fleet.strategies.base import ClientResult, GlobalModel
from fleet.strategies.budgets import BudgetPolicy, as_f32, memory_density
from fleet.strategies.fedavg import FedAvg
from fleet.strategies.feddst import FedDST, FedDSTOptions
from fleet.strategies.nested import (
    aggregate_budgeted,
    assigned_masks,
    check_budgeted,
    fill_unheld,
    nested_vote_merge,
    per_position_counts,
    trained_density,
)


def _model(density: float = 0.5, seed: int = 0) -> GlobalModel:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(8, 10)).astype(np.float32)
    cut = np.quantile(np.abs(w), 1 - density)
    mask = np.abs(w) >= cut
    w[~mask] = 0.0
    bias = rng.normal(size=(8,)).astype(np.float32)
    return GlobalModel(3, {"w": w, "b": bias}, {"w": mask}, "mlp")


def _result(
    model: GlobalModel, device: str, mask: np.ndarray, shift: float, n: int = 10
) -> ClientResult:
    w = np.where(mask, model.weights["w"] + shift, 0.0).astype(np.float32)
    b = (model.weights["b"] + shift).astype(np.float32)
    return ClientResult(device, n, {"w": w, "b": b}, {"w": mask})


# -- nested subnetworks ---------------------------------------------------------------------


def test_nested_mask_keeps_the_largest_magnitudes_of_the_global_mask() -> None:
    model = _model(0.5)
    sub = nested_masks(model.weights, model.masks, 0.25)["w"]
    g = model.masks["w"]
    assert not (sub & ~g).any(), "a nested mask must be a subset of the global mask"
    assert sub.sum() == nested_count(int(g.sum()), 0.25, global_density(model.masks)) == 20
    kept = np.abs(model.weights["w"][sub])
    dropped = np.abs(model.weights["w"][g & ~sub])
    assert kept.min() >= dropped.max()


def test_smaller_budgets_give_subsets_of_larger_ones() -> None:
    model = _model(0.5)
    masks = [nested_masks(model.weights, model.masks, b)["w"] for b in (0.4, 0.2, 0.05)]
    assert not (masks[1] & ~masks[0]).any()
    assert not (masks[2] & ~masks[1]).any()
    assert masks[2].sum() >= 1


def test_ties_are_broken_by_the_lower_index_and_no_budget_keeps_the_global_mask() -> None:
    w = np.ones((2, 4), dtype=np.float32)
    masks = {"w": np.ones((2, 4), dtype=bool)}
    sub = nested_masks({"w": w}, masks, 0.5)["w"]
    assert sub.reshape(-1).tolist() == [True] * 4 + [False] * 4
    assert nested_masks({"w": w}, masks, 0.0)["w"] is masks["w"]
    assert nested_masks({"w": w}, masks, 1.0)["w"] is masks["w"]


def test_the_budget_travels_in_the_round_command_as_float32() -> None:
    cmd = RoundCommand(model_version=1, model_digest=b"\0" * 32, density_budget=0.1)
    back = envelope.decode(envelope.encode(Envelope(body=cmd)))
    assert isinstance(back.body, RoundCommand)
    assert back.body.density_budget == as_f32(0.1)


# -- validation -----------------------------------------------------------------------------


def test_an_update_within_its_subnetwork_passes() -> None:
    model = _model(0.5)
    sub = assigned_masks(model, 0.25)["w"]
    check_budgeted(FedAvg(), model, _result(model, "d", sub, 0.1), 0.25, None)
    assert trained_density(model, _result(model, "d", sub, 0.1)) == pytest.approx(0.25)


def test_an_update_denser_than_its_budget_is_rejected_as_over_budget() -> None:
    model = _model(0.5)
    with pytest.raises(ValidationError) as err:
        check_budgeted(FedAvg(), model, _result(model, "d", model.masks["w"], 0.1), 0.25, None)
    assert err.value.reason == "over_budget"


def test_positions_outside_the_subnetwork_are_rejected() -> None:
    model = _model(0.5)
    sub = assigned_masks(model, 0.25)["w"].copy()
    outside = np.flatnonzero(model.masks["w"].reshape(-1) & ~sub.reshape(-1))[0]
    inside = np.flatnonzero(sub.reshape(-1))[0]
    sub.reshape(-1)[inside] = False
    sub.reshape(-1)[outside] = True  # same count, one position moved out
    with pytest.raises(ValidationError) as err:
        check_budgeted(FedAvg(), model, _result(model, "d", sub, 0.1), 0.25, None)
    assert err.value.reason == "outside_subnetwork"


def test_a_feddst_readjust_round_lets_a_budgeted_device_move_alpha_of_its_positions() -> None:
    model = _model(0.5)
    strategy = FedDST(FedDSTOptions(density=0.5))
    sub = assigned_masks(model, 0.25)["w"].copy()
    flat = sub.reshape(-1)
    moved_out = np.flatnonzero(~flat)[:2]  # two grown positions (20 kept; alpha 0.1 -> 2)
    flat[np.flatnonzero(flat)[:2]] = False
    flat[moved_out] = True
    result = _result(model, "d", sub, 0.1)
    check_budgeted(strategy, model, result, 0.25, Readjust(alpha=0.1))
    with pytest.raises(ValidationError) as err:
        check_budgeted(strategy, model, result, 0.25, Readjust(alpha=0.05))
    assert err.value.reason == "outside_subnetwork"
    with pytest.raises(ValidationError):
        check_budgeted(strategy, model, result, 0.25, None)


def test_an_unbudgeted_device_gets_the_strategys_own_check() -> None:
    model = _model(0.5)
    sub = assigned_masks(model, 0.25)["w"]
    with pytest.raises(ValidationError) as err:
        check_budgeted(FedAvg(), model, _result(model, "d", sub, 0.1), 0.0, None)
    assert err.value.reason == "foreign_mask"


# -- aggregation ----------------------------------------------------------------------------


def test_per_position_counts_and_the_masked_mean_ignore_devices_that_did_not_train_there() -> None:
    model = _model(0.5)
    small = assigned_masks(model, 0.1)["w"]
    results = [
        _result(model, "a", model.masks["w"], 1.0, n=10),
        _result(model, "b", model.masks["w"], 3.0, n=30),
        _result(model, "c", small, 100.0, n=60),
    ]
    counts = per_position_counts(model, results)["w"]
    assert (counts[small] == 3).all()
    assert (counts[model.masks["w"] & ~small] == 2).all()
    assert (counts[~model.masks["w"]] == 0).all()
    filled = fill_unheld(model, results)
    new = FedAvg().aggregate(1, model, filled)
    g = model.weights["w"]
    only_big = model.masks["w"] & ~small
    # Held by a and b only: (10 * 1 + 30 * 3) / 40 = 2.5, not diluted by c's absence.
    np.testing.assert_allclose(new.weights["w"][only_big], g[only_big] + 2.5, rtol=1e-5)
    expected_small = (10 * 1.0 + 30 * 3.0 + 60 * 100.0) / 100
    np.testing.assert_allclose(new.weights["w"][small], g[small] + expected_small, rtol=1e-5)
    direct = masked_weighted_mean(
        [r.weights["w"] for r in results], [r.masks["w"] for r in results], [10, 30, 60], g
    )
    np.testing.assert_allclose(new.weights["w"], direct, rtol=1e-6)


def test_feddst_voting_counts_a_device_only_where_it_had_a_vote() -> None:
    model = _model(0.5)
    strategy = FedDST(FedDSTOptions(density=0.5, min_votes=2))
    strategy.load_state_dict({"budget/w": np.array(int(model.masks["w"].sum()))})
    small_masks = assigned_masks(model, 0.1)
    small = small_masks["w"]
    # One unbudgeted device keeps the global mask; one budgeted device its subnetwork. With
    # min_votes=2 a global position outside `small` has one voter, so one vote suffices.
    results = [
        _result(model, "big", model.masks["w"], 0.5),
        _result(model, "small", small, 0.5),
    ]
    weights, masks = nested_vote_merge(
        model, results, {"small": small_masks}, strategy.budgets, min_votes=2, fill_to_budget=False
    )
    assert np.array_equal(masks["w"], model.masks["w"])
    # Where nobody had a vote (only budgeted devices, none assigned there), the global position
    # is kept with its global value: an abstention, not a vote against.
    only_small = [_result(model, "small", small, 0.5)]
    weights, masks = nested_vote_merge(
        model,
        only_small,
        {"small": small_masks},
        strategy.budgets,
        min_votes=1,
        fill_to_budget=False,
    )
    assert np.array_equal(masks["w"], model.masks["w"])
    unheld = model.masks["w"] & ~small
    np.testing.assert_array_equal(weights["w"][unheld], model.weights["w"][unheld])
    new = aggregate_budgeted(strategy, 1, model, results, {"small": 0.1})
    assert new.version == model.version + 1
    assert int(new.masks["w"].sum()) == strategy.budgets["w"]


# -- choosing budgets -------------------------------------------------------------------------


def _profile(layer_s: float, overhead_s: float = 0.001) -> DeviceProfile:
    points = tuple(ProfilePoint(d, layer_s * d) for d in (1.0, 0.5, 0.2, 0.1))
    return DeviceProfile("mlp", 32, overhead_s, (LayerProfile("w", 80, points),))


def test_budgets_option_parses_none_auto_and_tags() -> None:
    assert not BudgetPolicy.parse("none").active
    assert BudgetPolicy.parse("auto").mode == "auto"
    assert BudgetPolicy.parse({"pi-zero-2w": 0.05}).by_tag == {"pi-zero-2w": 0.05}
    for bad in ("fast", {"x": 0.0}, {"x": 2}, 3):
        with pytest.raises(ConfigError):
            BudgetPolicy.parse(bad)


def test_auto_gives_a_slower_device_a_smaller_density_that_fits_the_deadline() -> None:
    model = _model(0.5)
    policy = BudgetPolicy(mode="auto")
    training = LocalTraining(epochs=1, batch_size=32)

    def choose(layer_s: float) -> float:
        return policy.auto(
            model,
            memory_bytes=4 * 2**30,
            profile=_profile(layer_s),
            num_examples=320,
            training=training,
            round_timeout_s=1.0,
        ).density

    fast, slow = choose(0.01), choose(0.4)
    assert fast == 0.0  # fits whole: no budget
    assert 0.0 < slow < 0.5
    assert choose(0.8) < slow


def test_auto_gives_the_default_density_and_a_warning_for_absurd_reports() -> None:
    model = _model(0.5)
    policy = BudgetPolicy(mode="auto")
    common = {"num_examples": 100, "training": LocalTraining(), "round_timeout_s": 10.0}
    for memory, profile, what in (
        (0, _profile(0.01), "memory"),
        (2**30, None, "no profile"),
        (2**30, _profile(-1.0), "negative"),
        (2**30, _profile(float("nan")), "non-finite"),
    ):
        choice = policy.auto(model, memory_bytes=memory, profile=profile, **common)  # type: ignore[arg-type]
        assert choice.density == 0.0 and choice.by == "default"
        assert choice.warning, what


def test_memory_density_shrinks_with_memory() -> None:
    model = _model(0.5)
    assert memory_density(model, 2**30) == pytest.approx(0.5)
    assert memory_density(model, 100) == 0.0


def test_auto_shrinks_a_hopeless_device_only_where_shrinking_buys_time() -> None:
    """A device that misses the deadline at every budget gets the floor when its time falls
    with density (sparse compute), and keeps the whole mask when it does not (masked dense)."""
    model = _model(0.5)
    policy = BudgetPolicy(mode="auto", min_fraction=0.2)
    flat = DeviceProfile(
        "mlp", 32, 0.001, (LayerProfile("w", 80, tuple(ProfilePoint(d, 5.0) for d in (1, 0.1))),)
    )
    common = {"memory_bytes": 2**32, "num_examples": 320, "round_timeout_s": 1.0}
    training = LocalTraining(epochs=1, batch_size=32)
    sparse = policy.auto(model, profile=_profile(50.0), training=training, **common)  # type: ignore[arg-type]
    dense = policy.auto(model, profile=flat, training=training, **common)  # type: ignore[arg-type]
    assert sparse.density == pytest.approx(0.1)  # the floor: 0.2 of the global 0.5
    assert dense.density == 0.0


def test_a_run_refuses_budgets_with_the_next_late_policy() -> None:
    from fleet.runtime.spec import RunSpec

    common = {"run_id": "r", "model_name": "mlp", "strategy": "feddst", "rounds": 1}
    RunSpec(**common, clients_per_round=1, budgets="auto")
    with pytest.raises(ConfigError, match="late_policy"):
        RunSpec(**common, clients_per_round=1, budgets="auto", late_policy="next")


def test_largest_first_is_a_stable_sort_by_decreasing_magnitude() -> None:
    """The O(n) selection keeps exactly what a stable sort would: ties go to the lower index,
    on both sides of the wire (the fleet manager validates against the same subnetwork)."""
    rng = np.random.default_rng(3)
    for trial in range(500):
        n = int(rng.integers(1, 50))
        values = rng.integers(0, 4, n) if trial % 2 else rng.random(n)
        magnitude = values.astype(np.float32)
        keep = int(rng.integers(0, n + 2))
        expected = np.sort(np.argsort(-magnitude, kind="stable")[:keep])
        assert np.array_equal(largest_first(magnitude, keep), expected), (magnitude, keep)


def test_nested_densities_are_the_nested_masks_densities() -> None:
    """The kernel plan's densities (no ranking) match the subnetwork actually trained."""
    model = _model()
    masks = nested_masks(model.weights, model.masks, 0.1)
    expected = {n: float(m.sum()) / m.size for n, m in masks.items()}
    assert nested_densities(model.masks, 0.1) == pytest.approx(expected)

"""Local training of a masked model: exact sparsity, FedDST readjust, PruneFL importance."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import device.trainer as trainer_module
from device.data import load_digits
from device.errors import ConfigError, DataError
from device.models import create_model, prunable_names
from device.optim import MomentumSGD, register_step_pre_hook
from device.sparse.density import erk
from device.sparse.masks import Masks, apply_masks, count_nonzero, initial_masks, mask_density
from device.trainer import RoundResult, evaluate, plan_steps, train_round
from device.wire.messages import GrowPolicy, LocalTraining, Readjust

torch.set_num_threads(1)

PRUNED = ("0.weight", "2.weight")


@dataclass(frozen=True)
class Data:
    x: torch.Tensor
    y: torch.Tensor


def make_data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> Data:
    """Linearly separable-ish synthetic data: the label is the argmax of a fixed projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    projection = torch.randn(features, classes, generator=torch.Generator().manual_seed(99))
    return Data(x, (x @ projection).argmax(dim=1))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_masks(model: nn.Module, density: float = 0.4) -> Masks:
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in PRUNED}
    return initial_masks(weights, erk({n: tuple(w.shape) for n, w in weights.items()}, density))


SETTINGS = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)


@contextmanager
def before_every_step(check: Callable[[MomentumSGD], None]) -> Iterator[list[int]]:
    """Run ``check(optimizer)`` right before every optimiser step; yields the call counter."""
    calls: list[int] = []

    def hook(optimizer: MomentumSGD) -> None:
        calls.append(1)
        check(optimizer)

    handle = register_step_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def param_masks(model: nn.Module, masks: Masks) -> list[tuple[nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    return [(params[n], m) for n, m in masks.items()]


# --- sparsity is exact at every step ----------------------------------------------------------


def test_masked_weights_gradients_and_momentum_are_zero_at_every_step() -> None:
    """Masked entries must never carry value, gradient or momentum, or the model leaks density."""
    model = make_model()
    masks = make_masks(model)
    pairs = param_masks(model, masks)

    def check(optimizer: MomentumSGD) -> None:
        for param, mask in pairs:
            assert param.grad is not None
            assert torch.all(param.grad[~mask] == 0), "gradient not masked before the step"
            assert torch.all(param.detach()[~mask] == 0), "weight not masked after the last step"
            buffer = optimizer.momentum_buffer(param)
            if buffer is not None:
                assert torch.all(buffer[~mask] == 0), "momentum not masked after the last step"

    with before_every_step(check) as calls:
        result = train_round(model, masks, make_data(), SETTINGS, seed=1)
    assert len(calls) == result.local_steps == 8
    for param, mask in pairs:
        assert torch.all(param.detach()[~mask] == 0)


def test_masked_entries_stay_zero_across_a_readjustment() -> None:
    """After a readjust the new mask holds: dropped entries lose their value and their momentum.

    The masks checked switch at the readjust step, so this fails if dropped momentum survives
    (it would push the dropped weights away from zero at the next step).
    """
    model = make_model()
    masks = make_masks(model)
    params = dict(model.named_parameters())
    readjust = Readjust(alpha=0.5, at_fraction=0.5)
    readjust_step = plan_steps(64, SETTINGS, readjust).readjust_step
    reference = train_round(
        make_model(), make_masks(make_model()), make_data(), SETTINGS, seed=3, readjust=readjust
    )
    step = [0]

    def check(optimizer: MomentumSGD) -> None:
        step[0] += 1
        current = masks if step[0] <= readjust_step else reference.masks
        for name, mask in current.items():
            param = params[name]
            assert torch.all(param.detach()[~mask] == 0)
            buffer = optimizer.momentum_buffer(param)
            if buffer is not None:
                assert torch.all(buffer[~mask] == 0)

    with before_every_step(check):
        result = train_round(model, masks, make_data(), SETTINGS, seed=3, readjust=readjust)
    assert result.mask_changed


# --- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.4, 0.9])
def test_deltas_are_trained_minus_initial_and_zero_outside_the_final_mask(density: float) -> None:
    """The upload is the change of every state_dict entry, restricted to the final mask, bit for
    bit (sparse layers keep only their start values on the mask, dense ones a whole copy)."""
    model = make_model()
    masks = make_masks(model, density)
    apply_masks(model, masks)
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    result = train_round(model, masks, make_data(), SETTINGS, seed=5)
    final = model.state_dict()
    assert set(result.deltas) == set(final)
    for name, delta in result.deltas.items():
        assert torch.equal(delta, final[name] - initial[name])
        if name in result.masks:
            assert torch.all(delta[~result.masks[name]] == 0)
    assert not result.mask_changed
    assert result.num_examples == 64
    assert result.importance == {}
    assert 0.0 <= result.metrics["train_accuracy"] <= 1.0
    assert math.isfinite(result.metrics["train_loss"]) and result.train_s > 0


def test_the_callers_masks_are_never_modified() -> None:
    """The agent keeps the global masks; a readjust must work on copies."""
    model = make_model()
    masks = make_masks(model)
    saved = {n: m.clone() for n, m in masks.items()}
    train_round(model, masks, make_data(), SETTINGS, seed=5, readjust=Readjust(alpha=0.5))
    assert all(torch.equal(masks[n], saved[n]) for n in masks)


def test_the_same_seed_gives_identical_deltas_and_another_seed_does_not() -> None:
    """Seeds come from blake2b(run/round/device), so a replay must match bit for bit."""

    def run(seed: int) -> RoundResult:
        model = make_model()
        return train_round(
            model,
            make_masks(model),
            make_data(),
            SETTINGS,
            seed=seed,
            readjust=Readjust(alpha=0.3, grow=GrowPolicy.RANDOM),
            report_importance=True,
        )

    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert all(torch.equal(a.importance[n], b.importance[n]) for n in a.importance)
    assert any(not torch.equal(a.deltas[n], c.deltas[n]) for n in a.deltas)


def test_steps_are_epochs_times_batches_capped_by_max_steps() -> None:
    """ceil(n / batch) steps per epoch (the last batch may be short), capped by max_steps."""
    assert plan_steps(65, SETTINGS, None).total_steps == 2 * 5
    capped = LocalTraining(epochs=3, batch_size=16, max_steps=7)
    model = make_model()
    assert train_round(model, make_masks(model), make_data(), capped, seed=0).local_steps == 7


def test_readjust_point_and_growth_window_default_to_half_way_and_the_last_epoch() -> None:
    """Defaults follow the paper's intent: readjust half way, grow by the last epoch's gradient."""
    settings = LocalTraining(epochs=4, batch_size=10)
    plan = plan_steps(100, settings, Readjust(alpha=0.1))
    assert (plan.total_steps, plan.readjust_step, plan.window) == (40, 20, (11, 20))
    at_end = plan_steps(100, settings, Readjust(alpha=0.1, at_fraction=1.0, grad_window=3))
    assert (at_end.readjust_step, at_end.window) == (40, (38, 40))
    early = plan_steps(100, settings, Readjust(alpha=0.1, at_fraction=0.1))
    assert (early.readjust_step, early.window) == (4, (1, 4))


# --- FedDST readjustment ----------------------------------------------------------------------


def test_readjust_keeps_per_layer_nnz_and_changes_the_mask() -> None:
    """The density budget is per layer and must survive the readjust."""
    model = make_model()
    masks = make_masks(model)
    result = train_round(model, masks, make_data(), SETTINGS, seed=2, readjust=Readjust(alpha=0.3))
    assert count_nonzero(result.masks) == count_nonzero(masks)
    assert result.mask_changed
    grown = sum(int((result.masks[n] & ~masks[n]).sum()) for n in masks)
    expected = sum(round(0.3 * int(m.sum())) for m in masks.values())
    assert grown == result.metrics["readjust_grown"] == expected


def test_grown_weights_and_momentum_are_zero_at_the_readjust_point_then_train() -> None:
    """Grown weights start at zero and, readjusting half way, train before the upload."""
    model = make_model()
    masks = make_masks(model)
    params = dict(model.named_parameters())
    readjust = Readjust(alpha=0.3, at_fraction=0.5)
    readjust_step = plan_steps(64, SETTINGS, readjust).readjust_step
    final_masks = train_round(
        make_model(), make_masks(make_model()), make_data(), SETTINGS, seed=4, readjust=readjust
    ).masks
    seen: list[bool] = []
    step = [0]

    def check(optimizer: MomentumSGD) -> None:
        step[0] += 1
        if step[0] == readjust_step + 1:  # the first step after the readjust
            for name, mask in masks.items():
                grown = final_masks[name] & ~mask
                assert grown.any()
                assert torch.all(params[name].detach()[grown] == 0)
                buffer = optimizer.momentum_buffer(params[name])
                assert buffer is not None
                assert torch.all(buffer[grown] == 0)
            seen.append(True)

    with before_every_step(check):
        result = train_round(model, masks, make_data(), SETTINGS, seed=4, readjust=readjust)
    assert seen == [True]
    grown_any = [result.deltas[n][result.masks[n] & ~masks[n]] for n in masks]
    assert all(bool((g != 0).any()) for g in grown_any), "grown weights did not train"


def test_readjust_at_the_end_uploads_grown_weights_as_zero() -> None:
    """at_fraction=1.0 is the reference behaviour: grown weights are in the mask but untrained."""
    model = make_model()
    masks = make_masks(model)
    result = train_round(
        model, masks, make_data(), SETTINGS, seed=4, readjust=Readjust(alpha=0.3, at_fraction=1.0)
    )
    for name, mask in masks.items():
        grown = result.masks[name] & ~mask
        assert grown.any()
        assert torch.all(result.deltas[name][grown] == 0)
        assert torch.all(dict(model.named_parameters())[name].detach()[grown] == 0)


def test_growth_uses_the_dense_gradient_summed_over_the_last_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a negligible learning rate the weights stay put, so the summed gradient over one epoch
    of equal batches equals (steps per epoch) x the full-data gradient, whatever the shuffle.
    Two epochs are trained; a window of both would give twice that."""
    captured: dict[int, torch.Tensor] = {}

    def spy(grad: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        captured[len(captured)] = grad.clone()
        return grad.abs_() if in_place else grad.abs()

    monkeypatch.setattr(trainer_module, "grow_scores_gradient", spy)
    model = make_model()
    masks = make_masks(model)
    reference = make_model()
    data = make_data()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in PRUNED:
            params[name].mul_(masks[name])
    loss = nn.functional.cross_entropy(reference(data.x), data.y)
    full = torch.autograd.grad(loss, [params[n] for n in PRUNED])
    settings = LocalTraining(epochs=2, batch_size=16, lr=1e-12, momentum=0.0, weight_decay=0.0)
    train_round(model, masks, data, settings, seed=0, readjust=Readjust(alpha=0.2, at_fraction=1.0))
    assert len(captured) == len(PRUNED)
    for i, expected in enumerate(full):
        assert torch.allclose(captured[i], 4 * expected, atol=1e-5)
        assert bool((captured[i][~masks[PRUNED[i]]] != 0).any()), "gradient was masked"


def test_random_growth_keeps_nnz_and_depends_on_the_seed() -> None:
    """SET growth draws from the round's seed: reproducible, yet different across seeds."""

    def masks_after(seed: int) -> Masks:
        model = make_model()
        return train_round(
            model,
            make_masks(model),
            make_data(),
            SETTINGS,
            seed=seed,
            readjust=Readjust(alpha=0.5, grow=GrowPolicy.RANDOM),
        ).masks

    start = make_masks(make_model())
    a, b, c = masks_after(1), masks_after(1), masks_after(2)
    assert count_nonzero(a) == count_nonzero(start)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# --- PruneFL importance -----------------------------------------------------------------------


def test_importance_is_the_summed_squared_dense_gradient_including_pruned_positions() -> None:
    """PruneFL ranks pruned parameters by their gradient; masking it first would hide them.

    One full-batch step: importance is exactly grad^2 of the loss at the start weights."""
    model = make_model()
    masks = make_masks(model)
    data = make_data()
    reference = make_model()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in PRUNED:
            params[name].mul_(masks[name])
    loss = nn.functional.cross_entropy(reference(data.x), data.y)
    grads = torch.autograd.grad(loss, [params[n] for n in PRUNED])
    one_step = LocalTraining(epochs=1, batch_size=64)
    result = train_round(model, masks, data, one_step, seed=0, report_importance=True)
    assert set(result.importance) == set(PRUNED)
    for name, grad in zip(PRUNED, grads, strict=True):
        assert torch.allclose(result.importance[name], grad.square(), rtol=1e-5, atol=1e-10)
        assert bool((result.importance[name][~masks[name]] > 0).any())


def test_importance_accumulates_over_all_local_steps() -> None:
    """More steps, more summed squared gradient: the sum runs over the whole round."""
    model_a, model_b = make_model(), make_model()
    short = train_round(
        model_a,
        make_masks(model_a),
        make_data(),
        LocalTraining(epochs=1, batch_size=16, max_steps=1),
        seed=0,
        report_importance=True,
    )
    long = train_round(
        model_b,
        make_masks(model_b),
        make_data(),
        LocalTraining(epochs=1, batch_size=16, max_steps=4),
        seed=0,
        report_importance=True,
    )
    for name in PRUNED:
        assert float(long.importance[name].sum()) > float(short.importance[name].sum())


# --- FedProx ----------------------------------------------------------------------------------


def test_fedprox_adds_mu_times_the_distance_to_the_global_weights() -> None:
    """One plain SGD step: the prox term moves each weight by -lr * mu * (w - w_global)."""
    lr, mu = 0.1, 0.5
    plain = LocalTraining(epochs=1, batch_size=64, lr=lr, momentum=0.0, weight_decay=0.0)
    prox = LocalTraining(epochs=1, batch_size=64, lr=lr, momentum=0.0, weight_decay=0.0, prox_mu=mu)
    model_a, model_b = make_model(), make_model()
    masks = make_masks(model_a)
    global_weights = {n: t + 0.25 for n, t in model_b.state_dict().items()}
    for name in PRUNED:
        global_weights[name] = global_weights[name] * masks[name]
    a = train_round(model_a, masks, make_data(), plain, seed=0)
    b = train_round(model_b, masks, make_data(), prox, seed=0, global_weights=global_weights)
    for name in a.deltas:
        expected = torch.full_like(a.deltas[name], lr * mu * 0.25)
        if name in masks:
            expected = expected * masks[name]
        assert torch.allclose(b.deltas[name] - a.deltas[name], expected, atol=1e-6)


def test_fedprox_defaults_to_the_round_start_weights_as_global() -> None:
    """Without explicit global weights the term pulls toward the received model: smaller deltas."""
    base = LocalTraining(epochs=3, batch_size=16, lr=0.1)
    prox = LocalTraining(epochs=3, batch_size=16, lr=0.1, prox_mu=5.0)
    model_a, model_b = make_model(), make_model()
    a = train_round(model_a, make_masks(model_a), make_data(), base, seed=0)
    b = train_round(model_b, make_masks(model_b), make_data(), prox, seed=0)

    def norm(result: RoundResult) -> float:
        return sum(float(d.square().sum()) for d in result.deltas.values())

    assert norm(b) < norm(a)


# --- inputs, kernels, evaluation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "readjust", "message"),
    [
        (LocalTraining(epochs=0), None, "epochs"),
        (LocalTraining(batch_size=0), None, "batch_size"),
        (LocalTraining(lr=0.0), None, "lr"),
        (LocalTraining(momentum=1.0), None, "momentum"),
        (LocalTraining(), Readjust(alpha=1.5), "alpha"),
        (LocalTraining(), Readjust(alpha=0.1, at_fraction=0.0), "at_fraction"),
        (LocalTraining(), Readjust(alpha=0.1, grad_window=-1), "grad_window"),
    ],
)
def test_impossible_settings_are_config_errors_naming_the_field(
    settings: LocalTraining, readjust: Readjust | None, message: str
) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match=message):
        train_round(model, make_masks(model), make_data(), settings, seed=0, readjust=readjust)


def test_an_empty_dataset_is_a_data_error() -> None:
    """A device without data must say so, not divide by zero."""
    model = make_model()
    empty = Data(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        train_round(model, make_masks(model), empty, SETTINGS, seed=0)


def test_a_kernel_plan_naming_an_unpruned_tensor_is_refused() -> None:
    """Sparse kernels exist only for masked weights."""
    model = make_model()
    with pytest.raises(ConfigError, match="not pruned"):
        train_round(
            model,
            make_masks(model),
            make_data(),
            SETTINGS,
            seed=0,
            kernel_plan=frozenset({"0.bias"}),
        )


@pytest.mark.parametrize("report_importance", [True, False])
@pytest.mark.parametrize("grow", [GrowPolicy.GRADIENT, GrowPolicy.RANDOM])
def test_sparse_kernels_give_the_same_round_as_masked_dense_and_are_detached_after(
    report_importance: bool, grow: GrowPolicy
) -> None:
    """The kernel plan changes how, not what, is computed: the same deltas, masks and importance
    (dense gradients are requested from the kernels on readjust windows and importance rounds;
    the momentum of kept values survives the readjust), and the model computes densely again
    afterwards."""
    pytest.importorskip("device.sparse.kernels")
    readjust = Readjust(alpha=0.3, grow=grow)

    def run(plan: frozenset[str]) -> tuple[RoundResult, nn.Module]:
        model = make_model()
        result = train_round(
            model,
            make_masks(model),
            make_data(),
            SETTINGS,
            seed=6,
            readjust=readjust,
            report_importance=report_importance,
            kernel_plan=plan,
        )
        return result, model

    dense, _ = run(frozenset())
    sparse, model = run(frozenset(PRUNED))
    for name in dense.deltas:
        assert torch.allclose(dense.deltas[name], sparse.deltas[name], atol=1e-5)
    assert (
        set(dense.importance)
        == set(sparse.importance)
        == (set(PRUNED) if report_importance else set())
    )
    for name in PRUNED:
        assert torch.equal(dense.masks[name], sparse.masks[name])
    for name in dense.importance:
        assert torch.allclose(dense.importance[name], sparse.importance[name], rtol=1e-4, atol=1e-8)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_kernel_layers_train_only_their_kept_values_and_give_the_dense_round() -> None:
    """With kernels the optimiser trains each planned weight's kept values ([nnz] tensors, so
    gradient and momentum are nnz-sized: the memory and time a sparse step saves) instead of the
    dense weight; the round must still equal the masked dense one and leave pruned weights 0."""
    pytest.importorskip("device.sparse.kernels")
    dense_model = make_model()
    dense = train_round(dense_model, make_masks(dense_model), make_data(), SETTINGS, seed=8)
    model = make_model()
    masks = make_masks(model)
    kept = sorted(int(m.sum()) for m in masks.values())
    weights = {id(p) for n, p in model.named_parameters() if n in PRUNED}

    def check(optimizer: MomentumSGD) -> None:
        trained = list(optimizer.tensors.values())
        assert not weights & {id(t) for t in trained}, "a planned dense weight is optimised"
        values = sorted(t.numel() for t in trained if t.dim() == 1 and t.numel() in kept)
        assert len(values) >= len(PRUNED)
        for tensor in trained:
            assert tensor.grad is not None and tensor.grad.shape == tensor.shape
            buffer = optimizer.momentum_buffer(tensor)
            assert buffer is None or buffer.shape == tensor.shape

    with before_every_step(check) as calls:
        sparse = train_round(
            model, masks, make_data(), SETTINGS, seed=8, kernel_plan=frozenset(PRUNED)
        )
    assert len(calls) == sparse.local_steps
    params = dict(model.named_parameters())
    for name in dense.deltas:
        assert torch.allclose(dense.deltas[name], sparse.deltas[name], atol=1e-5)
    for name in PRUNED:
        assert torch.all(params[name].detach()[~masks[name]] == 0)
        assert torch.allclose(params[name].detach(), dense_model.get_parameter(name), atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "readjust and importance", "fedprox", "kernels"])
def test_gradient_buffers_change_where_gradients_live_not_the_round(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Large linear layers compute their weight gradient into one buffer for the whole round
    (``device.gradbuffers``, engaged here for every layer): the round must be bit for bit the
    one without buffers, and each buffered weight's gradient one tensor at every step."""
    plan = frozenset({"0.weight"}) if case == "kernels" else frozenset[str]()
    options: dict[str, object] = {"kernel_plan": plan}
    if case == "readjust and importance":
        options.update(readjust=Readjust(alpha=0.3), report_importance=True)
    settings = LocalTraining(
        epochs=2,
        batch_size=16,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        prox_mu=0.1 if case == "fedprox" else 0.0,
    )

    def run(min_bytes: int) -> tuple[RoundResult, dict[str, list[torch.Tensor]]]:
        monkeypatch.setattr("device.gradbuffers.MIN_BYTES", min_bytes)
        model = make_model()
        buffered = set(PRUNED) - plan
        weights = {n: p for n, p in model.named_parameters() if n in buffered}
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in weights}

        def check(optimizer: MomentumSGD) -> None:
            for name, weight in weights.items():
                assert weight.grad is not None
                grads[name].append(weight.grad)  # held: a new gradient cannot reuse its memory

        with before_every_step(check):
            result = train_round(
                model,
                make_masks(model),
                make_data(),
                settings,
                seed=9,
                **options,
            )
        return result, grads

    plain, plain_grads = run(1 << 62)
    buffered, buffered_grads = run(0)
    for name, seen in buffered_grads.items():
        assert len(seen) == buffered.local_steps and all(g is seen[0] for g in seen), name
        assert len({id(g) for g in plain_grads[name]}) == plain.local_steps, name
    for name in plain.deltas:
        assert torch.equal(plain.deltas[name], buffered.deltas[name]), name
    for name in plain.masks:
        assert torch.equal(plain.masks[name], buffered.masks[name]), name
    assert plain.importance.keys() == buffered.importance.keys()
    for name in plain.importance:
        assert torch.equal(plain.importance[name], buffered.importance[name]), name


def test_an_all_kept_round_is_torch_sgd_with_momentum_and_weight_decay_exactly() -> None:
    """The trainer folds weight decay into the gradient itself (to save torch's temporary): with
    nothing pruned the round must be bit-for-bit torch's own SGD on the same batches."""
    settings = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.01)
    data = make_data()
    model = make_model()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    result = train_round(model, masks, data, settings, seed=4)

    reference = make_model()
    initial = {n: t.clone() for n, t in reference.state_dict().items()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    shuffle = torch.Generator().manual_seed(trainer_module.derive_seed(4, "shuffle"))
    for _ in range(settings.epochs):
        order = torch.randperm(64, generator=shuffle)
        for first in range(0, 64, 16):
            batch = order[first : first + 16]
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    for name, value in reference.state_dict().items():
        assert torch.equal(result.deltas[name], value - initial[name]), name


def test_evaluate_returns_mean_loss_and_accuracy_and_restores_the_mode() -> None:
    """Evaluation matches a direct computation and leaves the model as it found it."""
    model = make_model()
    data = make_data(n=50)
    model.train()
    loss, accuracy = evaluate(model, data, batch_size=7)
    with torch.no_grad():
        logits = model(data.x)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, data.y)), rel=1e-5)
    assert accuracy == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))
    assert model.training


def test_sparse_mlp_learns_digits_far_above_chance() -> None:
    """The whole device path works end to end: mlp at density 0.2 (ERK, magnitude init) with a
    FedDST readjust, 3 local epochs at lr 0.05 on the digits train split (1,347 images, ~0.1 s).

    Chance is 0.10 (10 balanced classes); three seeds measured 0.94-0.95 test accuracy (0.84-0.87
    at FedDST's lr 0.01, too close to a threshold for 3 epochs), so 0.80
    leaves room for platform noise while failing on anything that breaks learning.
    """
    train, test = load_digits(split="train"), load_digits(split="test")
    model = create_model("mlp", seed=0)
    params = dict(model.named_parameters())
    names = prunable_names(model)
    masks = initial_masks(
        {n: params[n] for n in names}, erk({n: tuple(params[n].shape) for n in names}, 0.2)
    )
    _, accuracy_before = evaluate(model, test)
    result = train_round(
        model, masks, train, LocalTraining(epochs=3, lr=0.05), seed=0, readjust=Readjust(alpha=0.2)
    )
    _, accuracy = evaluate(model, test)
    assert mask_density(result.masks) == pytest.approx(0.2, abs=1e-3)
    assert accuracy_before < 0.3
    assert accuracy > 0.8


@pytest.mark.parametrize("grow", [GrowPolicy.GRADIENT, GrowPolicy.RANDOM])
def test_momentum_on_the_mask_trains_the_round_a_dense_buffer_trains(
    monkeypatch: pytest.MonkeyPatch, grow: GrowPolicy
) -> None:
    """Below COMPACT_MOMENTUM_BELOW the momentum lives on the mask (and moves with it at the
    readjustment): the same deltas and masks, bit for bit, as with dense buffers."""
    readjust = Readjust(alpha=0.3, at_fraction=0.5, grow=grow)
    results = []
    for below in (1.0, 0.0):  # every masked weight compact, then none
        monkeypatch.setattr(trainer_module, "COMPACT_MOMENTUM_BELOW", below)
        model = make_model()
        masks = make_masks(model, density=0.2)
        results.append(train_round(model, masks, make_data(), SETTINGS, seed=5, readjust=readjust))
    compact, dense = results
    assert compact.mask_changed
    for name in dense.deltas:
        assert torch.equal(compact.deltas[name], dense.deltas[name]), name
    for name in dense.masks:
        assert torch.equal(compact.masks[name], dense.masks[name]), name


def test_momentum_of_a_sparse_weight_is_kept_on_its_mask_only() -> None:
    """What the compact momentum is for: at density 0.2 the optimiser holds k floats per
    masked weight, not one per entry."""
    model = make_model()
    masks = make_masks(model, density=0.2)
    sizes: dict[str, tuple[int, int]] = {}

    def check(optimizer: MomentumSGD) -> None:
        for name in PRUNED:
            buffer = optimizer.momenta.get(name)
            if buffer is not None:
                sizes[name] = (buffer.numel(), int(torch.count_nonzero(masks[name])))

    with before_every_step(check):
        train_round(model, masks, make_data(), SETTINGS, seed=1)
    assert set(sizes) == set(PRUNED)
    assert all(numel == kept for numel, kept in sizes.values()), sizes

"""FedDST's growth gradient held in a weight's own gradient buffer (device.growth) against a
separate sum: the same scores, the same readjustment, no weight off its mask ever trained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import device.trainer as trainer_module
from device.data import Dataset
from device.gradbuffers import buffered_names
from device.growth import GrowthGradient
from device.trainer import train_round
from device.wire.messages import LocalTraining, Readjust

torch.set_num_threads(1)

BIG = "0.weight"  # 512 x 1024 float32: 2 MiB, so its gradient has a round-long buffer


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def make_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = {BIG: torch.rand(512, 1024, generator=g) < 0.2, "2.weight": torch.rand(10, 512) < 0.5}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    return masks


def make_data() -> Dataset:
    g = torch.Generator().manual_seed(2)
    return Dataset(torch.randn(96, 1024, generator=g), torch.randint(0, 10, (96,), generator=g), 10)


def test_only_the_big_layer_is_buffered() -> None:
    """The premise of the end-to-end tests below: one layer with a sum in its gradient, one
    with a separate sum."""
    assert buffered_names(make_model()) == {BIG}


def record_in_gradient(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[str]]:
    """The ``in_gradient`` set of every GrowthGradient built from now on, in order."""
    used: list[frozenset[str]] = []
    original = GrowthGradient.__init__

    def recording(
        self: GrowthGradient, params: object, in_gradient: frozenset[str], *rest: object
    ) -> None:
        original(self, params, in_gradient, *rest)  # type: ignore[arg-type]
        used.append(in_gradient)

    monkeypatch.setattr(GrowthGradient, "__init__", recording)
    return used


def run(
    monkeypatch: pytest.MonkeyPatch,
    *,
    in_gradient: bool,
    momentum: float = 0.9,
    kernel_plan: frozenset[str] = frozenset(),
) -> tuple[nn.Module, dict[str, torch.Tensor], list[frozenset[str]], object]:
    """One readjusting round (3 epochs of 6 steps, readjust after step 9, window 4..9); the
    sums held where asked. Returns the trained model, the grow scores by name (before |.|),
    the ``in_gradient`` sets the rounds used, and the round's result."""
    scores: dict[str, torch.Tensor] = {}
    names = iter([BIG, "2.weight"])

    def spy(grad: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        scores[next(names)] = grad.clone()
        return grad.abs_() if in_place else grad.abs()

    monkeypatch.setattr(trainer_module, "grow_scores_gradient", spy)
    used = record_in_gradient(monkeypatch)
    if not in_gradient:
        monkeypatch.setattr(GrowthGradient, "eligible", staticmethod(lambda *a: frozenset()))
    model = make_model()
    masks = make_masks(model)
    settings = LocalTraining(epochs=3, batch_size=16, lr=0.05, momentum=momentum, weight_decay=1e-3)
    readjust = Readjust(alpha=0.1, at_fraction=0.5)
    result = train_round(
        model, masks, make_data(), settings, seed=4, readjust=readjust, kernel_plan=kernel_plan
    )
    monkeypatch.undo()
    return model, scores, used, result


@pytest.mark.parametrize(
    ("momentum", "kernels"), [(0.9, False), (0.0, False), (0.9, True)], ids=["sgdm", "sgd", "csr"]
)
def test_a_sum_in_the_gradient_gives_the_separate_sums_scores_and_round(
    monkeypatch: pytest.MonkeyPatch, momentum: float, kernels: bool
) -> None:
    """The big layer's sum lives in its gradient (momentum on a support, or none, or trained
    by sparse kernels through its values, whose backward adds each step's dense product to the
    weight's gradient), the small layer's apart; against a round with every sum apart: the same
    grow scores off the start mask up to float rounding (the sums add in another order), the
    same new masks, weights and deltas; and the weights stay exactly 0 off the final masks (the
    steps in the window subtracted lr times the sum there before it was cleared)."""
    plan = frozenset({BIG}) if kernels else frozenset()
    model_a, scores_a, used_a, a = run(
        monkeypatch, in_gradient=True, momentum=momentum, kernel_plan=plan
    )
    model_b, scores_b, used_b, b = run(
        monkeypatch, in_gradient=False, momentum=momentum, kernel_plan=plan
    )
    assert used_a == [frozenset({BIG})] and used_b == [frozenset()]
    start = make_masks(make_model())
    for name in (BIG, "2.weight"):
        off = ~start[name]
        torch.testing.assert_close(scores_a[name][off], scores_b[name][off], rtol=1e-5, atol=1e-7)
        assert bool((scores_a[name][off] != 0).any())
    assert a.mask_changed  # type: ignore[attr-defined]
    for name, mask in b.masks.items():  # type: ignore[attr-defined]
        # Tied scores would break to the same entry; a rounding difference at the threshold
        # could swap one pair. Seeded: none here.
        assert torch.equal(a.masks[name], mask)  # type: ignore[attr-defined]
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    for name, param in params_a.items():
        torch.testing.assert_close(param, params_b[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            a.deltas[name],  # type: ignore[attr-defined]
            b.deltas[name],  # type: ignore[attr-defined]
            rtol=1e-4,
            atol=1e-6,
        )
    for name, mask in a.masks.items():  # type: ignore[attr-defined]
        off = params_a[name].detach()[~mask]
        assert torch.equal(off, torch.zeros_like(off)), f"{name} trained off its mask"


def test_importance_or_fedprox_keep_every_sum_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds that read each step's whole gradient (PruneFL's importance, FedProx's term) hold
    no sum in a gradient."""
    used = record_in_gradient(monkeypatch)
    readjust = Readjust(alpha=0.1, at_fraction=0.5)
    plain = LocalTraining(epochs=1, batch_size=32, lr=0.05)
    prox = LocalTraining(epochs=1, batch_size=32, lr=0.05, prox_mu=0.1)
    for settings, importance in ((plain, True), (prox, False), (plain, False)):
        model = make_model()
        train_round(
            model,
            make_masks(model),
            make_data(),
            settings,
            seed=1,
            readjust=readjust,
            report_importance=importance,
        )
    assert used == [frozenset(), frozenset(), frozenset({BIG})]


def test_eligible_names_buffered_weights_whose_optimiser_reads_the_mask_only() -> None:
    params = dict(make_model().named_parameters())
    pruned = {name: params[name] for name in (BIG, "2.weight")}
    supports = {BIG: torch.tensor([0, 5])}
    assert GrowthGradient.eligible(pruned, frozenset({BIG}), supports, 0.9) == {BIG}
    assert GrowthGradient.eligible(pruned, frozenset({BIG}), {}, 0.9) == frozenset()
    assert GrowthGradient.eligible(pruned, frozenset({BIG}), {}, 0.0) == {BIG}
    assert GrowthGradient.eligible(pruned, frozenset(), supports, 0.9) == frozenset()
    untrained = frozenset({"2.weight"})  # trained through kernel values: any size, any momentum
    assert GrowthGradient.eligible(pruned, frozenset(), {}, 0.9, untrained) == {"2.weight"}
    with pytest.raises(ValueError, match="not pruned"):
        GrowthGradient(pruned, frozenset({"0.bias"}))


def test_settle_clears_the_weight_off_the_mask_and_the_gradient_on_it() -> None:
    """After a window step: weight +0.0 off the mask (even where the sum overflowed to inf or
    NaN), untouched on it; gradient 0 on the mask, the sum kept off it."""
    weight = nn.Parameter(torch.tensor([1.0, -0.5, float("inf"), float("nan")]))
    mask = torch.tensor([True, False, False, False])
    growth = GrowthGradient({"w": weight}, frozenset({"w"}))
    assert growth.kept(3, (2, 5)) == {"w"} and growth.kept(2, (2, 5)) == frozenset()
    for supports in ({}, {"w": torch.tensor([0])}):
        weight.grad = torch.tensor([0.25, 3.0, -4.0, 5.0])
        growth.settle({"w": weight}, {"w": mask}, supports)
        assert weight.detach().tolist() == [1.0, 0.0, 0.0, 0.0]
        assert not torch.signbit(weight.detach()).any()
        assert weight.grad.tolist() == [0.0, 3.0, -4.0, 5.0]
    total = growth.take("w", weight)
    assert weight.grad is None and total.tolist() == [0.0, 3.0, -4.0, 5.0]


def test_separate_sums_start_at_the_first_gradient_and_default_to_zero() -> None:
    weight = nn.Parameter(torch.zeros(3))
    idle = nn.Parameter(torch.zeros(2))
    growth = GrowthGradient({"w": weight, "idle": idle}, frozenset())
    for step in (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.0])):
        weight.grad = step
        growth.add({"w": weight, "idle": idle})
    assert growth.take("w", weight).tolist() == [1.5, -1.0, 0.5]
    assert growth.take("idle", idle).tolist() == [0.0, 0.0]

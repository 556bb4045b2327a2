"""Local training of a masked model for one round; FedDST readjustment; PruneFL importance.

``train_round`` trains ``model`` in place on the device's examples with SGD (momentum, weight
decay, optional FedProx term) while keeping the sparse structure exact: after every step the
masked weights, their gradients and their momentum are zero. It can readjust the mask once during
the round (FedDST) and accumulate squared dense gradients (PruneFL importance). Everything random
draws from generators seeded from ``seed``, so two runs with the same inputs give identical
results; no global RNG state is read or set (the models here have no dropout).

Per step, in this order (why: each quantity must see the gradient it is defined on):
  1. forward, cross-entropy loss, backward: dense gradients, masked positions included;
  2. PruneFL importance += grad^2 and the FedDST growth window += grad (dense, before masking);
  3. FedProx: grad += mu * (w - w_global);
  4. masked gradients := 0; ``optimizer.step()``; masked weights and momentum := 0;
  5. at the readjust step: drop and grow per layer, grown weights and momentum start at 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from device.errors import ConfigError, DataError
from device.seeding import derive_seed
from device.sparse.masks import Masks, apply_masks, check_masks, masks_equal
from device.sparse.policies import (
    drop_scores_magnitude,
    grow_scores_gradient,
    grow_scores_random,
    n_to_readjust,
    readjust_mask,
    zero_entries,
)
from device.wire.messages import GrowPolicy, LocalTraining, Readjust

if TYPE_CHECKING:
    from device.sparse.kernels import KernelHandle


class Examples(Protocol):
    """What training needs of a dataset: inputs ``x`` (float, first dim = examples) and integer
    class labels ``y`` (one per example). ``device.data.Dataset`` is one."""

    @property
    def x(self) -> torch.Tensor: ...

    @property
    def y(self) -> torch.Tensor: ...


@dataclass
class RoundResult:
    """What one local round produced.

    ``deltas``: trained minus initial value of every state_dict entry (dense tensors, float32
    for float entries), zero outside ``masks`` for pruned tensors. ``masks``: the final masks
    (copies; the caller's are never modified). ``mask_changed``: whether they differ from the
    masks the round started with. ``importance``: for each pruned tensor, the sum over all
    local steps of the squared dense gradient of the loss (pruned positions included); empty
    unless asked. ``train_s``: wall seconds of the whole call. ``metrics``: ``train_loss`` (mean
    cross-entropy over the examples seen, nats) and ``train_accuracy`` (0..1), plus
    ``readjust_grown`` (entries regrown in total) on a readjust round.
    """

    deltas: dict[str, torch.Tensor]
    masks: Masks
    mask_changed: bool
    num_examples: int
    local_steps: int
    train_s: float
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepPlan:
    """When things happen in a round; steps are counted from 1.

    ``readjust_step``: the readjustment happens right after this step (0 = no readjust).
    ``window``: steps ``window[0]..window[1]`` (inclusive) feed the growth gradient.
    """

    steps_per_epoch: int
    total_steps: int
    readjust_step: int = 0
    window: tuple[int, int] = (0, -1)


def plan_steps(num_examples: int, settings: LocalTraining, readjust: Readjust | None) -> StepPlan:
    """The round's step counts: ``ceil(n / batch)`` steps an epoch (the last batch may be short),
    ``epochs`` epochs, capped by ``max_steps`` when that is > 0.

    The readjust step is ``round(at_fraction * total)`` clamped to [1, total]; the growth window
    is the ``grad_window`` steps up to and including it (0 = one epoch's worth of steps, i.e. the
    last local epoch), shorter when training has not run that long yet.
    """
    steps_per_epoch = math.ceil(num_examples / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps > 0:
        total = min(total, settings.max_steps)
    if readjust is None:
        return StepPlan(steps_per_epoch, total)
    at = min(total, max(1, round(readjust.at_fraction * total)))
    width = readjust.grad_window if readjust.grad_window > 0 else steps_per_epoch
    return StepPlan(steps_per_epoch, total, at, (max(1, at - width + 1), at))


def _check_settings(settings: LocalTraining, readjust: Readjust | None) -> None:
    checks = [
        (settings.epochs >= 1, f"epochs must be >= 1, got {settings.epochs}"),
        (settings.batch_size >= 1, f"batch_size must be >= 1, got {settings.batch_size}"),
        (settings.lr > 0 and math.isfinite(settings.lr), f"lr must be > 0, got {settings.lr}"),
        (0 <= settings.momentum < 1, f"momentum must be in [0, 1), got {settings.momentum}"),
        (settings.weight_decay >= 0, f"weight_decay must be >= 0, got {settings.weight_decay}"),
        (settings.prox_mu >= 0, f"prox_mu must be >= 0, got {settings.prox_mu}"),
        (settings.max_steps >= 0, f"max_steps must be >= 0, got {settings.max_steps}"),
    ]
    if readjust is not None:
        checks += [
            (0 <= readjust.alpha <= 1, f"readjust alpha must be in [0, 1], got {readjust.alpha}"),
            (
                0 < readjust.at_fraction <= 1,
                f"readjust at_fraction must be in (0, 1], got {readjust.at_fraction}",
            ),
            (readjust.grad_window >= 0, f"grad_window must be >= 0, got {readjust.grad_window}"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"local training settings: {message}")


def _check_data(data: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.x, data.y
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError("local training needs at least one example; the dataset is empty")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"dataset has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
            "expected one integer label per input"
        )
    if not x.is_floating_point():
        raise DataError(f"dataset inputs must be floating point, got {x.dtype}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"dataset labels must be integer class indices, got {y.dtype}")
    return x, y.long()


@contextmanager
def _kernels(model: nn.Module, masks: Masks, plan: frozenset[str]) -> Iterator[KernelHandle | None]:
    """Sparse kernels for the layers in ``plan`` for the duration of the block (none if empty).

    Imported lazily: a device whose plan is empty never loads the kernel module.
    """
    if not plan:
        yield None
        return
    unknown = plan - set(masks)
    if unknown:
        raise ConfigError(f"kernel plan names tensors that are not pruned: {sorted(unknown)}")
    from device.sparse.kernels import attach  # lazy: most devices never need it

    handle = attach(model, masks, plan)
    try:
        yield handle
    finally:
        handle.detach()


def _momentum(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> torch.Tensor | None:
    buffer = optimizer.state.get(param, {}).get("momentum_buffer")
    return buffer if isinstance(buffer, torch.Tensor) else None


def train_round(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Examples,
    settings: LocalTraining,
    *,
    seed: int,
    readjust: Readjust | None = None,
    report_importance: bool = False,
    global_weights: Mapping[str, torch.Tensor] | None = None,
    kernel_plan: frozenset[str] = frozenset(),
) -> RoundResult:
    """Train ``model`` in place for one round on ``data`` with its sparse structure ``masks``.

    ``seed`` (any int in [0, 2**64)) drives the shuffling and random growth. ``readjust``
    (FedDST) drops and regrows ``round(alpha * nnz_l)`` entries per layer once, after step
    ``plan_steps(...).readjust_step``. ``report_importance`` (PruneFL) returns summed squared
    dense gradients. ``global_weights`` is w_global of the FedProx term ``mu/2 ||w - w_global||^2``
    (default: the weights the round starts from). ``kernel_plan`` names pruned weights to
    compute with sparse kernels (``device.sparse.kernels``); on the steps that need dense weight
    gradients (every step with importance, the growth window) they are asked for the full one.
    """
    start = time.perf_counter()
    _check_settings(settings, readjust)
    x, y = _check_data(data)
    params = check_masks(model, masks)
    start_masks: Masks = {n: m.clone() for n, m in masks.items()}
    current: Masks = {n: m.clone() for n, m in masks.items()}
    inverse = {n: ~m for n, m in current.items()}
    apply_masks(model, current)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}

    plan = plan_steps(x.shape[0], settings, readjust)
    all_params = dict(model.named_parameters())
    prox_ref: dict[str, torch.Tensor] = {}
    if settings.prox_mu > 0:
        source = global_weights if global_weights is not None else initial
        missing = set(all_params) - set(source)
        if missing:
            raise ConfigError(f"FedProx global weights lack {sorted(missing)}")
        prox_ref = {n: source[n].detach().to(p.dtype) for n, p in all_params.items()}
    importance = {n: torch.zeros_like(p) for n, p in params.items()} if report_importance else {}
    gradient_growth = readjust is not None and readjust.grow == GrowPolicy.GRADIENT
    grow_sum = {n: torch.zeros_like(p) for n, p in params.items()} if gradient_growth else {}
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "shuffle"))

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    loss_sum = 0.0
    correct = 0
    seen = 0
    grown_total = 0
    step = 0
    model.train()
    with _kernels(model, current, kernel_plan) as handle:
        while step < plan.total_steps:
            order = torch.randperm(x.shape[0], generator=shuffle)
            for first in range(0, x.shape[0], settings.batch_size):
                if step == plan.total_steps:
                    break
                step += 1
                batch = order[first : first + settings.batch_size]
                xb, yb = x[batch], y[batch]
                in_window = plan.window[0] <= step <= plan.window[1]
                if handle is not None:
                    # Sparse kernels give weight gradients on the mask only, unless told that
                    # this step's dense gradient is needed (importance, growth window).
                    handle.full_weight_grad = report_importance or (gradient_growth and in_window)
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                torch.autograd.backward(loss)
                _prepare_gradients(
                    params,
                    inverse,
                    importance=importance,
                    grow_sum=grow_sum if gradient_growth and in_window else None,
                    prox=(all_params, prox_ref, settings.prox_mu),
                )
                optimizer.step()
                with torch.no_grad():
                    for name, param in params.items():
                        zero_entries(inverse[name], param, _momentum(optimizer, param))
                    loss_sum += float(loss) * yb.shape[0]
                    correct += int((logits.argmax(dim=1) == yb).sum())
                    seen += yb.shape[0]
                if readjust is not None and step == plan.readjust_step:
                    grown_total = _readjust(
                        params, current, optimizer, readjust, grow_sum, seed=seed
                    )
                    inverse = {n: ~m for n, m in current.items()}
                    grow_sum = {}
                    if handle is not None:
                        handle.refresh(current)

    deltas = _deltas(model.state_dict(), initial, current)
    metrics = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
    if readjust is not None:
        metrics["readjust_grown"] = float(grown_total)
    return RoundResult(
        deltas=deltas,
        masks=current,
        mask_changed=not masks_equal(current, start_masks),
        num_examples=int(x.shape[0]),
        local_steps=step,
        train_s=time.perf_counter() - start,
        importance=importance,
        metrics=metrics,
    )


def _prepare_gradients(
    params: Mapping[str, nn.Parameter],
    inverse: Masks,
    *,
    importance: Mapping[str, torch.Tensor],
    grow_sum: Mapping[str, torch.Tensor] | None,
    prox: tuple[Mapping[str, nn.Parameter], Mapping[str, torch.Tensor], float],
) -> None:
    """Between backward and the optimiser step: record dense gradients, add FedProx, mask.

    ``importance`` (may be empty) gets ``+= grad^2`` and ``grow_sum`` (None outside the growth
    window) ``+= grad``, both from the dense gradient; then ``grad += mu (w - w_global)`` for the
    parameters in the FedProx reference; finally the gradients at masked positions become zero.
    """
    all_params, prox_ref, mu = prox
    with torch.no_grad():
        for name, param in params.items():
            grad = param.grad
            if grad is None:
                continue
            if name in importance:
                importance[name].addcmul_(grad, grad)
            if grow_sum is not None:
                grow_sum[name].add_(grad)
        for name, ref in prox_ref.items():
            grad = all_params[name].grad
            if grad is not None:
                grad.add_(all_params[name] - ref, alpha=mu)
        for name, param in params.items():
            if param.grad is not None:
                param.grad.masked_fill_(inverse[name], 0.0)


def _deltas(
    final: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor], masks: Masks
) -> dict[str, torch.Tensor]:
    """``final - initial`` per state_dict entry (float32 for integer entries), zero off-mask."""
    deltas: dict[str, torch.Tensor] = {}
    for name, value in final.items():
        if value.is_floating_point():
            delta = value.detach() - initial[name]
        else:
            delta = value.detach().to(torch.float32) - initial[name].to(torch.float32)
        if name in masks:
            delta.masked_fill_(~masks[name], 0.0)
        deltas[name] = delta
    return deltas


def _readjust(
    params: Mapping[str, nn.Parameter],
    masks: Masks,
    optimizer: torch.optim.Optimizer,
    readjust: Readjust,
    grow_sum: Mapping[str, torch.Tensor],
    *,
    seed: int,
) -> int:
    """FedDST's drop-and-grow on every pruned tensor, in place on ``masks``, weights and momentum.

    Returns the number of entries grown in total. Dropped entries are zeroed (they are now
    masked); grown entries start at zero in the weight and in the momentum buffer.
    """
    generator = None
    if readjust.grow == GrowPolicy.RANDOM:
        generator = torch.Generator().manual_seed(derive_seed(seed, "grow"))
    grown_total = 0
    for name, param in params.items():
        mask = masks[name]
        n = n_to_readjust(readjust.alpha, int(mask.sum()))
        if generator is not None:
            grow_score = grow_scores_random(param.shape, generator)
        else:
            grow_score = grow_scores_gradient(grow_sum[name])
        result = readjust_mask(mask, drop_scores_magnitude(param), grow_score, n)
        zero_entries(result.dropped | result.grown, param, _momentum(optimizer, param))
        masks[name] = result.new_mask
        grown_total += int(result.grown.sum())
    return grown_total


def evaluate(model: nn.Module, data: Examples, *, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy (nats per example) and accuracy (0..1) of ``model`` on ``data``.

    Runs in eval mode without gradients and restores the model's previous mode.
    """
    if batch_size < 1:
        raise ConfigError(f"evaluation batch_size must be >= 1, got {batch_size}")
    x, y = _check_data(data)
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for first in range(0, x.shape[0], batch_size):
                xb, yb = x[first : first + batch_size], y[first : first + batch_size]
                logits = model(xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = x.shape[0]
    return loss_sum / n, correct / n

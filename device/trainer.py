"""Local training of a masked model for one round; FedDST readjustment; PruneFL importance.

``train_round`` trains ``model`` in place on the device's examples with SGD (momentum, weight
decay, optional FedProx term) while keeping the sparse structure exact: after every step the
masked weights, their gradients and their momentum are zero. It can readjust the mask once during
the round (FedDST) and accumulate squared dense gradients (PruneFL importance). Everything random
draws from generators seeded from ``seed``, so two runs with the same inputs give identical
results; no global RNG state is read or set (the models here have no dropout).

Per step, in this order (why: each quantity must see the gradient it is defined on):
  1. forward, cross-entropy loss, backward: dense gradients, masked positions included;
  2. PruneFL importance += grad^2 and the FedDST growth window += grad (dense, before masking;
     ``device.growth``: a large layer's sum stays in its own gradient, off the mask);
  3. FedProx: grad += mu * (w - w_global);
  4. masked gradients := 0 (except a sum held there); ``optimizer.step()`` (SGD with momentum;
     it adds weight decay, grad += wd * w, in place: zero at masked positions, whose weights
     are zero); a layer holding its sum gets its weights := 0 off the mask again and its
     gradient := 0 on it;
  5. at the readjust step: drop and grow per layer, dropped and grown weights and momentum := 0.

Why masked weights and momentum need no masking after the step: they are exactly zero before it
(masked at the start, zeroed at a readjust) and so is their gradient, weight decay included
(``wd * 0``), so ``momentum * 0 + 0`` and ``0 - lr * 0`` keep them exactly zero. Layers computed
by sparse kernels (``kernel_plan``) skip step 4's masking too on steps where the kernel returns
its on-mask gradient (exactly zero off the mask) and no FedProx term is added.

Memory (a 1 GB Pi trains a 26 MB model): besides the model, a round holds the gradients, the
momentum and, per pruned tensor, only its start values on the start mask (``device.deltas``);
weight decay is added in place (torch's SGD would allocate a gradient-sized temporary), large
dense linear layers compute their weight gradients into one buffer each for the whole round
(``device.gradbuffers``: a new one every step fragments the heap), and the dense deltas are
built after the optimiser state and gradients are freed.
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

from device.deltas import RoundStart
from device.errors import ConfigError, DataError
from device.gradbuffers import weight_grad_buffers
from device.growth import GrowthGradient
from device.optim import MomentumSGD, move_to_support
from device.seeding import derive_seed
from device.sparse.masks import (
    Masks,
    apply_masks,
    check_masks,
    flat_positions32,
    masks_equal,
    zero_outside,
)
from device.sparse.policies import (
    drop_scores_magnitude_active,
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
def _kernels(
    model: nn.Module, masks: Masks, plan: frozenset[str], *, train_values: bool
) -> Iterator[KernelHandle | None]:
    """Sparse kernels for the layers in ``plan`` for the duration of the block (none if empty);
    on exit the trained values are back in the weights.

    Imported lazily: a device whose plan is empty never loads the kernel module.
    """
    if not plan:
        yield None
        return
    unknown = plan - set(masks)
    if unknown:
        raise ConfigError(f"kernel plan names tensors that are not pruned: {sorted(unknown)}")
    from device.sparse.kernels import attach  # lazy: most devices never need it

    handle = attach(model, masks, plan, train_values=train_values)
    try:
        yield handle
    finally:
        handle.detach()


#: A masked weight (trained as a whole tensor) below this density keeps its momentum on its mask
#: only: an int64 position and a float32 value per kept entry against 4 bytes per entry.
COMPACT_MOMENTUM_BELOW = 1 / 3


class _Optimised:
    """What SGD trains: every parameter, except that in the kernels' values mode the planned
    weights are replaced by their ``[nnz]`` value tensors (momentum on the mask only).

    The other masked weights below :data:`COMPACT_MOMENTUM_BELOW` density have their mask as
    the optimiser's support (``MomentumSGD``: momentum on the mask only, the same arithmetic).
    ``masks`` are the round's current masks (a readjustment puts new ones in, then calls
    :meth:`remasked`). ``optimizer.tensors`` maps state_dict names to the tensors it trains; the
    optimiser adds weight decay to their gradients in place.
    """

    def __init__(
        self,
        model: nn.Module,
        handle: KernelHandle | None,
        settings: LocalTraining,
        masks: Masks,
    ) -> None:
        self._model = model
        self._handle = handle if handle is not None and handle.train_values else None
        self._settings = settings
        self._masks = masks
        self.optimizer = self._build({}, self._supports())

    @property
    def values_mode(self) -> frozenset[str]:
        """The weights trained through their value tensors (empty without values mode)."""
        return self._handle.plan if self._handle is not None else frozenset()

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self.optimizer.tensors

    def _build(
        self, momenta: Mapping[str, torch.Tensor], supports: Mapping[str, torch.Tensor]
    ) -> MomentumSGD:
        tensors: dict[str, torch.Tensor] = dict(self._model.named_parameters())
        for name in self.values_mode:
            assert self._handle is not None
            tensors[name] = self._handle.values(name)
        return MomentumSGD(
            tensors,
            lr=self._settings.lr,
            momentum=self._settings.momentum,
            weight_decay=self._settings.weight_decay,
            momenta=momenta,
            supports=supports,
        )

    def _supports(self) -> dict[str, torch.Tensor]:
        if self._settings.momentum == 0:
            return {}  # no momentum buffers: positions would only cost memory
        return {
            name: flat_positions32(mask)
            for name, mask in self._masks.items()
            if name not in self.values_mode
            and int(torch.count_nonzero(mask)) < COMPACT_MOMENTUM_BELOW * mask.numel()
        }

    def zero_grad(self, keep: frozenset[str] = frozenset()) -> None:
        """Clear every gradient, the planned weights' dense ones included, except the
        parameters ``keep`` names (gradients that hold a growth sum, ``device.growth``)."""
        params = dict(self._model.named_parameters())
        for name, tensor in self.optimizer.tensors.items():
            if name not in keep or tensor is not params.get(name):  # values mode: not kept
                tensor.grad = None
        for name, param in params.items():
            if name not in keep:
                param.grad = None

    def dense_momenta(self, names: frozenset[str]) -> dict[str, torch.Tensor | None]:
        """Momentum of the weights ``names`` shaped like the weights (scattered from the values
        in values mode, where it is zero off the mask), for a readjustment to edit in place;
        None where there is none, and for a momentum kept on a support (:meth:`remasked`
        moves it to the new mask)."""
        params = dict(self._model.named_parameters())
        momenta: dict[str, torch.Tensor | None] = {}
        for name in names:
            buffer = self.optimizer.momenta.get(name)
            if name in self.optimizer.supports:
                buffer = None
            elif buffer is not None and name in self.values_mode:
                assert self._handle is not None
                dense = torch.zeros_like(params[name])
                dense.view(-1).index_copy_(0, self._handle.structure(name).flat_index, buffer)
                buffer = dense
            momenta[name] = buffer
        return momenta

    def remasked(self, dense_momenta: Mapping[str, torch.Tensor | None]) -> None:
        """After the masks changed (and the handle was refreshed): train the new value tensors,
        their momentum gathered from ``dense_momenta``; a momentum on a support moves to the new
        mask (kept where both masks hold, 0 where grown); every other buffer carries over."""
        old = self.optimizer
        if self._handle is None and not old.supports:
            return
        momenta = dict(old.momenta)
        for name in self.values_mode:
            momenta.pop(name, None)
            dense = dense_momenta.get(name)
            if dense is not None:
                assert self._handle is not None
                flat = self._handle.structure(name).flat_index
                momenta[name] = dense.view(-1).index_select(0, flat)
        supports = self._supports()
        for name, support in old.supports.items():
            buffer = momenta.pop(name, None)
            if buffer is not None:
                momenta[name] = move_to_support(buffer, support, supports[name])
        self.optimizer = self._build(momenta, supports)


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
    start_weights: Mapping[str, torch.Tensor] | None = None,
    start_on_masks: Mapping[str, torch.Tensor] | None = None,
    deltas_in_place: bool = False,
) -> RoundResult:
    """Train ``model`` in place for one round on ``data`` with its sparse structure ``masks``.

    ``seed`` (any int in [0, 2**64)) drives the shuffling and random growth. ``readjust``
    (FedDST) drops and regrows ``round(alpha * nnz_l)`` entries per layer once, after step
    ``plan_steps(...).readjust_step``. ``report_importance`` (PruneFL) returns summed squared
    dense gradients. ``global_weights`` is w_global of the FedProx term ``mu/2 ||w - w_global||^2``
    (default: the weights the round starts from). ``kernel_plan`` names pruned weights to
    compute with sparse kernels (``device.sparse.kernels``); on the steps that need dense weight
    gradients (every step with importance, the growth window) they are asked for the full one.
    ``start_weights`` is the model's state at the start as the caller already holds it, for
    every state_dict entry or some (the received global model; only its values on the masks
    matter for pruned tensors): the round keeps no copy of those entries, and their deltas are
    new tensors (the caller's are never written); it keeps the others itself, a sparse tensor
    on its mask only: its values there are ``start_on_masks``'s where the caller holds them
    (one per kept entry of ``masks``, in flat order: the received model's kept values).
    ``deltas_in_place`` is for a caller that wants the update, not the trained model (a
    device's round job): the deltas are computed in the model's own float tensors, which then
    hold ``final - start`` instead of the trained weights (no delta buffers at the end).
    """
    started = time.perf_counter()
    _check_settings(settings, readjust)
    x, y = _check_data(data)
    params = check_masks(model, masks)
    # Masks are never modified in place: a readjust puts new tensors into ``current``, so the
    # caller's own serve as the start masks, and the result copies only at the end, after the
    # optimiser state is freed (a round's peak memory is what a 1 GB Pi must hold).
    start_masks: Masks = dict(masks)
    current: Masks = dict(masks)
    apply_masks(model, current)
    start = RoundStart.of(
        model.state_dict(), start_masks, held=start_weights, held_on_mask=start_on_masks
    )

    plan = plan_steps(x.shape[0], settings, readjust)
    all_params = dict(model.named_parameters())
    prox_ref: dict[str, torch.Tensor] = {}
    if settings.prox_mu > 0:
        source = global_weights if global_weights is not None else start.dense(model.state_dict())
        missing = set(all_params) - set(source)
        if missing:
            raise ConfigError(f"FedProx global weights lack {sorted(missing)}")
        prox_ref = {n: source[n].detach().to(p.dtype) for n, p in all_params.items()}
    importance = {n: torch.zeros_like(p) for n, p in params.items()} if report_importance else {}
    gradient_growth = readjust is not None and readjust.grow == GrowPolicy.GRADIENT
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "shuffle"))

    loss_sum = 0.0
    correct = 0
    seen = 0
    grown_total = 0
    step = 0
    model.train()
    # Values mode (kernels train [nnz] tensors) unless FedProx needs the dense weights' distance.
    with (
        _kernels(model, current, kernel_plan, train_values=not prox_ref) as handle,
        weight_grad_buffers(model, exclude=kernel_plan) as buffered,
    ):
        optimised = _Optimised(model, handle, settings, current)
        growth = None
        if gradient_growth:
            # A sum can live in a gradient unless every step reads the gradient whole.
            whole = report_importance or bool(prox_ref)
            untrained = optimised.values_mode
            in_gradient = GrowthGradient.eligible(
                params, buffered, optimised.optimizer.supports, settings.momentum, untrained
            )
            growth = GrowthGradient(params, frozenset() if whole else in_gradient, untrained)
        while step < plan.total_steps:
            order = torch.randperm(x.shape[0], generator=shuffle)
            for first in range(0, x.shape[0], settings.batch_size):
                if step == plan.total_steps:
                    break
                step += 1
                batch = order[first : first + settings.batch_size]
                xb, yb = x[batch], y[batch]
                in_window = plan.window[0] <= step <= plan.window[1]
                dense_grad = report_importance or (gradient_growth and in_window)
                if handle is not None:
                    # Sparse kernels give weight gradients on the mask only, unless told that
                    # this step's dense gradient is needed (importance, growth window).
                    handle.full_weight_grad = dense_grad
                optimised.zero_grad(keep=growth.kept(step, plan.window) if growth else frozenset())
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                torch.autograd.backward(loss)
                _prepare_gradients(
                    params,
                    current,
                    importance=importance,
                    growth=growth if in_window else None,
                    prox=(all_params, prox_ref, settings.prox_mu),
                    exact=_exact(kernel_plan, optimised.values_mode, dense_grad, bool(prox_ref)),
                )
                optimised.optimizer.step()
                if growth is not None and in_window:
                    growth.settle(params, current, optimised.optimizer.supports)
                with torch.no_grad():
                    loss_sum += float(loss) * yb.shape[0]
                    correct += int((logits.argmax(dim=1) == yb).sum())
                    seen += yb.shape[0]
                if readjust is not None and step == plan.readjust_step:
                    if handle is not None:
                        handle.write_back()  # the drop scores read the weights
                    momenta = optimised.dense_momenta(frozenset(params))
                    grown_total = _readjust(params, current, momenta, readjust, growth, seed=seed)
                    growth = None
                    if handle is not None:
                        handle.refresh(current)
                    optimised.remasked(momenta)
                    del momenta

    # Free the optimiser state and the gradients before the deltas take their place.
    del optimised, prox_ref, growth
    model.zero_grad(set_to_none=True)
    deltas = start.deltas(model.state_dict(), current, in_place=deltas_in_place)
    final = {n: m.clone() if m is masks[n] else m for n, m in current.items()}
    metrics = {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
    if readjust is not None:
        metrics["readjust_grown"] = float(grown_total)
    return RoundResult(
        deltas=deltas,
        masks=final,
        mask_changed=not masks_equal(final, start_masks),
        num_examples=int(x.shape[0]),
        local_steps=step,
        train_s=time.perf_counter() - started,
        importance=importance,
        metrics=metrics,
    )


def _exact(
    plan: frozenset[str], values_mode: frozenset[str], dense_grad: bool, prox: bool
) -> frozenset[str]:
    """The pruned weights whose gradient needs no masking this step: in values mode the
    optimiser never sees the weights' gradients; in weight mode the kernels' gradient is exactly
    zero off the mask unless a dense gradient was asked for or FedProx added its term."""
    if values_mode:
        return values_mode
    return plan if not dense_grad and not prox else frozenset()


def _prepare_gradients(
    params: Mapping[str, nn.Parameter],
    masks: Masks,
    *,
    importance: Mapping[str, torch.Tensor],
    growth: GrowthGradient | None,
    prox: tuple[Mapping[str, nn.Parameter], Mapping[str, torch.Tensor], float],
    exact: frozenset[str],
) -> None:
    """Between backward and the optimiser step: record dense gradients, add FedProx, mask.

    ``importance`` (may be empty) gets ``+= grad^2`` and ``growth`` (None outside the growth
    window) its sums, both from the dense gradient; then ``grad += mu (w - w_global)`` for the
    parameters in the FedProx reference; finally the gradients at masked positions become zero,
    except for the tensors in ``exact``, whose gradient is already exactly zero there (sparse
    kernels on their on-mask steps), and those whose gradient holds the growth sum there
    (``growth.in_gradient``). Weight decay is the optimiser's (``MomentumSGD``).
    """
    all_params, prox_ref, mu = prox
    with torch.no_grad():
        for name, param in params.items():
            grad = param.grad
            if grad is not None and name in importance:
                importance[name].addcmul_(grad, grad)
        if growth is not None:
            growth.add(params)
        for name, ref in prox_ref.items():
            grad = all_params[name].grad
            if grad is not None:
                grad.add_(all_params[name] - ref, alpha=mu)
        summing = growth.in_gradient if growth is not None else frozenset()
        for name, param in params.items():
            if param.grad is not None and name not in exact and name not in summing:
                zero_outside(param.grad, masks[name])


def _readjust(
    params: Mapping[str, nn.Parameter],
    masks: Masks,
    momenta: Mapping[str, torch.Tensor | None],
    readjust: Readjust,
    growth: GrowthGradient | None,
    *,
    seed: int,
) -> int:
    """FedDST's drop-and-grow on every pruned tensor, in place on ``masks``, weights and momentum.

    Returns the number of entries grown in total. Dropped entries are zeroed (they are now
    masked); grown entries start at zero in the weight and in the momentum buffer. Consumes
    ``growth`` (None for random growth: each layer's sum becomes its grow score in place) and
    frees the weights' gradients (spent by the step before; the next step clears them first).
    The drop scores are the active entries' magnitudes only (``[nnz]``).
    """
    generator = None
    if readjust.grow == GrowPolicy.RANDOM:
        generator = torch.Generator().manual_seed(derive_seed(seed, "grow"))
    grown_total = 0
    for name, param in params.items():
        mask = masks[name]
        n = n_to_readjust(readjust.alpha, int(torch.count_nonzero(mask)))
        if growth is not None:  # the summed gradient becomes the score: no copy
            grow_score = grow_scores_gradient(growth.take(name, param), in_place=True)
        else:
            assert generator is not None, "gradient growth without its growth sums"
            grow_score = grow_scores_random(param.shape, generator)
        param.grad = None
        drop_score = drop_scores_magnitude_active(param, mask)
        result = readjust_mask(mask, drop_score, grow_score, n, scratch_scores=True)
        del drop_score, grow_score
        changed = torch.cat([result.dropped_at, result.grown_at])
        zero_entries(changed, param, momenta.get(name))
        masks[name] = result.new_mask
        grown_total += result.grown_at.numel()
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

"""Measure how fast this device trains each prunable layer, densely and with sparse kernels.

The result, a :class:`~device.wire.messages.DeviceProfile`, travels in the device's birth
message. The device uses it to pick sparse kernels per layer (:func:`device.sparse.kernels.
choose_plan`); the server uses it for PruneFL's round-time model ``T = c_0 + sum_l c_l * nnz_l``
(:func:`device.sparse.kernels.layer_cost` gives the per-layer term, ``step_overhead_s`` is
``c_0``).

What is measured, all on one minibatch of ``batch_size`` random inputs, with as many torch threads
as the caller configured (``torch.set_num_threads``), times from ``time.perf_counter``:

* per prunable layer (``device.models.prunable_names``) and per density: the seconds of one
  training step of the layer alone, as the trainer runs it: forward, backward (input gradient
  included except for the model's first layer, whose input is data) and the update of the
  layer's trained tensors (gradient masking, weight decay, momentum SGD), for masked dense
  compute (``dense_s``: the layer's own forward on a weight that is zero outside a random mask
  of that density, all of it updated; large linear layers with their weight gradient in a
  persistent buffer, as the trainer computes them, ``device.gradbuffers``) and for the sparse
  kernel in values mode (``sparse_s``: only the kept values updated; 0 where the layer has no
  kernel). Dense and sparse runs alternate, so that load from other processes hits both alike;
  each figure is the median of ``repeats`` runs after ``warmup`` unmeasured ones.
* ``step_overhead_s`` (c_0): the median seconds of a whole masked dense step as the trainer
  runs it (forward, loss, backward, gradient masking of the prunable weights, weight decay,
  momentum update) minus the sum of the layers' dense times, clamped at 0 (activations,
  pooling, loss, and the update of the layers that are never pruned). Dense work is the same
  at every density, so a layer's dense time here is the median over its points.

Runtime: with the defaults (5 densities, ``repeats=5``, ``warmup=1``) ``femnist_cnn`` takes about
3 s on the development machine (2 threads of an AMD EPYC); a Raspberry Pi 4 is roughly 10-20 times
slower per step, i.e. well under a minute. ``repeats=1, warmup=0`` is the fast path for tests.
Sparse kernels at high density are by far the slowest runs, so once a layer's sparse time exceeds
``skip_factor`` times its dense time, denser points are not run with the sparse kernel: they
record the sparse time of that lower density, a lower bound (sparse work only grows with density)
that already loses to dense, so no choice and no cost changes.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from device.errors import ConfigError
from device.gradbuffers import weight_grad_buffers
from device.model_ref import ModelRef
from device.models import create_model, model_spec, prunable_names
from device.optim import MomentumSGD
from device.sparse.kernels import attach, supports_sparse
from device.sparse.masks import zero_outside
from device.wire.messages import DeviceProfile, LayerProfile, ProfilePoint

__all__ = ["DEFAULT_DENSITIES", "measure_profile"]

#: The densities (kept fractions) a profile measures by default (issue 3).
DEFAULT_DENSITIES: tuple[float, ...] = (1.0, 0.5, 0.2, 0.1, 0.05)
# The update measured with each step: FedDST's local defaults (``LocalTraining``); the time of
# an in-place update does not depend on the values.
_MOMENTUM, _WEIGHT_DECAY = 0.9, 1e-3


@dataclass(frozen=True)
class _LayerInput:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    needs_input_grad: bool


def _layer_inputs(
    model: nn.Module, names: Sequence[str], example: torch.Tensor
) -> list[_LayerInput]:
    """Each prunable layer's input and output shapes, seen in one forward pass of ``example``."""
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])

        def hook(
            _module: nn.Module,
            inputs: tuple[torch.Tensor, ...],
            output: torch.Tensor,
            name: str = name,
        ) -> None:
            seen.setdefault(
                name, (tuple(inputs[0].shape), tuple(output.shape), inputs[0].requires_grad)
            )

        hooks.append(module.register_forward_hook(hook))
    try:
        model(example)
    finally:
        for handle in hooks:
            handle.remove()
    layers = []
    for name in names:
        if name not in seen:
            raise ConfigError(f"layer {name!r} is never called by the model's forward pass")
        input_shape, output_shape, needs_grad = seen[name]
        module = model.get_submodule(name.rpartition(".")[0])
        layers.append(_LayerInput(name, module, input_shape, output_shape, needs_grad))
    return layers


def _random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    numel = math.prod(shape)
    kept = min(numel, max(1, round(density * numel)))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:kept]] = True
    return flat.view(shape)


def _layer_step(
    module: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    trained: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None = None,
) -> Callable[[], float]:
    """A function that runs one training step of ``module`` alone and returns its seconds.

    The step is what ``device.trainer.train_round`` does for this layer: forward, backward, then
    the update of every tensor in ``trained`` (the weight and bias for masked dense compute, the
    kernel's ``[nnz]`` values and the bias in values mode): the weight's gradient masked when
    ``mask`` is given, weight decay added in place, SGD with momentum. The update is part of
    the layer's time because it is where values mode saves most: masked dense compute updates
    every entry of the weight, values mode only the kept ones. The step size is tiny, so
    repeated runs leave the weights as good as unchanged.
    """
    optimizer = MomentumSGD(trained, lr=1e-9, momentum=_MOMENTUM, weight_decay=_WEIGHT_DECAY)
    weight = module.get_parameter("weight")

    def run() -> float:
        module.zero_grad(set_to_none=True)
        optimizer.zero_grad()
        x.grad = None
        start = time.perf_counter()
        out = module(x)
        # d<out, grad_out>/d out = grad_out: the backward of ``backward(out, grad_out)``, from a
        # scalar (a tensor ``grad_tensors`` makes torch import sympy, 34 MB, on the device).
        torch.autograd.backward(torch.dot(out.reshape(-1), grad_out.reshape(-1)))
        if mask is not None and weight.grad is not None:
            with torch.no_grad():
                zero_outside(weight.grad, mask)
        optimizer.step()
        return time.perf_counter() - start

    return run


def _median_interleaved(
    runs: Sequence[Callable[[], float]], repeats: int, warmup: int
) -> list[float]:
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + repeats):
        for j, run in enumerate(runs):
            seconds = run()
            if i >= warmup:
                times[j].append(seconds)
    return [statistics.median(t) for t in times]


def _profile_layer(
    layer: _LayerInput,
    densities: Sequence[float],
    batch_generator: torch.Generator,
    *,
    repeats: int,
    warmup: int,
    skip_factor: float,
) -> LayerProfile:
    module = copy.deepcopy(layer.module)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    original = weight.detach().clone()
    x = torch.randn(layer.input_shape, generator=batch_generator)
    x.requires_grad_(layer.needs_input_grad)
    grad_out = torch.randn(layer.output_shape, generator=batch_generator)
    sparse_module = copy.deepcopy(module) if supports_sparse(module) else None
    points: list[ProfilePoint] = []
    sparse_bound = 0.0  # > 0 once sparse lost by skip_factor: denser points reuse this bound
    with weight_grad_buffers(module):  # the dense step as the trainer runs it
        for density in sorted(densities):  # sparsest first, see the module docstring
            mask = _random_mask(weight.shape, density, batch_generator)
            with torch.no_grad():
                weight.copy_(original * mask)
            dense_run = _layer_step(module, x, grad_out, dict(module.named_parameters()), mask)
            if sparse_module is None or sparse_bound > 0:
                (dense_s,) = _median_interleaved([dense_run], repeats, warmup)
                points.append(ProfilePoint(density, dense_s, sparse_bound))
                continue
            with torch.no_grad():
                sparse_module.get_parameter("weight").copy_(weight)
            # Values mode, as the trainer uses the kernels: the gradient has nnz entries.
            handle = attach(
                sparse_module, {"weight": mask}, frozenset({"weight"}), train_values=True
            )
            try:
                trained: dict[str, torch.Tensor] = dict(sparse_module.named_parameters())
                trained["weight"] = handle.values("weight")
                sparse_run = _layer_step(sparse_module, x, grad_out, trained)
                dense_s, sparse_s = _median_interleaved([dense_run, sparse_run], repeats, warmup)
            finally:
                handle.detach()
            points.append(ProfilePoint(density, dense_s, sparse_s))
            if sparse_s >= skip_factor * dense_s:
                sparse_bound = sparse_s
    points.sort(key=lambda p: p.density, reverse=True)
    return LayerProfile(name=layer.name, numel=weight.numel(), points=tuple(points))


def _step_seconds(
    model: nn.Module, example: torch.Tensor, *, repeats: int, warmup: int, seed: int
) -> float:
    """Median seconds of one masked dense step of ``model`` on ``example``, as the trainer
    runs it: forward, loss, backward, the prunable weights' gradients masked (by all-kept
    masks: a multiply costs the same whatever it keeps), weight decay and momentum."""
    params = dict(model.named_parameters())
    optimizer = MomentumSGD(params, lr=1e-9, momentum=_MOMENTUM, weight_decay=_WEIGHT_DECAY)
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model)}
    generator = torch.Generator().manual_seed(seed)

    def run() -> float:
        optimizer.zero_grad()
        start = time.perf_counter()
        out = model(example)
        if out.dim() == 2:
            target = torch.randint(0, out.shape[1], (out.shape[0],), generator=generator)
            loss = F.cross_entropy(out, target)
        else:
            loss = out.square().mean()
        torch.autograd.backward(loss)
        with torch.no_grad():
            for name, mask in masks.items():
                grad = params[name].grad
                if grad is not None:
                    zero_outside(grad, mask)
        optimizer.step()
        return time.perf_counter() - start

    with weight_grad_buffers(model):
        (seconds,) = _median_interleaved([run], repeats, warmup)
    return seconds


def _check_arguments(
    batch_size: int, densities: Sequence[float], repeats: int, warmup: int, skip_factor: float
) -> None:
    if batch_size < 1:
        raise ConfigError(f"profile batch_size must be >= 1, got {batch_size}")
    if not densities:
        raise ConfigError("profile needs at least one density, got none")
    for density in densities:
        if not (0.0 < density <= 1.0):
            raise ConfigError(f"profile densities must be in (0, 1], got {density!r}")
    if len(set(densities)) != len(densities):
        raise ConfigError(f"profile densities must be distinct, got {tuple(densities)}")
    if repeats < 1:
        raise ConfigError(f"profile repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"profile warmup must be >= 0, got {warmup}")
    if not skip_factor > 1.0:
        raise ConfigError(f"profile skip_factor must be > 1, got {skip_factor}")


def measure_profile(
    model: str | ModelRef | nn.Module,
    *,
    batch_size: int = 20,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    repeats: int = 5,
    warmup: int = 1,
    input_shape: Sequence[int] | None = None,
    model_name: str | None = None,
    skip_factor: float = 2.0,
    seed: int = 0,
) -> DeviceProfile:
    """Measure this device's per-layer training-step times (see the module docstring).

    Args:
        model: a registered model name or a factory reference (built with
            ``create_model(model, seed=seed)``; the profile's ``model_name`` is the reference's
            text, as a run's snapshot names the model), or a model instance; the instance is
            deep-copied, never modified.
        batch_size: examples per minibatch (>= 1), as the trainer will use.
        densities: distinct kept fractions in (0, 1] to measure.
        repeats: measured runs per figure (>= 1); each figure is their median.
        warmup: unmeasured runs before them (>= 0).
        input_shape: shape of one example without the batch dimension; defaults to the
            model's declared one (required for a model instance).
        model_name: the profile's ``model_name``; defaults to the registered name, or the
            instance's class name.
        skip_factor: see the module docstring (> 1).
        seed: seeds the inputs, masks and targets (the profile's figures are times, not
            reproducible, but the work done is).

    Raises:
        ConfigError: an argument is out of range, or ``input_shape`` is missing for an instance.
        ValueError: ``model`` names no registered model.
    """
    _check_arguments(batch_size, densities, repeats, warmup, skip_factor)
    if not isinstance(model, nn.Module):
        net = create_model(model, seed=seed)
        shape = tuple(input_shape) if input_shape is not None else model_spec(model).input_shape
        name = model_name or ModelRef.of(model).text
    else:
        if input_shape is None:
            raise ConfigError(
                f"measure_profile of a {type(model).__name__} instance needs input_shape"
            )
        net = copy.deepcopy(model)
        shape = tuple(input_shape)
        name = model_name or type(model).__name__
    net.train()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn((batch_size, *shape), generator=generator)
    layers = _layer_inputs(net, prunable_names(net), example)
    profiles = tuple(
        _profile_layer(
            layer,
            densities,
            generator,
            repeats=repeats,
            warmup=warmup,
            skip_factor=skip_factor,
        )
        for layer in layers
    )
    step_s = _step_seconds(net, example, repeats=repeats, warmup=warmup, seed=seed)
    # Dense work does not depend on density: each layer's median dense time over all points is
    # its most robust figure (one spike must not push c_0 to zero).
    layers_s = sum(statistics.median(p.dense_s for p in layer.points) for layer in profiles)
    return DeviceProfile(
        model_name=name,
        batch_size=batch_size,
        step_overhead_s=max(0.0, step_s - layers_s),
        layers=profiles,
    )

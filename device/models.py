"""The model registry: name -> ``nn.Module`` factory, with each model's input shape and classes.

Every model returns logits (no softmax inside); the loss applies log-softmax itself. Layers are
registered in the order the forward pass uses them, so ``state_dict`` order and
:func:`prunable_names` order are the model's order (first layer first). Masks live outside the
model, keyed by the ``state_dict`` names returned by :func:`prunable_names`
(DESIGN section 6); nothing here knows about masks.

Parameter counts, pinned by the tests:

============  ===========  ============  =====================================================
name          input        classes       parameters
============  ===========  ============  =====================================================
mnist_cnn     1 x 28 x 28  10            261,840 (FedDST's MNIST network)
femnist_cnn   1 x 28 x 28  62            6,603,710 (PruneFL's Conv2)
cifar_cnn     3 x 32 x 32  10            782,006 (FedDST's CIFAR-10 network)
mlp           1 x 8 x 8    10            4,810 (64 -> 64 -> 10, for scikit-learn's digits)
============  ===========  ============  =====================================================
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from device.meta import on_meta
from device.model_ref import ModelRef
from device.model_registry import ModelFactoryError, load_factory, lookup, model_names

__all__ = [
    "MLP",
    "MODELS",
    "CifarCNN",
    "FemnistCNN",
    "MnistCNN",
    "ModelFactoryError",
    "ModelLike",
    "ModelRef",
    "ModelSpec",
    "create_model",
    "empty_model",
    "find_model_spec",
    "meta_model",
    "model_names",
    "model_spec",
    "num_parameters",
    "prunable_names",
]


class MnistCNN(nn.Module):
    """FedDST's MNIST network (261,840 parameters); input ``[N, 1, 28, 28]``, 10 logits.

    conv 1->10 5x5, max-pool 3 stride 1, ReLU, conv 10->20 5x5, max-pool 3 stride 1, ReLU,
    linear 5120->50, ReLU, linear 50->10. Spatially 28 -> 24 -> 22 -> 18 -> 16, so the flattened
    feature map is 20 x 16 x 16 = 5120.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(20 * 16 * 16, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 3, stride=1))
        x = F.relu(F.max_pool2d(self.conv2(x), 3, stride=1))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


class FemnistCNN(nn.Module):
    """PruneFL's Conv2 for FEMNIST (6,603,710 parameters); input ``[N, 1, 28, 28]``, 62 logits.

    conv 1->32 5x5 pad 2, ReLU, max-pool 2, conv 32->64 5x5 pad 2, ReLU, max-pool 2,
    linear 3136->2048, ReLU, linear 2048->62. Spatially 28 -> 14 -> 7: 64 x 7 x 7 = 3136.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 2048)
        self.fc2 = nn.Linear(2048, 62)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


class CifarCNN(nn.Module):
    """FedDST's CIFAR-10 network (782,006 parameters); input ``[N, 3, 32, 32]``, 10 logits.

    conv 3->6 5x5, max-pool 3 stride 1, ReLU, conv 6->16 5x5, max-pool 3 stride 1, ReLU (the
    MNIST network's pooling), linear 6400->120, ReLU, linear 120->84, ReLU, linear 84->10.
    Spatially 32 -> 28 -> 26 -> 22 -> 20: 16 x 20 x 20 = 6400.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 20 * 20, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 3, stride=1))
        x = F.relu(F.max_pool2d(self.conv2(x), 3, stride=1))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


class MLP(nn.Module):
    """One hidden layer with ReLU: ``in_features -> hidden -> out_features`` logits.

    The input is flattened from dimension 1 on, so ``[N, 1, 8, 8]`` digits images and their
    flattened ``[N, 64]`` form give the same result. Defaults fit scikit-learn's 8x8 digits
    (64 -> 64 -> 10, 4,810 parameters).
    """

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 10) -> None:
        super().__init__()
        for field, value in (("in_features", in_features), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"mlp: {field} must be at least 1, got {value}")
        if out_features < 2:
            raise ValueError(f"mlp: out_features must be at least 2 classes, got {out_features}")
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


@dataclass(frozen=True)
class ModelSpec:
    """What a registered model expects and produces (with its default constructor arguments).

    Attributes:
        name: the registry name.
        input_shape: shape of one example, without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: number of logits the model returns per example.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


#: The built-in models: name -> class (each registered in ``device.model_registry.BUILTIN`` as
#: ``device.models:<class>``; keyword arguments only where the model has options, e.g. ``mlp``'s
#: ``hidden``).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": MnistCNN,
    "femnist_cnn": FemnistCNN,
    "cifar_cnn": CifarCNN,
    "mlp": MLP,
}

_SPECS: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec("mnist_cnn", (1, 28, 28), 10),
    "femnist_cnn": ModelSpec("femnist_cnn", (1, 28, 28), 62),
    "cifar_cnn": ModelSpec("cifar_cnn", (3, 32, 32), 10),
    "mlp": ModelSpec("mlp", (1, 8, 8), 10),
}

ModelLike = str | ModelRef
"""A model as callers name it: a ``ModelRef`` or its text (a registered name, a factory)."""


def _factory(ref: ModelRef) -> tuple[Callable[..., Any], str]:
    """The callable that builds ``ref`` and how errors name it.

    Raises ``ValueError`` for an unknown name, ``ModelFactoryError`` when it cannot be imported.
    """
    if ref.name:
        entry = lookup(ref.name)
        if entry.origin == "built-in" and ref.name in MODELS:
            return MODELS[ref.name], f"model {ref.name!r}"
        return load_factory(entry.target, f"model {ref.name!r} ({entry.target})"), (
            f"model {ref.name!r} ({entry.target})"
        )
    what = f"model factory {ref.factory!r}"
    return load_factory(ref.factory, what), what


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> nn.Module:
    """``factory(**kwargs)``, which must return a Module; ``ModelFactoryError`` otherwise."""
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the factory is the user's code: anything it raises is reported
        raise ModelFactoryError(f"{what} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def find_model_spec(model: ModelLike) -> ModelSpec | None:
    """Input shape and classes of ``model`` when known: declared in the reference, else a
    built-in's (only without kwargs, which may change them), else the factory's
    ``input_shape`` and ``num_classes`` attributes; None when undeclared.

    Raises ``ValueError`` for an unknown name, ``ModelFactoryError`` for a factory that cannot
    be imported.
    """
    ref = ModelRef.of(model)
    shape, classes = ref.input_shape, ref.num_classes
    if shape is None or classes is None:
        if ref.name in _SPECS and not ref.kwargs:
            declared: tuple[Any, Any] = (_SPECS[ref.name].input_shape, _SPECS[ref.name].num_classes)
        else:
            factory, _ = _factory(ref)
            declared = (
                getattr(factory, "input_shape", None),
                getattr(factory, "num_classes", None),
            )
        if shape is None and isinstance(declared[0], tuple | list):
            shape = tuple(int(d) for d in declared[0])
        if classes is None and isinstance(declared[1], int):
            classes = declared[1]
    if shape is None or classes is None:
        return None
    return ModelSpec(ref.text, shape, classes)


def model_spec(name: ModelLike) -> ModelSpec:
    """Input shape and number of classes of model ``name`` (``find_model_spec``).

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names), or the
            model does not declare its input shape and classes.
    """
    spec = find_model_spec(name)
    if spec is None:
        raise ValueError(
            f"model {ModelRef.of(name).text!r} does not declare its input shape and classes; "
            "give input_shape and num_classes in the run's model"
        )
    return spec


def create_model(name: ModelLike, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """A new model ``name``, with its parameters initialised as PyTorch initialises them.

    With ``seed`` set, the initial weights are a pure function of (name, kwargs, seed): the
    model is built on the ``meta`` device (which draws no random numbers) and then initialised
    from a private ``torch.Generator``, so the global RNG state is neither read nor changed and
    concurrent callers in other threads cannot disturb each other. A model with a layer that
    :func:`_initialise` does not know (a user's own parameters), or whose factory cannot build
    on ``meta``, is instead built normally with the global RNG seeded inside
    ``torch.random.fork_rng`` under a lock: still a pure function of (name, kwargs, seed) and
    the global state is restored, but a thread drawing from the global RNG meanwhile would see
    those draws. With ``seed=None`` the global RNG is used, as plain ``nn.Module`` construction
    does.

    Args:
        name: a registered name (see :func:`model_names`), a factory, or a ``ModelRef``.
        seed: an integer in ``[0, 2**64)``, e.g. from :func:`device.seeding.derive_seed`.
        kwargs: passed to the factory after the reference's own (e.g. ``hidden=32`` for
            ``mlp``).

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names).
        ModelFactoryError: (a ``ConfigError`` and a ``ValueError``) the factory cannot be
            imported, refuses its arguments, raises, or returns something that is not a Module.
    """
    ref = ModelRef.of(name)
    factory, what = _factory(ref)
    arguments = {**ref.kwargs, **kwargs}
    if seed is None:
        return _call(factory, arguments, what)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    try:
        with on_meta():
            model = _call(factory, arguments, what)
        _materialise(model)
        _initialise(model, generator)
    except (ModelFactoryError, _UnknownLayer):
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _call(factory, arguments, what)
    return model


_GLOBAL_RNG = threading.Lock()


class _UnknownLayer(TypeError):
    """A layer ``_initialise`` cannot initialise from a generator."""


def empty_model(name: ModelLike, **kwargs: Any) -> nn.Module:
    """A new model ``name`` whose parameters and buffers are allocated but not initialised
    (``torch.empty``), for a caller that loads a state right away (``load_state_dict``).

    No random numbers are drawn and no page of the weights is written, so loading a received
    model touches its memory once. A factory that cannot build on ``meta``, or a model with a
    non-persistent buffer (its values come from the factory, never from a state_dict), is
    built normally (its other initial values are then overwritten by the caller). Raises as
    :func:`create_model`.
    """
    ref = ModelRef.of(name)
    factory, what = _factory(ref)
    arguments = {**ref.kwargs, **kwargs}
    try:
        with on_meta():
            model = _call(factory, arguments, what)
    except ModelFactoryError:
        return _call(factory, arguments, what)
    saved = set(model.state_dict())
    if any(buffer not in saved for buffer, _ in model.named_buffers()):
        return _call(factory, arguments, what)
    _materialise(model)
    return model


def meta_model(name: ModelLike, **kwargs: Any) -> nn.Module:
    """Model ``name`` with every tensor on the ``meta`` device (shapes and dtypes, no memory):
    enough to read its architecture. A factory that cannot build on ``meta`` is called
    normally. Raises as :func:`create_model`."""
    ref = ModelRef.of(name)
    factory, what = _factory(ref)
    arguments = {**ref.kwargs, **kwargs}
    try:
        with on_meta():
            return _call(factory, arguments, what)
    except ModelFactoryError:
        return _call(factory, arguments, what)


def _materialise(model: nn.Module) -> None:
    """Replace every meta parameter and buffer of ``model`` by an uninitialised CPU tensor.

    What ``model.to_empty(device="cpu")`` does, without its cost: ``empty_like`` of a meta
    tensor runs torch's Python reference implementation, whose first call imports sympy (about
    500 modules, 34 MB resident) that a device never needs. Shared parameters stay shared.
    """
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )
            setattr(module, name, made[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype))


def _initialise(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of every layer of ``model``, drawn from ``generator``.

    Mirrors ``reset_parameters`` of ``nn.Linear`` and ``nn.Conv*``: weight ~ kaiming_uniform
    with ``a = sqrt(5)`` (i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)); ``nn.Embedding``: N(0, 1). Layers are visited in registration order, so
    the draws are reproducible. Normalisation layers are reset deterministically (ones, zeros,
    fresh running statistics). Any other layer with parameters or buffers raises
    ``_UnknownLayer``.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            module.reset_parameters()  # deterministic: no random draws
        elif isinstance(module, nn.Embedding):
            # Embedding.reset_parameters: N(0, 1), the padding row zero.
            nn.init.normal_(module.weight, generator=generator)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].fill_(0)
        elif any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            # A layer type not listed here (a user's own parameters): its seeded weights would
            # be whatever memory _materialise left behind, so create_model builds it normally.
            raise _UnknownLayer(
                f"create_model(seed=...) cannot initialise layer {module_name!r} of type "
                f"{type(module).__name__} from a generator"
            )


def num_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (weights and biases, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def prunable_names(
    model: nn.Module,
    *,
    include_first: bool = True,
    include_last: bool = True,
    patterns: Sequence[str] = (),
) -> list[str]:
    """The ``state_dict`` names of the weights that masks may prune, first layer first.

    By default every convolution and linear layer's ``weight`` is prunable; biases,
    normalisation layers, embeddings and buffers stay dense (DESIGN section 6).
    ``include_first=False`` leaves the first such layer dense and ``include_last=False`` the
    last one (some papers keep the input and output layers dense). With ``patterns`` (a run's
    ``prunable:``), the prunable tensors are instead the floating-point parameters whose name
    matches one of the regular expressions in full (``re.fullmatch``), e.g. ``"conv.*weight"``
    or ``"embed\\.weight"``; ``include_first``/``include_last`` then do not apply.
    The order is registration order, which for the registered models is the forward order.

    Raises:
        ValueError: a pattern is not a regular expression, matches no parameter, or matches
            only buffers (running statistics are averaged, never pruned).
    """
    if patterns:
        return _matching_parameters(model, patterns)
    names = [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd)
    ]
    if not names:
        return []
    first, last = names[0], names[-1]
    return [
        n
        for n in names
        if not (n == first and not include_first) and not (n == last and not include_last)
    ]


def _matching_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"prunable: {pattern!r} is not a regular expression: {exc}") from None
    parameters = [
        name for name, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 1
    ]
    buffers = [name for name, _ in model.named_buffers()]
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.fullmatch(name) for name in parameters):
            hits = [name for name in buffers if regex.fullmatch(name)]
            detail = f" (only buffers: {', '.join(hits)})" if hits else ""
            raise ValueError(
                f"prunable: {pattern!r} matches no parameter of the model{detail}; "
                f"parameters: {', '.join(parameters[:12])}"
                + (", ..." if len(parameters) > 12 else "")
            )
    return [name for name in parameters if any(regex.fullmatch(name) for regex in compiled)]

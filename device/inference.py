"""On-device inference with a deployed model: ``load()`` it, ``predict(batch)``.

For the user's own application on the device::

    from device.inference import load

    model = load("/var/lib/sparsefleet/models")   # the active version of the models directory
    prediction = model.predict(batch)              # [N, *input_shape] float32 (or one example)
    prediction.labels                              # class names, one per example

The model is built from the artefact's sparse tensors without ever making a dense copy of a
layer that computes sparsely: such a layer keeps only its CSR matrix (int32 indices, float32
values; at density 0.1 about a fifth of the dense weight's memory), the other layers hold their
dense (masked) weights. Which layers compute sparsely is chosen as training chooses its kernels
(``device.sparse.kernels.choose_plan``, a 10% margin): from each layer's measured forward time,
dense against CSR, at one example and at a batch of 32, sparse only where it wins at both. The
measurement runs once per version and device and is cached beside the artefact
(``versions/<version>.plan.json``); a cache from another torch version or thread count is
measured again.

Predictions are counted per activation of a version (``ModelStore.record_usage``, flushed at
most every ``USAGE_FLUSH_S`` seconds and on ``close``), so the agent reports every process's
predictions in its status (``fleet model status``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from device.errors import ConfigError, DataError
from device.model_store import ActiveModel, ModelStore, usage_key
from device.models import meta_model
from device.trust import TrustedKeys
from device.wire.artefact import Artefact, ArtefactModel, Manifest, read_artefact
from device.wire.codec import SparseTensor
from device.wire.messages import DeviceProfile, LayerProfile, ProfilePoint

__all__ = [
    "DEFAULT_MODELS_DIR",
    "InferenceModel",
    "Prediction",
    "build",
    "load",
    "load_file",
    "measure_plan",
]

log = logging.getLogger(__name__)

#: Where ``load()`` looks without an argument: ``$SPARSEFLEET_MODELS``, else this.
DEFAULT_MODELS_DIR = Path("/var/lib/sparsefleet/models")
USAGE_FLUSH_S = 10.0
PLAN_BATCHES = (1, 32)
#: Layers denser than this never compute sparsely (CSR loses well before; DESIGN section 11).
MAX_SPARSE_DENSITY = 0.5
PlanChoice = Literal["auto", "dense", "sparse"]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Prediction:
    """``logits`` float32 ``[N, len(classes)]``; ``indices`` int64 ``[N]`` (argmax);
    ``labels`` the class names of ``indices``; ``version`` the model that answered."""

    logits: FloatArray
    indices: npt.NDArray[np.int64]
    labels: tuple[str, ...]
    version: str


# ---------------------------------------------------------------------------------------------
# Sparse layers
# ---------------------------------------------------------------------------------------------


def _csr(tensor: SparseTensor) -> torch.Tensor:
    """The CSR matrix (int32 indices) of a tensor's ``[rows, cols]`` view, from its mask and
    values (row-major value order is CSR order); no dense copy is made."""
    rows = int(tensor.shape[0])
    cols = tensor.numel // max(rows, 1)
    r, c = np.nonzero(tensor.mask.reshape(rows, cols))
    crow = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=rows), out=crow[1:])
    values = tensor.values if tensor.values.flags.writeable else tensor.values.copy()
    with warnings.catch_warnings():  # "CSR support is in beta": tested against dense here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(c.astype(np.int32)),
            torch.from_numpy(np.ascontiguousarray(values)),
            (rows, cols),
            check_invariants=False,
        )


def _linear_forward(module: nn.Linear, matrix: torch.Tensor) -> Any:
    """A linear layer's forward through its CSR weight ``[out, in]``.

    One example goes through ``torch.mv``: CSR times a vector is several times faster than
    ``torch.mm`` with a one-column matrix (0.20 ms against 1.05 ms for femnist_cnn's fc1 at
    density 0.08, one thread; docs/benchmarks.md), and it is what decides single-example
    latency. More examples go through one ``torch.mm``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, matrix.shape[1])
        if flat.shape[0] == 1:
            y = torch.mv(matrix, flat[0]).unsqueeze(0)
        else:
            y = torch.mm(matrix, flat.t()).t()
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], matrix.shape[0])

    return forward


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_forward(module: nn.Conv2d, matrix: torch.Tensor) -> Any:
    kernel, stride = _pair(module.kernel_size), _pair(module.stride)
    padding, dilation = _pair(module.padding), _pair(module.dilation)
    out_channels = module.out_channels

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, kernel, dilation, padding, stride)
        oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        y = torch.mm(matrix, cols.transpose(0, 1).reshape(cols.shape[1], -1))
        y = y.reshape(out_channels, n, oh * ow).transpose(0, 1)
        if module.bias is not None:
            y = y + module.bias.view(1, -1, 1)
        return y.reshape(n, out_channels, oh, ow)

    return forward


def _sparse_capable(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise ConfigError(f"the model has no tensor {name!r}")


def _check_layout(model: nn.Module, tensors: Mapping[str, SparseTensor], what: str) -> None:
    """The artefact's tensors are exactly the model's state, with the same shapes."""
    state = {name: tuple(int(d) for d in t.shape) for name, t in model.state_dict().items()}
    theirs = {name: t.shape for name, t in tensors.items()}
    if state != theirs:
        missing = sorted(set(state) - set(theirs))
        extra = sorted(set(theirs) - set(state))
        shapes = sorted(n for n in set(state) & set(theirs) if state[n] != theirs[n])
        raise ConfigError(
            f"{what}: the artefact does not fit the model built here "
            f"(missing {missing[:5]}, unexpected {extra[:5]}, other shapes {shapes[:5]})"
        )


def _assemble(model: nn.Module, decoded: ArtefactModel, sparse: frozenset[str]) -> None:
    """Fill ``model`` (built on ``meta``) with the artefact's tensors: CSR forwards for the
    ``sparse`` weights (their dense weight becomes an empty placeholder), dense elsewhere."""
    for name, tensor in decoded.tensors.items():
        if name in sparse:
            module = model.get_submodule(name.rpartition(".")[0])
            matrix = _csr(tensor)
            if isinstance(module, nn.Linear):
                module.forward = _linear_forward(module, matrix)  # type: ignore[method-assign]
            elif isinstance(module, nn.Conv2d):
                module.forward = _conv_forward(module, matrix)  # type: ignore[method-assign]
            else:
                raise ConfigError(f"{name!r} has no sparse forward here")
            _set_tensor(model, name, torch.empty(0))
        else:
            _set_tensor(model, name, torch.from_numpy(tensor.to_dense()))
    for module in model.modules():  # any tensor the state does not list (non-persistent buffers)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[key] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def _planned(decoded: ArtefactModel, model: nn.Module) -> list[str]:
    """Pruned weights at most ``MAX_SPARSE_DENSITY`` dense whose layer has a sparse forward."""
    names = []
    for name in sorted(decoded.pruned):
        owner, _, leaf = name.rpartition(".")
        if (
            leaf == "weight"
            and decoded.tensors[name].density <= MAX_SPARSE_DENSITY
            and _sparse_capable(model.get_submodule(owner))
        ):
            names.append(name)
    return names


def _layer_inputs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Input shape (batch 1) of every layer, from a forward on ``meta`` tensors (no memory)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if _sparse_capable(module):

            def hook(mod: nn.Module, args: Any, key: str = f"{module_name}.weight") -> None:
                shapes[key] = tuple(int(d) for d in args[0].shape)

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(torch.empty((1, *input_shape), device="meta"))
    finally:
        for handle in hooks:
            handle.remove()
    return shapes


def _time(fn: Any, repeats: int = 5) -> float:
    """Fastest of ``repeats`` calls after two warm-ups (seconds): the least disturbed by load."""
    with torch.no_grad():
        fn()
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def _race(dense: Any, sparse: Any, rounds: int = 3) -> tuple[float, float]:
    """(dense, sparse) seconds, each the fastest over ``rounds`` alternating bursts, so that a
    load spike or a cold thread pool hits both alike."""
    dense_s = sparse_s = float("inf")
    for _ in range(rounds):
        dense_s = min(dense_s, _time(dense))
        sparse_s = min(sparse_s, _time(sparse))
    return dense_s, sparse_s


def _measure_layer(
    module: nn.Module, tensor: SparseTensor, input_shape: tuple[int, ...], batch: int
) -> tuple[float, float]:
    """(dense, sparse) forward seconds of one layer on a random batch of ``batch`` examples."""
    x = torch.randn((batch, *input_shape[1:]))
    weight = torch.from_numpy(tensor.to_dense())
    bias = getattr(module, "bias", None)
    dense_bias = None if bias is None else torch.zeros(bias.shape)
    matrix = _csr(tensor)
    probe = _probe(module, dense_bias)
    if isinstance(module, nn.Linear):
        sparse_fn = _linear_forward(probe, matrix)  # type: ignore[arg-type]

        def dense_fn() -> Any:
            return F.linear(x, weight, dense_bias)

    else:
        conv: Any = module
        sparse_fn = _conv_forward(probe, matrix)  # type: ignore[arg-type]

        def dense_fn() -> Any:
            return F.conv2d(x, weight, dense_bias, conv.stride, conv.padding, conv.dilation)

    return _race(dense_fn, lambda: sparse_fn(x))


def measure_plan(
    decoded: ArtefactModel, manifest: Manifest, *, batches: Sequence[int] = PLAN_BATCHES
) -> dict[str, Any]:
    """Time each candidate layer's forward, dense and sparse, at every batch size in
    ``batches``; return the plan as JSON: ``{"sparse": [names], "layers": {...}, "torch":
    version, "threads": n}``. A layer computes sparsely when ``choose_plan`` picks it at every
    batch size (a layer that loses at one size is not measured at the next). Makes one dense
    copy of one layer at a time."""
    from device.sparse.kernels.plan import choose_plan  # lazy: only a deployment measures

    model = meta_model(manifest.model)
    chosen = set(_planned(decoded, model))
    try:
        inputs = _layer_inputs(model, manifest.input_shape)
    except Exception as exc:  # a model whose forward cannot run on meta tensors: stay dense
        log.info(
            "model %s: layer inputs unknown (%s); every layer computes dense", manifest.model, exc
        )
        chosen, inputs = set(), {}
    layers: dict[str, dict[str, float]] = {}
    for batch in batches:
        profile_layers = []
        densities = {}
        for name in sorted(chosen):
            module = model.get_submodule(name.rpartition(".")[0])
            tensor = decoded.tensors[name]
            dense_s, sparse_s = _measure_layer(module, tensor, inputs[name], batch)
            densities[name] = tensor.density
            profile_layers.append(
                LayerProfile(name, tensor.numel, (ProfilePoint(tensor.density, dense_s, sparse_s),))
            )
            entry = layers.setdefault(name, {"density": tensor.density})
            entry[f"dense_s_{batch}"] = dense_s
            entry[f"sparse_s_{batch}"] = sparse_s
        profile = DeviceProfile(
            model_name=manifest.model,
            batch_size=batch,
            step_overhead_s=0.0,
            layers=tuple(profile_layers),
        )
        chosen &= set(choose_plan(profile, densities))
    return {
        "sparse": sorted(chosen),
        "layers": layers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


class _Probe(nn.Module):
    """Stand-in with a layer's hyper-parameters and a real bias, for timing on its own."""


def _probe(module: nn.Module, bias: torch.Tensor | None) -> nn.Module:
    probe = _Probe()
    for attr in ("stride", "padding", "dilation", "kernel_size", "out_channels"):
        if hasattr(module, attr):
            setattr(probe, attr, getattr(module, attr))
    probe.bias = bias  # type: ignore[assignment]
    return probe


def _plan_usable(plan: Mapping[str, Any] | None) -> bool:
    return (
        plan is not None
        and plan.get("torch") == torch.__version__
        and plan.get("threads") == torch.get_num_threads()
        and isinstance(plan.get("sparse"), list)
    )


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class InferenceModel:
    """A deployed model ready to predict (eval mode, no gradients). Thread-safe."""

    def __init__(
        self,
        module: nn.Module,
        manifest: Manifest,
        *,
        sha256: str,
        sparse_layers: frozenset[str],
        store: ModelStore | None = None,
        active: ActiveModel | None = None,
    ) -> None:
        self.module = module.eval()
        self.manifest = manifest
        self.sha256 = sha256
        self.sparse_layers = sparse_layers
        self._store = store
        self._active = active
        self._lock = threading.Lock()
        self._process = f"{os.getpid()}-{time.time_ns()}"
        self.inferences = 0
        self.errors = 0
        self._flushed_at = 0.0

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    def _batch(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.float32:
            x = batch
        else:
            x = torch.as_tensor(np.asarray(batch, dtype=np.float32))
        shape = tuple(self.input_shape)
        if tuple(x.shape) == shape:
            x = x.unsqueeze(0)
        if x.dim() < 1 or tuple(x.shape[1:]) != shape:
            per_example = int(np.prod(shape))
            if x.dim() >= 1 and x.numel() == x.shape[0] * per_example and x.shape[0] > 0:
                return x.reshape((x.shape[0], *shape))
            raise DataError(
                f"model {self.version!r} takes examples of shape {list(shape)}, got a batch "
                f"of shape {list(x.shape)}"
            )
        return x

    def logits(self, batch: Any, *, count: bool = True) -> FloatArray:
        """Logits ``[N, len(classes)]`` of ``batch`` (``[N, *input_shape]`` or one example).

        ``count`` False leaves the usage counters alone (the device's own self-test)."""
        try:
            x = self._batch(batch)
            with torch.no_grad():
                out = self.module(x)
            if out.shape[1] != len(self.classes):
                out = out[:, : len(self.classes)]
            logits: FloatArray = out.numpy()  # float32, shares the output's memory
        except Exception:
            if count:
                self._count(0, 1)
            raise
        if count:
            self._count(int(logits.shape[0]), 0)
        return logits

    def predict(self, batch: Any) -> Prediction:
        """The predicted class of every example of ``batch`` (see ``logits``)."""
        logits = self.logits(batch)
        indices = logits.argmax(axis=1).astype(np.int64)
        return Prediction(
            logits=logits,
            indices=indices,
            labels=tuple(self.classes[i] for i in indices),
            version=self.version,
        )

    def _count(self, examples: int, errors: int) -> None:
        with self._lock:
            self.inferences += examples
            self.errors += errors
            due = time.monotonic() - self._flushed_at >= USAGE_FLUSH_S
        if due:
            self.flush()

    def count_as(self, active: ActiveModel) -> None:
        """Count predictions from now on for ``active`` (the activation that serves them)."""
        with self._lock:
            self._active = active

    def flush(self) -> None:
        """Write this process's counters to the models directory (when loaded from one)."""
        if self._store is None or self._active is None:
            return
        with self._lock:
            usage = {usage_key(self._active): (self.inferences, self.errors)}
            self._flushed_at = time.monotonic()
        try:
            self._store.record_usage(self._process, usage)
        except OSError as exc:  # counting must never break predictions
            log.warning("could not record model usage in %s: %s", self._store.root, exc)

    def close(self) -> None:
        self.flush()


def build(
    artefact: Artefact,
    *,
    plan: PlanChoice | frozenset[str] = "auto",
    cached_plan: Mapping[str, Any] | None = None,
    store: ModelStore | None = None,
    active: ActiveModel | None = None,
) -> tuple[InferenceModel, dict[str, Any] | None]:
    """Build an inference model from a (verified) artefact; returns it and the plan measured
    for it (None when none was measured: a cached plan was used, or ``plan`` was explicit).

    ``plan``: "auto" (measured, or ``cached_plan`` when it fits this torch and thread count),
    "dense", "sparse" (every capable pruned layer) or an explicit set of weight names.
    ``ConfigError`` when the model cannot be built here or the tensors do not fit it.
    """
    manifest = artefact.manifest
    decoded = artefact.model()
    try:
        model = meta_model(manifest.model)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"model {manifest.model!r} cannot be built here: {exc}") from None
    _check_layout(model, decoded.tensors, f"model {manifest.version!r}")
    measured: dict[str, Any] | None = None
    capable = set(_planned(decoded, model))
    sparse: set[str]
    if isinstance(plan, frozenset):
        sparse = set(plan) & capable
    elif plan == "dense":
        sparse = set()
    elif plan == "sparse":
        sparse = capable
    elif _plan_usable(cached_plan):
        assert cached_plan is not None
        sparse = set(cached_plan["sparse"]) & capable
    else:
        measured = measure_plan(decoded, manifest)
        sparse = set(measured["sparse"])
    _assemble(model, decoded, frozenset(sparse))
    module = InferenceModel(
        model,
        manifest,
        sha256=artefact.sha256.hex(),
        sparse_layers=frozenset(sparse),
        store=store,
        active=active,
    )
    return module, measured


def load_file(
    path: Path | str,
    *,
    trusted: TrustedKeys | None = None,
    plan: PlanChoice | frozenset[str] = "auto",
) -> InferenceModel:
    """An inference model from an artefact file; its signature is checked when ``trusted``
    keys are given (``ArtefactError`` otherwise)."""
    artefact = read_artefact(Path(path).read_bytes())
    if trusted is not None:
        trusted.verify(artefact)
    return build(artefact, plan=plan)[0]


def load(
    models_dir: Path | str | None = None,
    *,
    version: str | None = None,
    trusted: TrustedKeys | None = None,
    plan: PlanChoice | frozenset[str] = "auto",
) -> InferenceModel:
    """The active (or ``version``'s) model of a device's models directory.

    ``models_dir`` defaults to ``$SPARSEFLEET_MODELS``, else ``DEFAULT_MODELS_DIR``. The file
    is checked against the SHA-256 recorded when it was installed (after its signature was
    verified), and again against ``trusted`` keys when given. ``NotFoundError`` when nothing is
    deployed there.
    """
    from device.errors import NotFoundError

    root = Path(models_dir or os.environ.get("SPARSEFLEET_MODELS") or DEFAULT_MODELS_DIR)
    store = ModelStore(root)
    state = store.state()
    entry = state.active
    if version is not None:
        entry = next(
            (e for e in (state.active, *state.history) if e is not None and e.version == version),
            None,
        )
    if entry is None:
        what = f"version {version!r}" if version is not None else "no active model"
        raise NotFoundError(f"{root}: {what} (deploy one with `fleet model deploy`)")
    data = store.read(entry.version)
    artefact = read_artefact(data)
    if artefact.sha256.hex() != entry.sha256:
        raise DataError(
            f"{store.artefact_path(entry.version)} changed since it was installed "
            "(its SHA-256 differs); redeploy it"
        )
    if trusted is not None:
        trusted.verify(artefact)
    model, measured = build(
        artefact, plan=plan, cached_plan=store.read_plan(entry.version), store=store, active=entry
    )
    if measured is not None:
        try:
            store.write_plan(entry.version, measured)
        except OSError as exc:  # a read-only models directory: measure again next time
            log.info("could not cache the kernel plan in %s: %s", root, exc)
    return model

"""Export a run's global model from the store as a signed sparse artefact (``fleet model export``),
and optionally as a dense TorchScript or ONNX file for other runtimes.

The artefact (``device.wire.artefact``, docs/deployment.md) holds the checkpoint of the chosen
round (the last one by default) with its masks, values in fp32, fp16 or int8 (one scale per
tensor), and a manifest saying what it is and where it came from: the model reference and its
architecture digest, the classes and input shape, the run, round and model version, the round's
accuracy (server-side and federated, where the store has them), sizes, the SHA-256 of the
tensors, and the deployment key that signed it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from device import __version__
from device.data import DIGITS_MEAN, DIGITS_STD, MNIST_MEAN, MNIST_STD
from device.errors import ConfigError, NotFoundError
from device.model_ref import ModelRef
from device.models import empty_model, find_model_spec
from device.wire.artefact import (
    VALUE_DTYPES,
    Artefact,
    Manifest,
    build_artefact,
    encode_content,
    read_artefact,
    version_label,
)
from fleet.deploy.signing import DeployKey
from fleet.state.store import CheckpointRecord, Store

__all__ = ["DATASET_PRESETS", "Exported", "default_version", "export_dense", "export_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetPreset:
    """What the built-in datasets imply for inference: class names and the normalisation that
    turns an image's pixels into the model's input, ``(pixel / 255 - mean) / std``."""

    classes: tuple[str, ...]
    preprocess: Mapping[str, Any]


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "mnist": DatasetPreset(
        tuple(str(i) for i in range(10)),
        {"mean": [MNIST_MEAN], "std": [MNIST_STD]},
    ),
    "digits": DatasetPreset(
        tuple(str(i) for i in range(10)),
        {"mean": [DIGITS_MEAN], "std": [DIGITS_STD]},
    ),
}


@dataclass(frozen=True)
class Exported:
    """An exported artefact: the file's bytes, parsed back (so every check of a device ran)."""

    data: bytes
    artefact: Artefact

    @property
    def manifest(self) -> Manifest:
        return self.artefact.manifest


def default_version(run_id: str, round_: int | None, values: str) -> str:
    """``{run}-r{round}-{values}`` made a valid version label (other characters become ``-``)."""
    text = f"{run_id}-r{round_ if round_ is not None else 0}-{values}"
    text = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-") or "model"
    return version_label(text[:128])


def _checkpoint_of(store: Store, run_id: str, round_: int | None) -> CheckpointRecord:
    store.get_run(run_id)  # NotFoundError naming the run
    if round_ is None:
        return store.checkpoint_record(run_id)
    record = store.get_round(run_id, round_)
    if record.model_version_out is None:
        raise NotFoundError(f"round {round_} of run {run_id!r} produced no model (still open)")
    return store.checkpoint_record(run_id, record.model_version_out)


def _metrics(store: Store, run_id: str, round_: int | None) -> dict[str, float | None]:
    """The round's numeric metrics (accuracy is server-side; ``federated_*`` where federated
    evaluation ran), non-finite values as None."""
    if round_ is None:
        return {}
    try:
        metrics = store.get_round(run_id, round_).metrics
    except NotFoundError:
        return {}
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(key)] = float(value) if math.isfinite(value) else None
    return out


def _classes(
    classes: Sequence[str] | None,
    preset: DatasetPreset | None,
    configured: Any,
    num_classes: int,
) -> tuple[str, ...]:
    if classes:
        chosen = tuple(classes)
    elif preset is not None:
        chosen = preset.classes
    elif isinstance(configured, list | tuple) and all(isinstance(c, str) for c in configured):
        chosen = tuple(configured)
    else:
        chosen = tuple(str(i) for i in range(num_classes))
    if len(chosen) > num_classes:
        raise ConfigError(
            f"{len(chosen)} classes given, but the model has only {num_classes} outputs"
        )
    if len(chosen) < 2 or len(set(chosen)) != len(chosen):
        raise ConfigError("classes must be at least 2 distinct names")
    return chosen


def export_run(
    store: Store,
    run_id: str,
    key: DeployKey,
    *,
    round_: int | None = None,
    values: str = "int8",
    version: str | None = None,
    classes: Sequence[str] | None = None,
    dataset: str | None = None,
    now: float | None = None,
) -> Exported:
    """The artefact of ``run_id``'s model after ``round_`` (None: its newest checkpoint).

    ``dataset`` (a built-in: mnist, digits) names the classes and the pixel normalisation that
    predictions on images need; ``classes`` overrides the class names (class ``i`` is logit
    ``i``; fewer than the model's outputs is allowed). ``NotFoundError`` for an unknown run or
    round, ``ConfigError`` for bad options or a model that declares no input shape.
    """
    if values not in VALUE_DTYPES:
        raise ConfigError(f"--values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    preset = None
    if dataset is not None:
        preset = DATASET_PRESETS.get(dataset)
        if preset is None:
            known = ", ".join(sorted(DATASET_PRESETS))
            raise ConfigError(f"unknown dataset {dataset!r} for export; known: {known}")
    run = store.get_run(run_id)
    record = _checkpoint_of(store, run_id, round_)
    checkpoint = store.load_checkpoint(run_id, record.version)
    ref = ModelRef.parse(run.model_name)
    spec = find_model_spec(ref)
    if spec is None:
        raise ConfigError(
            f"model {ref.text!r} declares no input shape and classes; give them in the run's model"
        )
    try:
        from device.model_id import digest_of

        architecture = digest_of(ref).hex()
    except (ValueError, ConfigError) as exc:  # a factory not installed on the fleet manager
        log.warning("model %s: no architecture digest (%s); devices check shapes only", ref, exc)
        architecture = ""
    round_of = record.round if round_ is None else round_
    label = version_label(version) if version else default_version(run_id, round_of, values)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in checkpoint.weights.items()}
    masks = {k: np.asarray(v, dtype=np.bool_) for k, v in checkpoint.masks.items()}
    content, digest = encode_content(
        model_name=ref.text,
        model_version=record.version,
        mask_version=int(record.meta.get("mask_version", record.version)),
        weights=weights,
        masks=masks,
        values=values,
        run_id=run_id,
        round_=round_of or 0,
    )
    numel = sum(int(w.size) for w in weights.values())
    pruned_total = sum(int(m.size) for m in masks.values())
    pruned_kept = sum(int(np.count_nonzero(m)) for m in masks.values())
    nonzero = numel - pruned_total + pruned_kept
    manifest = Manifest(
        version=label,
        model=ref.text,
        classes=_classes(classes, preset, run.config.get("classes"), spec.num_classes),
        input_shape=tuple(spec.input_shape),
        values=values,
        content_sha256=hashlib.sha256(content).hexdigest(),
        model_digest=digest.hex(),
        signer_key_id=key.key_id,
        architecture_digest=architecture,
        source_model_digest=record.digest,
        source={
            "run": run_id,
            "round": round_of,
            "model_version": record.version,
            "strategy": run.strategy,
        },
        metrics=_metrics(store, run_id, round_of),
        sizes={
            "content_bytes": len(content),
            "dense_fp32_bytes": 4 * numel,
            "parameters": numel,
            "nonzero": nonzero,
            "density": pruned_kept / pruned_total if pruned_total else 1.0,
        },
        created_unix_s=time.time() if now is None else now,
        tool=f"sparsefleet {__version__}",
        preprocess=dict(preset.preprocess) if preset is not None else {},
    )
    data = build_artefact(manifest, content, key.sign)
    return Exported(data, read_artefact(data))


def export_dense(artefact: Artefact, path: Path, kind: Literal["torchscript", "onnx"]) -> Path:
    """Write the artefact's model as a dense ``kind`` file (the values as the artefact stores
    them, zeros outside the masks): TorchScript by ``torch.jit.trace``, ONNX by
    ``torch.onnx.export`` (needs the ``onnx`` package). ``ConfigError`` when the model cannot
    be traced or exported."""
    manifest = artefact.manifest
    decoded = artefact.model()
    model = empty_model(manifest.model)
    state = {name: torch.from_numpy(decoded.dense(name)) for name in decoded.tensors}
    model.load_state_dict(state)
    model.eval()
    example = torch.zeros((1, *manifest.input_shape))
    try:
        if kind == "torchscript":
            # torch >= 2.10 deprecates TorchScript in favour of torch.export, but it is still
            # the dense format other runtimes (libtorch, older PyTorch) load.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
                traced.save(str(path))
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as exc:  # tracing runs the user's model: report whatever stops it
        raise ConfigError(f"cannot export {manifest.model!r} as {kind}: {exc}") from None
    return path

"""The checks a device makes before it switches to a deployed artefact, and its self-test.

``verify_artefact`` is step 3 of ``device.deploy``'s protocol without the notice's part: the
artefact parses and its digests hold (``device.wire.artefact``), a trusted key signed it
(``device.trust``), its model can be built here (the architecture digest when the manifest has
one, and the tensors' names and shapes), its tensors match their model digest, and it agrees
with the device's data (class names; class count and example shape from a sample). ``selftest``
predicts a few local examples with the loaded model before the switch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device.errors import SparseFleetError
from device.inference import InferenceModel
from device.models import meta_model
from device.trust import TrustedKeys
from device.wire.artefact import Artefact, read_artefact

__all__ = ["DeployFailure", "LocalSample", "check_data", "selftest", "verify_artefact"]


@dataclass(frozen=True)
class LocalSample:
    """A few of the device's examples (``x`` float32 ``[N, ...]``, ``y`` int64 ``[N]``) and
    what its data holds: ``num_classes`` and the shape of one example."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    num_classes: int
    example_shape: tuple[int, ...]


class DeployFailure(SparseFleetError):
    """Why a deployment failed on this device (the artefact does not fit it: retrying would
    fail the same way)."""


def verify_artefact(
    data: bytes,
    trusted: TrustedKeys,
    classes: tuple[str, ...] | None,
    sample: LocalSample | None,
) -> Artefact:
    """The parsed artefact when every check passes; ``ArtefactError`` (structure, digests,
    signature) or ``DeployFailure`` (architecture, data) otherwise."""
    artefact = read_artefact(data)
    trusted.verify(artefact)
    manifest = artefact.manifest
    try:
        meta = meta_model(manifest.model)
    except Exception as exc:  # unknown name, factory not installed, factory raises
        raise DeployFailure(
            f"unknown architecture: model {manifest.model!r} cannot be built here ({exc})"
        ) from None
    if manifest.architecture_digest:
        from device.model_id import architecture_digest
        from device.model_ref import ModelRef

        local = architecture_digest(meta, ModelRef.parse(manifest.model)).hex()
        if local != manifest.architecture_digest:
            raise DeployFailure(
                f"model {manifest.model!r}: this device builds architecture {local[:16]}, "
                f"the artefact's is {manifest.architecture_digest[:16]}"
            )
    decoded = artefact.model()
    state = {n: tuple(int(d) for d in t.shape) for n, t in meta.state_dict().items()}
    if state != {n: t.shape for n, t in decoded.tensors.items()}:
        raise DeployFailure(f"the artefact's tensors do not fit model {manifest.model!r} here")
    if decoded.computed_digest() != decoded.digest:
        raise DeployFailure("the tensors do not match their model digest (corrupt artefact)")
    check_data(artefact, classes, sample)
    return artefact


def check_data(
    artefact: Artefact, classes: tuple[str, ...] | None, sample: LocalSample | None
) -> None:
    """``DeployFailure`` when the manifest's classes or input shape disagree with the data."""
    manifest = artefact.manifest
    if classes is not None and tuple(classes) != manifest.classes:
        raise DeployFailure(
            f"the artefact's classes ({', '.join(manifest.classes[:10])}) differ from this "
            f"device's data ({', '.join(classes[:10])})"
        )
    if sample is None:
        return
    if sample.num_classes != len(manifest.classes):
        raise DeployFailure(
            f"the artefact has {len(manifest.classes)} classes, this device's data "
            f"{sample.num_classes}"
        )
    if tuple(sample.example_shape) != manifest.input_shape:
        raise DeployFailure(
            f"the artefact takes examples of shape {list(manifest.input_shape)}, this "
            f"device's data has {list(sample.example_shape)}"
        )


def selftest(model: InferenceModel, sample: LocalSample | None, limit: int) -> dict[str, float]:
    """Predict up to ``limit`` local examples: the logits must be finite (``DeployFailure``).
    Returns the metrics for the ``active`` event (empty without data)."""
    if sample is None:
        return {}
    n = min(len(sample.y), limit)
    if n == 0:
        return {}
    start = time.perf_counter()
    logits = model.logits(sample.x[:n], count=False)
    elapsed = time.perf_counter() - start
    if not np.isfinite(logits).all():
        raise DeployFailure("the new model's outputs on local examples are not finite")
    accuracy = float((logits.argmax(axis=1) == sample.y[:n]).mean())
    return {
        "selftest_examples": float(n),
        "selftest_accuracy": accuracy,
        "selftest_ms_per_example": 1000.0 * elapsed / n,
    }

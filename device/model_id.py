"""A model's architecture digest: what both sides compare before a device trains.

The digest is SHA-256 over the canonical JSON (``device.model_ref.canonical_json``) of::

    {"format": "sparsefleet.architecture.v1",
     "model": {"name": ...} or {"factory": ...},      # the reference's source
     "kwargs": {...},                                  # the factory's keyword arguments
     "parameters": [[name, [shape...], dtype], ...],   # sorted by state_dict name
     "buffers":    [[name, [shape...], dtype], ...]}   # persistent buffers, sorted likewise

where dtypes are torch's names without the ``torch.`` prefix (``"float32"``, ``"int64"``). It
says which tensors exist with which shapes and dtypes, not what the forward pass computes; two
processes, machines or torch versions that build the same layout get the same 32 bytes.

The fleet manager puts the digest of the run's model in every ``ModelSnapshot``; a device
builds the snapshot's reference itself and refuses the job (``JobState.REJECTED``, naming both
digests) when its build differs (:class:`ArchitectureCheck`), so it never trains or uploads
against the wrong layout. Devices announce the models they can build with their digests
(:func:`offers`) in their status message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from device.errors import ConfigError, SparseFleetError
from device.model_ref import ModelOffer, ModelRef, canonical_json
from device.model_registry import BUILTIN
from device.models import ModelLike, meta_model
from device.wire.messages import ModelSnapshot

__all__ = [
    "FORMAT",
    "ArchitectureCheck",
    "ArchitectureMismatchError",
    "architecture",
    "architecture_digest",
    "builtin_refs",
    "check_model",
    "digest_of",
    "layout_difference",
    "mismatch_message",
    "offers",
    "short",
    "snapshot_ref",
]

FORMAT = "sparsefleet.architecture.v1"


class ArchitectureMismatchError(SparseFleetError):
    """The model a device builds for a reference is not the run's (its digest differs)."""


def short(digest: bytes) -> str:
    """The first 16 hex digits of a digest, for messages ("-" when empty)."""
    return digest.hex()[:16] if digest else "-"


def architecture(model: nn.Module, ref: ModelRef) -> dict[str, Any]:
    """The canonical description of ``model`` built from ``ref`` (module docstring)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    listed: dict[str, list[list[Any]]] = {"parameters": [], "buffers": []}
    for name, tensor in sorted(model.state_dict().items()):
        kind = "parameters" if name in parameters else "buffers"
        dtype = str(tensor.dtype).removeprefix("torch.")
        listed[kind].append([name, [int(d) for d in tensor.shape], dtype])
    source = {"factory": ref.factory} if ref.is_factory else {"name": ref.name}
    return {"format": FORMAT, "model": source, "kwargs": dict(ref.kwargs), **listed}


def architecture_digest(model: nn.Module, ref: ModelRef) -> bytes:
    """SHA-256 (32 bytes) of ``canonical_json(architecture(model, ref))``."""
    text = canonical_json(architecture(model, ref))
    return hashlib.sha256(text.encode("utf-8")).digest()


def digest_of(model: ModelLike) -> bytes:
    """The architecture digest of ``model`` as this process builds it (on ``meta``: no memory
    for the weights). Raises as ``device.models.create_model``."""
    ref = ModelRef.of(model)
    return architecture_digest(meta_model(ref), ref)


def builtin_refs() -> tuple[ModelRef, ...]:
    """The built-in models, sorted: what an agent offers when its config names none."""
    return tuple(ModelRef(name=name) for name in sorted(BUILTIN))


def offers(refs: Iterable[ModelLike]) -> tuple[ModelOffer, ...]:
    """What a device announces for ``refs``: each reference with the digest of its build.

    Raises:
        ValueError, ConfigError: a reference cannot be built here (unknown name, a factory
            that cannot be imported, raises or returns no Module); the message names it.
    """
    out = []
    for item in refs:
        ref = ModelRef.of(item)
        out.append(ModelOffer(ref, digest_of(ref)))
    return tuple(out)


def snapshot_ref(snapshot: ModelSnapshot) -> ModelRef:
    """The reference a snapshot's model is built from: its ``model_ref``, or (a fleet manager
    that sends none) its ``model_name`` read as ``ModelRef`` text."""
    return (
        snapshot.model_ref
        if snapshot.model_ref is not None
        else ModelRef.parse(snapshot.model_name)
    )


def layout_difference(model: nn.Module, weights: Mapping[str, Any]) -> str:
    """What differs between ``model``'s state and ``weights`` (a snapshot's or checkpoint's
    tensors: names and shapes), for messages; "" when names and shapes agree (then a dtype, a
    buffer's kind or the kwargs differ)."""
    state = {name: tuple(int(d) for d in t.shape) for name, t in model.state_dict().items()}
    theirs = {name: tuple(np.shape(w)) for name, w in weights.items()}
    parts = []
    missing = sorted(set(theirs) - set(state))
    extra = sorted(set(state) - set(theirs))
    if missing:
        parts.append(f"the run's model has {', '.join(missing[:5])} that this build lacks")
    if extra:
        parts.append(f"this build has {', '.join(extra[:5])} that the run's model lacks")
    shapes = [
        f"{name} {list(theirs[name])} vs {list(state[name])} here"
        for name in sorted(set(state) & set(theirs))
        if state[name] != theirs[name]
    ]
    if shapes:
        parts.append("shapes differ: " + "; ".join(shapes[:5]))
    return "; ".join(parts)


def mismatch_message(ref: ModelRef, expected: bytes, local: bytes, detail: str = "") -> str:
    """The one line a device reports when it refuses a model (both digests named)."""
    return (
        f"model {ref.text!r}: this device builds architecture {short(local)}, the run's model is "
        f"{short(expected)}; not training against a different layout"
        + (f" ({detail})" if detail else "")
        + ": install the same version of the model's package on the device"
    )


def check_model(model: nn.Module, snapshot: ModelSnapshot) -> None:
    """Raise ``ArchitectureMismatchError`` when ``model`` (built from the snapshot's reference)
    is not the architecture the snapshot names; a snapshot without a digest is not checked."""
    expected = snapshot.architecture_digest
    if not expected:
        return
    ref = snapshot_ref(snapshot)
    local = architecture_digest(model, ref)
    if local != expected:
        detail = layout_difference(model, snapshot.weights)
        raise ArchitectureMismatchError(mismatch_message(ref, expected, local, detail))


class ArchitectureCheck:
    """A device's check of the snapshots it is asked to train on, before any data is read.

    ``problem(snapshot)`` is None when the device builds the snapshot's architecture (or the
    snapshot names no digest), else the reason to refuse the job: the two digests, or why the
    model cannot be built here. Local digests are kept per reference (built once, on ``meta``).
    """

    def __init__(self) -> None:
        self._digests: dict[str, bytes] = {}

    def problem(self, snapshot: ModelSnapshot) -> str | None:
        expected = snapshot.architecture_digest
        if not expected:
            return None
        try:
            ref = snapshot_ref(snapshot)
            local = self._digests.get(ref.text)
            if local is None:
                model = meta_model(ref)
                local = self._digests[ref.text] = architecture_digest(model, ref)
            if local == expected:
                return None
            detail = layout_difference(meta_model(ref), snapshot.weights)
        except (ConfigError, ValueError) as exc:
            return f"model {snapshot.model_name!r} cannot be built on this device: {exc}"
        return mismatch_message(ref, expected, local, detail)

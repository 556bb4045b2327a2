"""What the store returns: frozen records (JSON columns decoded), their status enums, and the
store's own error.

Records are plain values: reading one never touches the database again. The one exception is
``UpdateRecord.load_payload``, which reads (and verifies) the update's tensor file on demand, so
listing a round's updates does not load every payload.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from device.errors import SparseFleetError


class StoreConflictError(SparseFleetError):
    """An operation conflicts with the stored state.

    Examples: a run id that already exists, a second open round, an update counted twice, a
    checkpoint version that a round already used. The message says which run/round/device.
    """


class RunStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"


class RoundStatus(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class UpdateStatus(enum.StrEnum):
    """Life cycle of a stored update.

    ``accepted``: arrived while its round was open, waits for aggregation. ``late``: arrived after
    its round closed; the late policy later counts it into another round or drops it.
    ``counted``: part of exactly one aggregate (``counted_in_round``). ``dropped``: stored (so a
    redelivery is still a duplicate) but never aggregated.
    """

    ACCEPTED = "accepted"
    LATE = "late"
    COUNTED = "counted"
    DROPPED = "dropped"


_E = TypeVar("_E", bound=enum.StrEnum)


def parse_enum(kind: type[_E], value: str, what: str) -> _E:
    """``kind(value)``, or ValueError naming ``what`` and every known value."""
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(m.value for m in kind)
        raise ValueError(f"unknown {what} {value!r}; known: {known}") from None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: Mapping[str, Any]
    strategy: str
    model_name: str
    status: RunStatus
    current_round: int  # the last round opened; 0 before the first
    error: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RoundRecord:
    """One round. ``selected`` is in selection order; ``deadline`` is Unix seconds.

    ``plan`` is whatever the runner needs to re-issue the round after a restart (quorum k,
    command settings); ``model_version_out``/``checkpoint_digest`` are set when it closes.
    """

    run_id: str
    round: int
    status: RoundStatus
    selected: tuple[str, ...]
    deadline: float
    plan: Mapping[str, Any]
    model_version_in: int
    model_version_out: int | None
    checkpoint_digest: str | None
    close_reason: str
    metrics: Mapping[str, Any]
    bytes_up: int
    bytes_down: int
    opened_at: float
    closed_at: float | None


@dataclass(frozen=True)
class UpdateRecord:
    """A stored device update; ``load_payload()`` returns the raw bytes as received.

    ``_read_blob`` reads a tensor file by digest (the store's ``read_blob``); it is not part of
    the record's value (no repr, no comparison).
    """

    run_id: str
    round: int
    device_id: str
    payload_digest: str
    payload_bytes: int
    num_examples: int
    status: UpdateStatus
    counted_in_round: int | None
    meta: Mapping[str, Any]
    received_at: float
    _read_blob: Callable[[str], bytes] = field(repr=False, compare=False)

    def load_payload(self) -> bytes:
        """The update's bytes, verified against ``payload_digest`` (DataError if not)."""
        return self._read_blob(self.payload_digest)


@dataclass(frozen=True)
class RejectionRecord:
    id: int
    run_id: str | None
    round: int | None
    device_id: str
    reason: str  # short machine-readable code, e.g. "non_finite"
    detail: str
    at: float


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: str
    version: int
    round: int | None  # the round that produced it; None for an initial model
    digest: str
    size_bytes: int
    meta: Mapping[str, Any]
    created_at: float


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint; arrays are bit-identical to what was saved (dtype and order too)."""

    record: CheckpointRecord
    weights: dict[str, npt.NDArray[Any]]
    masks: dict[str, npt.NDArray[np.bool_]]
    extra_state: dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class DeviceRecord:
    """A device row as stored. ``status`` is the JSON of its last applied birth/will
    (hardware, dataset size, profile, reported tags); ``tags`` are the operator's tags.

    ``session_epoch`` is None until a status message was applied (a row can be created by
    selection or an update first). ``rejections`` counts rejected messages by reason.
    """

    device_id: str
    online: bool
    session_epoch: int | None
    last_seen: float | None
    agent_version: str
    status: Mapping[str, Any]
    cordoned: bool
    drained: bool
    tags: Mapping[str, str]
    rounds_joined: int
    updates_accepted: int
    failures: int
    last_failure: str
    bytes_up: int
    bytes_down: int
    rejections: Mapping[str, int]
    first_seen: float


@dataclass(frozen=True)
class ChunkKey:
    """One chunked transfer: a device's payload for a round, named by its SHA-256 (32 bytes)."""

    run_id: str
    round: int
    device_id: str
    sha256: bytes


@dataclass(frozen=True)
class ChunkOutcome:
    """What storing one piece of a chunked transfer led to.

    ``new``: the row was written (False: a duplicate; the first write wins). ``payload``: the
    whole payload, reassembled and verified (size, SHA-256), when this write completed the
    transfer; its rows stay until ``delete_chunk_set`` (the caller deletes them once the update
    is decided, so a crash before that loses nothing). ``problem``: why the transfer was given
    up (its rows are deleted in the same transaction); empty when all is well.
    """

    new: bool
    payload: bytes | None = None
    problem: str = ""

"""Durable state of the fleet manager: SQLite (WAL) for records, content-addressed tensor files.

Layout under ``root`` (see ``docs/state.md`` for the schema and the resume procedure)::

    fleet.db              SQLite database in WAL mode (fleet.db-wal and fleet.db-shm beside it)
    tensors/ab/abcd...    immutable files named by the SHA-256 hex digest of their bytes

Invariants this module keeps, whatever moment the process dies at:

- **Files first, then rows.** A tensor file is written to a temporary name, fsynced, renamed to its
  digest and its directory fsynced *before* the transaction that inserts a row naming it commits.
  A file without a row is harmless garbage; a row never names a missing file.
- **One transaction per operation.** Every public write is a single ``BEGIN IMMEDIATE`` ...
  ``COMMIT``; counters (device bytes, updates accepted, rounds joined) move in the same
  transaction as the fact they count, so they are exact after a crash.
- **Write, then acknowledge.** Writes that precede an MQTT acknowledgement (updates, rounds,
  checkpoints, runs, operator flags) commit with ``synchronous=FULL``: when the call returns, the
  row survives a power cut. Device presence (births, wills, last seen), traffic and rejection logs
  commit with ``synchronous=NORMAL``, which in WAL mode survives a process crash and becomes
  power-safe at the next FULL commit.
- **Idempotence.** Updates are keyed by (run, round, device): the first write wins and a
  redelivery changes nothing. A tensor written twice is stored once.
- **Counted at most once.** ``close_round`` moves updates from accepted/late to counted or
  dropped in the same transaction that closes the round, and refuses to count one twice.

Thread-safety: each thread gets its own connection; SQLite serialises writers (busy timeout) and
WAL lets readers in other processes (the ``fleet`` CLI) read while the runner writes.
Times are Unix seconds (``time.time()``); sizes are bytes.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from device.errors import DataError, NotFoundError, SparseFleetError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointRecord",
    "ChunkKey",
    "ChunkOutcome",
    "DeviceRecord",
    "Migration",
    "RejectionRecord",
    "RoundRecord",
    "RoundStatus",
    "RunRecord",
    "RunStatus",
    "Store",
    "StoreConflictError",
    "UpdateRecord",
    "UpdateStatus",
    "decode_checkpoint",
    "encode_checkpoint",
]

DB_NAME = "fleet.db"
TENSORS_DIR = "tensors"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A fixed timestamp inside the checkpoint zip makes identical checkpoints byte-identical, so they
# get the same digest and are stored once.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CKPT_SECTIONS = ("weights", "masks", "extra")


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


def _parse_enum(kind: type[_E], value: str, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(m.value for m in kind)
        raise ValueError(f"unknown {what} {value!r}; known: {known}") from None


# Terminal states cannot be left; everything else may be resumed or ended.
_RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.CREATED: frozenset({RunStatus.RUNNING, RunStatus.STOPPED, RunStatus.FAILED}),
    RunStatus.RUNNING: frozenset(
        {RunStatus.RUNNING, RunStatus.STOPPED, RunStatus.FINISHED, RunStatus.FAILED}
    ),
    RunStatus.STOPPED: frozenset({RunStatus.RUNNING, RunStatus.STOPPED, RunStatus.FAILED}),
    RunStatus.FAILED: frozenset({RunStatus.RUNNING, RunStatus.FAILED}),
    RunStatus.FINISHED: frozenset({RunStatus.FINISHED}),
}


# --------------------------------------------------------------------------------------------
# Records returned by the store (plain, frozen; JSON columns decoded)
# --------------------------------------------------------------------------------------------


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
    """A stored device update; ``load_payload()`` returns the raw bytes as received."""

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
    _store: Store = field(repr=False, compare=False)

    def load_payload(self) -> bytes:
        """The update's bytes, verified against ``payload_digest`` (DataError if not)."""
        return self._store.read_blob(self.payload_digest)


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


# --------------------------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """Brings the schema from ``version - 1`` to ``version``; runs inside the open transaction.

    Never edit a released migration: append a new one (SQLite DDL is transactional, so a
    migration either applies completely or not at all).
    """

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


_SCHEMA_V1 = """
CREATE TABLE runs (
    run_id        TEXT PRIMARY KEY CHECK (length(run_id) > 0),
    config        TEXT NOT NULL CHECK (json_valid(config)),
    strategy      TEXT NOT NULL,
    model_name    TEXT NOT NULL,
    status        TEXT NOT NULL
                  CHECK (status IN ('created', 'running', 'stopped', 'finished', 'failed')),
    current_round INTEGER NOT NULL DEFAULT 0 CHECK (current_round >= 0),
    error         TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
) STRICT;

CREATE TABLE checkpoints (
    run_id     TEXT NOT NULL REFERENCES runs (run_id),
    version    INTEGER NOT NULL CHECK (version >= 0),
    round      INTEGER,
    digest     TEXT NOT NULL CHECK (length(digest) = 64),
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    meta       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(meta)),
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, version)
) STRICT;

CREATE TABLE rounds (
    run_id            TEXT NOT NULL REFERENCES runs (run_id),
    round             INTEGER NOT NULL CHECK (round >= 0),
    status            TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    selected          TEXT NOT NULL CHECK (json_valid(selected)),
    deadline          REAL NOT NULL,
    plan              TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(plan)),
    model_version_in  INTEGER NOT NULL,
    model_version_out INTEGER,
    checkpoint_digest TEXT,
    close_reason      TEXT NOT NULL DEFAULT '',
    metrics           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metrics)),
    bytes_up          INTEGER NOT NULL DEFAULT 0 CHECK (bytes_up >= 0),
    bytes_down        INTEGER NOT NULL DEFAULT 0 CHECK (bytes_down >= 0),
    opened_at         REAL NOT NULL,
    closed_at         REAL,
    PRIMARY KEY (run_id, round),
    FOREIGN KEY (run_id, model_version_in) REFERENCES checkpoints (run_id, version),
    FOREIGN KEY (run_id, model_version_out) REFERENCES checkpoints (run_id, version),
    CHECK ((status = 'open') = (closed_at IS NULL)),
    CHECK (status = 'open' OR (model_version_out IS NOT NULL AND checkpoint_digest IS NOT NULL))
) STRICT;

-- At most one open round per run: a restarted runner finds exactly the round it was in.
CREATE UNIQUE INDEX rounds_one_open ON rounds (run_id) WHERE status = 'open';

CREATE TABLE updates (
    run_id           TEXT NOT NULL,
    round            INTEGER NOT NULL,
    device_id        TEXT NOT NULL CHECK (length(device_id) > 0),
    payload_digest   TEXT NOT NULL CHECK (length(payload_digest) = 64),
    payload_bytes    INTEGER NOT NULL CHECK (payload_bytes >= 0),
    num_examples     INTEGER NOT NULL CHECK (num_examples >= 0),
    status           TEXT NOT NULL CHECK (status IN ('accepted', 'late', 'counted', 'dropped')),
    counted_in_round INTEGER,
    meta             TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(meta)),
    received_at      REAL NOT NULL,
    decided_at       REAL,
    PRIMARY KEY (run_id, round, device_id),
    FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round),
    CHECK ((status = 'counted') = (counted_in_round IS NOT NULL))
) STRICT, WITHOUT ROWID;

CREATE INDEX updates_by_status ON updates (run_id, status);

CREATE TABLE devices (
    device_id        TEXT PRIMARY KEY CHECK (length(device_id) > 0),
    online           INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)),
    session_epoch    INTEGER,
    last_seen        REAL,
    agent_version    TEXT NOT NULL DEFAULT '',
    status           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(status)),
    cordoned         INTEGER NOT NULL DEFAULT 0 CHECK (cordoned IN (0, 1)),
    drained          INTEGER NOT NULL DEFAULT 0 CHECK (drained IN (0, 1)),
    tags             TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(tags)),
    rounds_joined    INTEGER NOT NULL DEFAULT 0,
    updates_accepted INTEGER NOT NULL DEFAULT 0,
    failures         INTEGER NOT NULL DEFAULT 0,
    last_failure     TEXT NOT NULL DEFAULT '',
    bytes_up         INTEGER NOT NULL DEFAULT 0,
    bytes_down       INTEGER NOT NULL DEFAULT 0,
    first_seen       REAL NOT NULL
) STRICT;

-- No foreign keys: a rejected message may name a run, round or device that does not exist.
CREATE TABLE rejections (
    id        INTEGER PRIMARY KEY,
    run_id    TEXT,
    round     INTEGER,
    device_id TEXT NOT NULL,
    reason    TEXT NOT NULL CHECK (length(reason) > 0),
    detail    TEXT NOT NULL DEFAULT '',
    at        REAL NOT NULL
) STRICT;

CREATE INDEX rejections_by_device ON rejections (device_id, reason);
CREATE INDEX rejections_by_run ON rejections (run_id, round);
"""


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _split_sql(_SCHEMA_V1):
        conn.execute(statement)


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT the migration's transaction; run statement by statement.
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# Version 2: chunks of updates split over sharded aggregator workers (fleet.runtime.aggregator),
# stored until one worker holds them all. ``chunk_sets`` holds each transfer's manifest, ``chunks``
# its pieces; both are keyed by (run, round, device, SHA-256 of the whole payload) and the first
# write of a key wins. No foreign keys: rows are purged independently of rounds.
_SCHEMA_V2 = """
CREATE TABLE chunk_sets (
    run_id      TEXT NOT NULL,
    round       INTEGER NOT NULL,
    device_id   TEXT NOT NULL CHECK (length(device_id) > 0),
    sha256      BLOB NOT NULL CHECK (length(sha256) = 32),
    total_bytes INTEGER NOT NULL CHECK (total_bytes > 0),
    chunk_count INTEGER NOT NULL CHECK (chunk_count > 0),
    chunk_bytes INTEGER NOT NULL CHECK (chunk_bytes > 0),
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, device_id, sha256)
) STRICT;

CREATE TABLE chunks (
    run_id      TEXT NOT NULL,
    round       INTEGER NOT NULL,
    device_id   TEXT NOT NULL CHECK (length(device_id) > 0),
    sha256      BLOB NOT NULL CHECK (length(sha256) = 32),
    idx         INTEGER NOT NULL CHECK (idx >= 0),
    data        BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, device_id, sha256, idx)
) STRICT;

CREATE INDEX chunks_by_device ON chunks (run_id, device_id);
CREATE INDEX chunks_by_time ON chunks (received_at);
CREATE INDEX chunk_sets_by_time ON chunk_sets (received_at);
"""


def _create_v2(conn: sqlite3.Connection) -> None:
    for statement in _split_sql(_SCHEMA_V2):
        conn.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _create_v1),
    Migration(2, "chunks of updates reassembled through the store", _create_v2),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


# --------------------------------------------------------------------------------------------
# Checkpoint encoding (pure functions)
# --------------------------------------------------------------------------------------------


def encode_checkpoint(
    weights: Mapping[str, npt.ArrayLike],
    masks: Mapping[str, npt.ArrayLike],
    extra_state: Mapping[str, npt.ArrayLike] | None = None,
) -> bytes:
    """Serialise a model to deterministic ``.npz`` bytes (``np.load`` reads them).

    Entries are ``weights/<name>``, ``masks/<name>``, ``extra/<name>`` in sorted order with a
    fixed timestamp, so equal inputs give equal bytes (and one stored file). Every mask must be
    boolean and name a weight of the same shape. Object arrays are refused (no pickles on disk).
    Raises ValueError naming the offending entry.
    """
    sections: dict[str, Mapping[str, npt.ArrayLike]] = {
        "weights": weights,
        "masks": masks,
        "extra": extra_state or {},
    }
    arrays: dict[str, npt.NDArray[Any]] = {}
    for section, entries in sections.items():
        for name, value in entries.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"checkpoint {section} key {name!r} must be a non-empty string")
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"checkpoint {section}[{name!r}] has object dtype; not storable")
            arrays[f"{section}/{name}"] = array
    for name in masks:
        mask_array = arrays[f"masks/{name}"]
        if mask_array.dtype != np.bool_:
            raise ValueError(f"checkpoint masks[{name!r}] has dtype {mask_array.dtype}, not bool")
        weight = arrays.get(f"weights/{name}")
        if weight is None:
            raise ValueError(f"checkpoint masks[{name!r}] has no weight of that name")
        if weight.shape != mask_array.shape:
            raise ValueError(
                f"checkpoint masks[{name!r}] has shape {mask_array.shape}, "
                f"weight has {weight.shape}"
            )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
        for key in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, arrays[key], allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            # Level 1: sparse weights are mostly zeros, so even fast deflate shrinks them a lot.
            zf.writestr(info, entry.getvalue(), zipfile.ZIP_DEFLATED, compresslevel=1)
    return out.getvalue()


def decode_checkpoint(
    data: bytes,
) -> tuple[
    dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[Any]]
]:
    """Inverse of ``encode_checkpoint``: (weights, masks, extra_state). DataError if malformed."""
    weights: dict[str, npt.NDArray[Any]] = {}
    masks: dict[str, npt.NDArray[np.bool_]] = {}
    extra: dict[str, npt.NDArray[Any]] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                section, _, name = key.partition("/")
                if section not in _CKPT_SECTIONS or not name:
                    raise DataError(f"checkpoint entry {key!r} is not weights/, masks/ or extra/")
                array = npz[key]
                if section == "weights":
                    weights[name] = array
                elif section == "masks":
                    masks[name] = array
                else:
                    extra[name] = array
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"checkpoint is not a readable .npz: {exc}") from exc
    return weights, masks, extra


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _finite_json(value: Any) -> Any:
    """JSON has no NaN/Inf: store non-finite floats as null rather than fail a round close."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _finite_json(value.item())
    return value


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(_finite_json(value), sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc


def _loads(text: str) -> Any:
    return json.loads(text)


def _check_digest(digest: str) -> None:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"digest {digest!r} is not a lowercase SHA-256 hex string")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_chunk_key(key: ChunkKey) -> None:
    _non_empty(key.device_id, "device id")
    if len(key.sha256) != 32:
        raise ValueError(f"a chunk set's sha256 has 32 bytes, got {len(key.sha256)}")


def _manifest_problem(total: int, count: int, size: int, max_bytes: int) -> str:
    """Why a chunk manifest is unacceptable, or "" (sizes in bytes)."""
    if count < 1 or size < 1:
        return f"chunk_count {count} and chunk_bytes {size} must be >= 1"
    if not (count - 1) * size < total <= count * size:
        return f"total_bytes {total} does not fit {count} chunks of {size} B"
    if total > max_bytes:
        return f"payload of {total} B exceeds the limit of {max_bytes} B"
    return ""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _non_empty(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class Store:
    """SQLite (WAL) plus content-addressed tensor files under ``root``.

    ``create=False`` refuses to create a new state directory (NotFoundError), for read-only
    callers such as ``fleet devices list``. ``clock`` gives Unix seconds (tests inject one).
    ``busy_timeout_s`` is how long a writer waits for another process's write transaction.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.tensors_dir = self.root / TENSORS_DIR
        if not create and not self.db_path.exists():
            raise NotFoundError(f"no fleet state at {self.db_path}")
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self.tensors_dir.mkdir(exist_ok=True)
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DataError(
                f"{self.db_path} cannot use WAL (journal_mode is {mode!r}); "
                "put the state directory on a local filesystem"
            )
        self._migrate(list(migrations))
        self._remove_stale_temp_files()

    # -- connections and transactions ------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise SparseFleetError(f"store {self.root} is closed")
        conn = sqlite3.connect(
            self.db_path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # only so close() can close every thread's connection
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        self._local.conn = conn
        self._local.synchronous = "FULL"
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable`` commits with synchronous=FULL (power-safe)."""
        conn = self._conn()
        level = "FULL" if durable else "NORMAL"
        if self._local.synchronous != level:
            conn.execute(f"PRAGMA synchronous = {level}")
            self._local.synchronous = level
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs (joins an enclosing transaction)."""
        conn = self._conn()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        return self._clock()

    # -- schema -----------------------------------------------------------------------------

    def _migrate(self, migrations: list[Migration]) -> None:
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(migrations) + 1)):
            raise ValueError(f"migrations must be numbered 1..n in order, got {versions}")
        known = versions[-1] if versions else 0
        # Read first: opening an up-to-date store must not wait for the runner's write lock.
        if self._check_version(self.schema_version(), known) == known:
            return
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " id INTEGER PRIMARY KEY CHECK (id = 1),"
                " version INTEGER NOT NULL, updated_at REAL NOT NULL) STRICT"
            )
            current = self._check_version(self.schema_version(), known)  # another process?
            for migration in migrations[current:]:
                migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_version (id, version, updated_at) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
                " updated_at = excluded.updated_at",
                (known, self._clock()),
            )

    def _check_version(self, current: int, known: int) -> int:
        if current > known:
            raise DataError(
                f"{self.db_path} has schema version {current}, newer than this sparsefleet "
                f"(knows up to {known}); upgrade sparsefleet"
            )
        return current

    def schema_version(self) -> int:
        """The schema version of fleet.db (0 for a database never migrated)."""
        conn = self._conn()
        exists = conn.execute(
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if exists is None:
            return 0
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        return int(row["version"]) if row else 0

    # -- tensor files -----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the file with this SHA-256 hex digest lives (whether or not it exists)."""
        _check_digest(digest)
        return self.tensors_dir / digest[:2] / digest

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` durably under its SHA-256 hex digest and return the digest.

        Temp file in the same directory, fsync, rename, fsync the directory: after return the
        file survives a power cut. Identical content is stored once (the second call only makes
        sure the existing file is durable).
        """
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        directory = path.parent
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            _fsync_dir(self.tensors_dir)
        if path.exists() and path.stat().st_size == len(data):
            # Its writer may have died between rename and directory fsync; make sure it is on
            # disk before a row names it.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(directory)
            return digest
        tmp = directory / f".{digest[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return digest

    def read_blob(self, digest: str) -> bytes:
        """The bytes stored under ``digest``; DataError if the file is missing or corrupt."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"tensor file {path} is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DataError(f"tensor file {path} is corrupt: its SHA-256 is {actual}")
        return data

    def _remove_stale_temp_files(self) -> None:
        # Temp files of writers that died mid-write; a live writer's temp file is left alone.
        for tmp in self.tensors_dir.glob("*/.*.tmp"):
            parts = tmp.name.split(".")
            try:
                pid = int(parts[2])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

    def check_integrity(self) -> list[str]:
        """Problems found (empty when healthy): SQLite's integrity and foreign-key checks, and
        every row's tensor file present with the right digest. Reads every file; can be slow."""
        problems: list[str] = []
        conn = self._conn()
        for row in conn.execute("PRAGMA integrity_check"):
            if row[0] != "ok":
                problems.append(f"sqlite: {row[0]}")
        for row in conn.execute("PRAGMA foreign_key_check"):
            problems.append(f"foreign key: table {row[0]} rowid {row[1]} -> {row[2]}")
        digests = conn.execute(
            "SELECT payload_digest FROM updates UNION SELECT digest FROM checkpoints"
        ).fetchall()
        for (digest,) in digests:
            try:
                self.read_blob(digest)
            except DataError as exc:
                problems.append(str(exc))
        return problems

    # -- runs -------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        *,
        config: Mapping[str, Any],
        strategy: str,
        model_name: str,
    ) -> RunRecord:
        """A new run in status ``created``; StoreConflictError if ``run_id`` exists."""
        _non_empty(run_id, "run id")
        now = self._clock()
        config_json = _dumps(config, f"config of run {run_id!r}")
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO runs (run_id, config, strategy, model_name, status,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, 'created', ?, ?)",
                    (run_id, config_json, strategy, model_name, now, now),
                )
            except sqlite3.IntegrityError:
                raise StoreConflictError(f"run {run_id!r} already exists") from None
            return self._get_run(conn, run_id)

    def get_run(self, run_id: str) -> RunRecord:
        """NotFoundError if there is no such run."""
        return self._get_run(self._conn(), run_id)

    def list_runs(self, *, status: RunStatus | str | None = None) -> list[RunRecord]:
        """Runs in creation order, optionally only those in ``status``."""
        conn = self._conn()
        if status is None:
            rows = conn.execute("SELECT * FROM runs ORDER BY created_at, run_id").fetchall()
        else:
            wanted = _parse_enum(RunStatus, status, "run status")
            rows = conn.execute(
                "SELECT * FROM runs WHERE status = ? ORDER BY created_at, run_id", (wanted,)
            ).fetchall()
        return [self._run_from_row(r) for r in rows]

    def set_run_status(self, run_id: str, status: RunStatus | str, *, error: str = "") -> RunRecord:
        """Move a run to ``status`` (``error`` says why it failed or stopped).

        ``finished`` is terminal and nothing returns to ``created``; StoreConflictError otherwise.
        """
        new = _parse_enum(RunStatus, status, "run status")
        with self._write() as conn:
            current = self._get_run(conn, run_id).status
            if new not in _RUN_TRANSITIONS[current]:
                raise StoreConflictError(f"run {run_id!r} cannot go from {current} to {new}")
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, updated_at = ? WHERE run_id = ?",
                (new.value, error, self._clock(), run_id),
            )
            return self._get_run(conn, run_id)

    def _get_run(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in {self.db_path}")
        return self._run_from_row(row)

    @staticmethod
    def _run_from_row(row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"],
            config=_loads(row["config"]),
            strategy=row["strategy"],
            model_name=row["model_name"],
            status=RunStatus(row["status"]),
            current_round=row["current_round"],
            error=row["error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    # -- rounds -----------------------------------------------------------------------------

    def open_round(
        self,
        run_id: str,
        round: int,
        *,
        selected: Sequence[str],
        deadline: float,
        model_version_in: int,
        plan: Mapping[str, Any] | None = None,
    ) -> RoundRecord:
        """Open ``round`` of a running run with the devices it selected.

        Requires: the run is ``running``, no other round of it is open, ``round`` is larger than
        every earlier round, and a checkpoint of ``model_version_in`` exists (so a restart can
        always reload the round's input model). Each selected device's ``rounds_joined`` grows
        by one in the same transaction. Raises NotFoundError/StoreConflictError/ValueError.
        """
        devices = list(selected)
        for device_id in devices:
            _non_empty(device_id, f"selected device id of round {round}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"round {round} of run {run_id!r} selects a device twice: {devices}")
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        now = self._clock()
        plan_json = _dumps(plan or {}, f"plan of round {round}")
        with self._write() as conn:
            run = self._get_run(conn, run_id)
            if run.status is not RunStatus.RUNNING:
                raise StoreConflictError(
                    f"run {run_id!r} is {run.status}, not running; cannot open round {round}"
                )
            open_row = conn.execute(
                "SELECT round FROM rounds WHERE run_id = ? AND status = 'open'", (run_id,)
            ).fetchone()
            if open_row is not None:
                raise StoreConflictError(
                    f"run {run_id!r} already has round {open_row['round']} open; close it first"
                )
            last = conn.execute(
                "SELECT max(round) AS r FROM rounds WHERE run_id = ?", (run_id,)
            ).fetchone()["r"]
            if last is not None and round <= last:
                raise StoreConflictError(
                    f"run {run_id!r} already had round {last}; round {round} must be larger"
                )
            self._require_checkpoint(conn, run_id, model_version_in)
            conn.execute(
                "INSERT INTO rounds (run_id, round, status, selected, deadline, plan,"
                " model_version_in, opened_at) VALUES (?, ?, 'open', ?, ?, ?, ?, ?)",
                (run_id, round, json.dumps(devices), deadline, plan_json, model_version_in, now),
            )
            conn.execute(
                "UPDATE runs SET current_round = ?, updated_at = ? WHERE run_id = ?",
                (round, now, run_id),
            )
            for device_id in devices:
                self._ensure_device(conn, device_id, now)
            conn.executemany(
                "UPDATE devices SET rounds_joined = rounds_joined + 1 WHERE device_id = ?",
                [(d,) for d in devices],
            )
            return self._get_round(conn, run_id, round)

    def close_round(
        self,
        run_id: str,
        round: int,
        *,
        model_version_out: int | None = None,
        counted: Iterable[tuple[int, str]] = (),
        dropped: Iterable[tuple[int, str]] = (),
        metrics: Mapping[str, Any] | None = None,
        reason: str = "quorum",
    ) -> RoundRecord:
        """Close an open round, atomically with the fate of the updates it decided.

        ``counted`` are the (round, device_id) keys aggregated into ``model_version_out`` (this
        round's accepted updates and earlier rounds' late ones); ``dropped`` those never to be
        aggregated. Each must be accepted or late, so none is counted twice. Every accepted
        update of this round must appear in one of the two: an acknowledged update is never
        silently lost. ``model_version_out`` None means the model did not change (no updates);
        its checkpoint must exist. ``reason`` says why it closed ("quorum", "deadline", ...).
        """
        now = self._clock()
        metrics_json = _dumps(metrics or {}, f"metrics of round {round}")
        with self._write() as conn:
            current = self._get_round(conn, run_id, round)
            if current.status is RoundStatus.CLOSED:
                raise StoreConflictError(f"round {round} of run {run_id!r} is already closed")
            version = current.model_version_in if model_version_out is None else model_version_out
            digest = self._require_checkpoint(conn, run_id, version)
            for status, keys in ((UpdateStatus.COUNTED, counted), (UpdateStatus.DROPPED, dropped)):
                for key_round, device_id in keys:
                    cur = conn.execute(
                        "UPDATE updates SET status = ?, counted_in_round = ?, decided_at = ?"
                        " WHERE run_id = ? AND round = ? AND device_id = ?"
                        " AND status IN ('accepted', 'late')",
                        (
                            status.value,
                            round if status is UpdateStatus.COUNTED else None,
                            now,
                            run_id,
                            key_round,
                            device_id,
                        ),
                    )
                    if cur.rowcount != 1:
                        raise StoreConflictError(
                            self._undecidable(conn, run_id, key_round, device_id, status, round)
                        )
            left = [
                r["device_id"]
                for r in conn.execute(
                    "SELECT device_id FROM updates WHERE run_id = ? AND round = ?"
                    " AND status = 'accepted' ORDER BY device_id",
                    (run_id, round),
                )
            ]
            if left:
                raise StoreConflictError(
                    f"closing round {round} of run {run_id!r} would leave accepted updates of "
                    f"{left} neither counted nor dropped"
                )
            merged = {**current.metrics, **_loads(metrics_json)}
            conn.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, model_version_out = ?,"
                " checkpoint_digest = ?, metrics = ?, close_reason = ?"
                " WHERE run_id = ? AND round = ?",
                (now, version, digest, _dumps(merged, "metrics"), reason, run_id, round),
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))
            return self._get_round(conn, run_id, round)

    @staticmethod
    def _undecidable(
        conn: sqlite3.Connection,
        run_id: str,
        key_round: int,
        device_id: str,
        wanted: UpdateStatus,
        closing: int,
    ) -> str:
        row = conn.execute(
            "SELECT status, counted_in_round FROM updates"
            " WHERE run_id = ? AND round = ? AND device_id = ?",
            (run_id, key_round, device_id),
        ).fetchone()
        what = f"update of device {device_id!r} for round {key_round} of run {run_id!r}"
        if row is None:
            return f"cannot mark {what} {wanted} when closing round {closing}: it was never stored"
        if row["status"] == UpdateStatus.COUNTED:
            return (
                f"cannot mark {what} {wanted} when closing round {closing}: already counted "
                f"in round {row['counted_in_round']}"
            )
        return f"cannot mark {what} {wanted} when closing round {closing}: it is {row['status']}"

    def set_round_metrics(self, run_id: str, round: int, metrics: Mapping[str, Any]) -> RoundRecord:
        """Merge ``metrics`` into the round's (e.g. an evaluation finished after it closed)."""
        with self._write() as conn:
            current = self._get_round(conn, run_id, round)
            merged = {**current.metrics, **_finite_json(dict(metrics))}
            conn.execute(
                "UPDATE rounds SET metrics = ? WHERE run_id = ? AND round = ?",
                (_dumps(merged, f"metrics of round {round}"), run_id, round),
            )
            return self._get_round(conn, run_id, round)

    def get_round(self, run_id: str, round: int) -> RoundRecord:
        """NotFoundError if the run has no such round."""
        return self._get_round(self._conn(), run_id, round)

    def find_open_round(self, run_id: str) -> RoundRecord | None:
        """The run's open round (at most one exists), or None: where a restart resumes."""
        row = (
            self._conn()
            .execute("SELECT * FROM rounds WHERE run_id = ? AND status = 'open'", (run_id,))
            .fetchone()
        )
        return None if row is None else self._round_from_row(row)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """Every round of the run in round order."""
        rows = (
            self._conn()
            .execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
            .fetchall()
        )
        return [self._round_from_row(r) for r in rows]

    def _get_round(self, conn: sqlite3.Connection, run_id: str, round: int) -> RoundRecord:
        row = conn.execute(
            "SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run_id, round)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"run {run_id!r} has no round {round}")
        return self._round_from_row(row)

    @staticmethod
    def _round_from_row(row: sqlite3.Row) -> RoundRecord:
        return RoundRecord(
            run_id=row["run_id"],
            round=row["round"],
            status=RoundStatus(row["status"]),
            selected=tuple(_loads(row["selected"])),
            deadline=row["deadline"],
            plan=_loads(row["plan"]),
            model_version_in=row["model_version_in"],
            model_version_out=row["model_version_out"],
            checkpoint_digest=row["checkpoint_digest"],
            close_reason=row["close_reason"],
            metrics=_loads(row["metrics"]),
            bytes_up=row["bytes_up"],
            bytes_down=row["bytes_down"],
            opened_at=row["opened_at"],
            closed_at=row["closed_at"],
        )

    # -- chunks of updates (sharded aggregation) -------------------------------------------

    def store_chunk_manifest(
        self,
        key: ChunkKey,
        total_bytes: int,
        chunk_count: int,
        chunk_bytes: int,
        *,
        max_payload_bytes: int,
    ) -> ChunkOutcome:
        """Store a transfer's manifest durably (one transaction; then the caller may ack it).

        A manifest that contradicts itself, exceeds ``max_payload_bytes``, differs from one
        stored earlier, or does not fit the chunks already stored gives up the transfer (its
        rows are deleted) with the reason in ``problem``. Completes the transfer when every
        chunk is already there.
        """
        _check_chunk_key(key)
        problem = _manifest_problem(total_bytes, chunk_count, chunk_bytes, max_payload_bytes)
        if problem:
            self.delete_chunk_set(key)
            return ChunkOutcome(False, problem=problem)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO chunk_sets (run_id, round, device_id, sha256, total_bytes,"
                " chunk_count, chunk_bytes, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (key.run_id, key.round, key.device_id, key.sha256, total_bytes, chunk_count,
                 chunk_bytes, self._clock()),
            )  # fmt: skip
            new = cur.rowcount == 1
            if not new:
                row = self._chunk_manifest(conn, key)
                if row is not None and row != (total_bytes, chunk_count, chunk_bytes):
                    self._delete_chunk_set(conn, key)
                    return ChunkOutcome(False, problem="two different manifests for one payload")
            return self._settle(conn, key, new)

    def store_chunk(
        self, key: ChunkKey, index: int, data: bytes, *, max_device_bytes: int
    ) -> ChunkOutcome:
        """Store chunk ``index`` of a transfer durably (one transaction; then the caller may
        ack it). The first write of an index wins; a different second copy gives the transfer
        up, as does a chunk that does not fit the manifest or that takes the device's stored
        chunk bytes in this run over ``max_device_bytes``. Completes the transfer when this was
        the last missing piece."""
        _check_chunk_key(key)
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO chunks (run_id, round, device_id, sha256, idx, data, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (key.run_id, key.round, key.device_id, key.sha256, index, data, self._clock()),
            )
            new = cur.rowcount == 1
            if not new:
                held = conn.execute(
                    "SELECT data FROM chunks WHERE run_id = ? AND round = ? AND device_id = ?"
                    " AND sha256 = ? AND idx = ?",
                    (key.run_id, key.round, key.device_id, key.sha256, index),
                ).fetchone()
                if held is not None and bytes(held["data"]) != data:
                    self._delete_chunk_set(conn, key)
                    return ChunkOutcome(
                        False, problem=f"chunk {index} arrived twice with different data"
                    )
            held_bytes = int(
                conn.execute(
                    "SELECT coalesce(sum(length(data)), 0) FROM chunks"
                    " WHERE run_id = ? AND device_id = ?",
                    (key.run_id, key.device_id),
                ).fetchone()[0]
            )
            if held_bytes > max_device_bytes:
                self._delete_chunk_set(conn, key)
                return ChunkOutcome(
                    new,
                    problem=f"device {key.device_id!r} would hold {held_bytes} B of chunks in run "
                    f"{key.run_id!r}, over the limit of {max_device_bytes} B",
                )
            return self._settle(conn, key, new)

    def delete_chunk_set(self, key: ChunkKey) -> int:
        """Delete a transfer's manifest and chunks; returns the rows deleted."""
        with self._write(durable=False) as conn:
            return self._delete_chunk_set(conn, key)

    def purge_chunks(
        self, run_id: str, *, rounds_up_to: int | None = None, received_before: float | None = None
    ) -> int:
        """Delete the chunk rows of ``run_id`` for rounds <= ``rounds_up_to`` (closed rounds)
        and those received before ``received_before`` (abandoned transfers); returns the rows
        deleted."""
        where, args = ["run_id = ?"], [run_id]
        if rounds_up_to is None and received_before is None:
            raise ValueError("purge_chunks needs rounds_up_to or received_before")
        terms = []
        if rounds_up_to is not None:
            terms.append("round <= ?")
            args.append(rounds_up_to)  # type: ignore[arg-type]
        if received_before is not None:
            terms.append("received_at < ?")
            args.append(received_before)  # type: ignore[arg-type]
        where.append("(" + " OR ".join(terms) + ")")
        sql = " AND ".join(where)
        with self._write(durable=False) as conn:
            n = conn.execute(f"DELETE FROM chunks WHERE {sql}", args).rowcount
            n += conn.execute(f"DELETE FROM chunk_sets WHERE {sql}", args).rowcount
        return int(n)

    def chunk_bytes_held(self, run_id: str, device_id: str | None = None) -> int:
        """Bytes of chunk data stored for ``run_id`` (one device's, or everyone's)."""
        sql = "SELECT coalesce(sum(length(data)), 0) FROM chunks WHERE run_id = ?"
        args: list[str] = [run_id]
        if device_id is not None:
            sql += " AND device_id = ?"
            args.append(device_id)
        with self._read() as conn:
            return int(conn.execute(sql, args).fetchone()[0])

    @staticmethod
    def _chunk_manifest(conn: sqlite3.Connection, key: ChunkKey) -> tuple[int, int, int] | None:
        row = conn.execute(
            "SELECT total_bytes, chunk_count, chunk_bytes FROM chunk_sets WHERE run_id = ?"
            " AND round = ? AND device_id = ? AND sha256 = ?",
            (key.run_id, key.round, key.device_id, key.sha256),
        ).fetchone()
        if row is None:
            return None
        return int(row["total_bytes"]), int(row["chunk_count"]), int(row["chunk_bytes"])

    @staticmethod
    def _delete_chunk_set(conn: sqlite3.Connection, key: ChunkKey) -> int:
        args = (key.run_id, key.round, key.device_id, key.sha256)
        where = "run_id = ? AND round = ? AND device_id = ? AND sha256 = ?"
        n = conn.execute(f"DELETE FROM chunks WHERE {where}", args).rowcount
        return int(n + conn.execute(f"DELETE FROM chunk_sets WHERE {where}", args).rowcount)

    def _settle(self, conn: sqlite3.Connection, key: ChunkKey, new: bool) -> ChunkOutcome:
        """Inside a write transaction: check the transfer's stored chunks against its manifest
        and reassemble it when complete."""
        manifest = self._chunk_manifest(conn, key)
        if manifest is None:
            return ChunkOutcome(new)
        total, count, size = manifest
        args = (key.run_id, key.round, key.device_id, key.sha256)
        where = "run_id = ? AND round = ? AND device_id = ? AND sha256 = ?"
        for row in conn.execute(
            f"SELECT idx, length(data) AS n FROM chunks WHERE {where}"
            " AND (idx >= ? OR length(data) != CASE WHEN idx = ? THEN ? ELSE ? END)",
            (*args, count, count - 1, total - (count - 1) * size, size),
        ):
            self._delete_chunk_set(conn, key)
            idx, n = int(row["idx"]), int(row["n"])
            why = (
                f"chunk index {idx} beyond chunk_count {count}"
                if idx >= count
                else f"chunk {idx} has {n} B, the manifest says otherwise"
            )
            return ChunkOutcome(new, problem=why)
        have = int(conn.execute(f"SELECT count(*) FROM chunks WHERE {where}", args).fetchone()[0])
        if have < count:
            return ChunkOutcome(new)
        digest = hashlib.sha256()
        parts = []
        for row in conn.execute(f"SELECT data FROM chunks WHERE {where} ORDER BY idx", args):
            part = bytes(row["data"])
            digest.update(part)
            parts.append(part)
        payload = b"".join(parts)
        if len(payload) != total or digest.digest() != key.sha256:
            self._delete_chunk_set(conn, key)
            return ChunkOutcome(new, problem="SHA-256 of the reassembled payload does not match")
        return ChunkOutcome(new, payload=payload)

    # -- updates ----------------------------------------------------------------------------

    def record_update(
        self,
        run_id: str,
        round: int,
        device_id: str,
        payload: bytes,
        num_examples: int,
        meta: Mapping[str, Any] | None = None,
        *,
        status: UpdateStatus | str = UpdateStatus.ACCEPTED,
        received_at: float | None = None,
        bytes_up: int | None = None,
    ) -> bool:
        """Store a validated update durably; True if new, False for a duplicate.

        The payload file is written and fsynced *before* the row commits (synchronous=FULL), so
        once this returns the caller may acknowledge the message. A duplicate key (run, round,
        device) returns False and changes nothing, even when the bytes differ: the first write
        wins. ``status`` is ``accepted`` (round open), ``late`` (round closed; decided by the
        late policy at a later close) or ``dropped``. ``bytes_up`` (default ``len(payload)``) is
        added to the round's and the device's uplink counters in the same transaction; pass 0
        when the caller counts traffic with ``add_traffic``. The device's ``updates_accepted``
        grows by one and its ``last_seen`` moves to ``received_at``.

        Raises NotFoundError when the round was never opened, StoreConflictError for an
        ``accepted`` update into a closed round.
        """
        kind = _parse_enum(UpdateStatus, status, "update status")
        if kind is UpdateStatus.COUNTED:
            raise ValueError("an update becomes 'counted' only through close_round")
        _non_empty(device_id, "device id")
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples} from {device_id!r}")
        traffic = len(payload) if bytes_up is None else bytes_up
        if traffic < 0:
            raise ValueError(f"bytes_up must be >= 0, got {traffic}")
        meta_json = _dumps(meta or {}, f"meta of the update from {device_id!r}")
        if self.get_update(run_id, round, device_id) is not None:
            return False  # redelivery: do not even touch the file
        digest = self.write_blob(payload)  # files first, then rows
        at = self._clock() if received_at is None else received_at
        with self._write() as conn:
            round_row = conn.execute(
                "SELECT status FROM rounds WHERE run_id = ? AND round = ?", (run_id, round)
            ).fetchone()
            if round_row is None:
                raise NotFoundError(f"run {run_id!r} has no round {round}; open it first")
            if kind is UpdateStatus.ACCEPTED and round_row["status"] == RoundStatus.CLOSED:
                raise StoreConflictError(
                    f"round {round} of run {run_id!r} is closed; record the update from "
                    f"{device_id!r} as late"
                )
            cur = conn.execute(
                "INSERT INTO updates (run_id, round, device_id, payload_digest, payload_bytes,"
                " num_examples, status, meta, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (run_id, round, device_id, digest, len(payload), num_examples, kind.value,
                 meta_json, at),
            )  # fmt: skip
            if cur.rowcount == 0:
                return False  # another writer stored it between our check and now
            self._ensure_device(conn, device_id, at)
            conn.execute(
                "UPDATE devices SET updates_accepted = updates_accepted + 1,"
                " bytes_up = bytes_up + ?, last_seen = max(coalesce(last_seen, ?), ?)"
                " WHERE device_id = ?",
                (traffic, at, at, device_id),
            )
            conn.execute(
                "UPDATE rounds SET bytes_up = bytes_up + ? WHERE run_id = ? AND round = ?",
                (traffic, run_id, round),
            )
        return True

    def get_update(self, run_id: str, round: int, device_id: str) -> UpdateRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT * FROM updates WHERE run_id = ? AND round = ? AND device_id = ?",
                (run_id, round, device_id),
            )
            .fetchone()
        )
        return None if row is None else self._update_from_row(row)

    def updates_for_round(
        self,
        run_id: str,
        round: int,
        *,
        statuses: Iterable[UpdateStatus | str] | None = None,
    ) -> list[UpdateRecord]:
        """The round's updates ordered by device id, so aggregation order (and therefore the
        float result) does not depend on arrival order; optionally only those in ``statuses``."""
        sql = "SELECT * FROM updates WHERE run_id = ? AND round = ?"
        params: list[Any] = [run_id, round]
        if statuses is not None:
            wanted = [_parse_enum(UpdateStatus, s, "update status").value for s in statuses]
            sql += f" AND status IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        rows = self._conn().execute(sql + " ORDER BY device_id", params).fetchall()
        return [self._update_from_row(r) for r in rows]

    def undecided_updates(self, run_id: str) -> list[UpdateRecord]:
        """Updates still waiting for a round to count or drop them (accepted, or late and not
        yet decided), ordered by (round, device id). After a restart these are exactly the
        acknowledged updates that the model does not contain yet."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM updates WHERE run_id = ? AND status IN ('accepted', 'late')"
                " ORDER BY round, device_id",
                (run_id,),
            )
            .fetchall()
        )
        return [self._update_from_row(r) for r in rows]

    def _update_from_row(self, row: sqlite3.Row) -> UpdateRecord:
        return UpdateRecord(
            run_id=row["run_id"],
            round=row["round"],
            device_id=row["device_id"],
            payload_digest=row["payload_digest"],
            payload_bytes=row["payload_bytes"],
            num_examples=row["num_examples"],
            status=UpdateStatus(row["status"]),
            counted_in_round=row["counted_in_round"],
            meta=_loads(row["meta"]),
            received_at=row["received_at"],
            _store=self,
        )

    # -- rejections and traffic -------------------------------------------------------------

    def record_rejection(
        self,
        run_id: str | None,
        round: int | None,
        device_id: str,
        reason: str,
        detail: str = "",
        *,
        at: float | None = None,
    ) -> int:
        """Log a rejected message and return its id; counts per device and reason.

        ``run_id``/``round`` may name things that do not exist (that can be why it was
        rejected). At-least-once: a redelivered bad message is counted again.
        """
        _non_empty(device_id, "device id")
        _non_empty(reason, "rejection reason")
        when = self._clock() if at is None else at
        with self._write(durable=False) as conn:
            cur = conn.execute(
                "INSERT INTO rejections (run_id, round, device_id, reason, detail, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, round, device_id, reason, detail, when),
            )
            return int(cur.lastrowid or 0)

    def rejections(
        self,
        *,
        run_id: str | None = None,
        device_id: str | None = None,
        limit: int | None = None,
    ) -> list[RejectionRecord]:
        """Rejections, newest first, optionally filtered by run and/or device."""
        sql = "SELECT * FROM rejections WHERE 1 = 1"
        params: list[Any] = []
        if run_id is not None:
            sql += " AND run_id = ?"
            params.append(run_id)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [
            RejectionRecord(
                id=r["id"],
                run_id=r["run_id"],
                round=r["round"],
                device_id=r["device_id"],
                reason=r["reason"],
                detail=r["detail"],
                at=r["at"],
            )
            for r in self._conn().execute(sql, params)
        ]

    def rejection_counts(
        self, *, run_id: str | None = None, device_id: str | None = None
    ) -> dict[str, int]:
        """Number of rejections by reason, optionally for one run and/or device."""
        sql = "SELECT reason, count(*) AS n FROM rejections WHERE 1 = 1"
        params: list[Any] = []
        if run_id is not None:
            sql += " AND run_id = ?"
            params.append(run_id)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        rows = self._conn().execute(sql + " GROUP BY reason ORDER BY reason", params)
        return {r["reason"]: r["n"] for r in rows}

    def add_traffic(
        self,
        run_id: str | None,
        round: int | None,
        device_id: str | None,
        *,
        up: int = 0,
        down: int = 0,
    ) -> None:
        """Add bytes to a round's and/or a device's counters (``up``: device to fleet).

        Either target may be None (a model published once for all devices has no device; a
        profile command has no run). Use for traffic that ``record_update`` does not count.
        """
        if up < 0 or down < 0:
            raise ValueError(f"traffic must be >= 0 bytes, got up={up} down={down}")
        with self._write(durable=False) as conn:
            if run_id is not None and round is not None:
                cur = conn.execute(
                    "UPDATE rounds SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?"
                    " WHERE run_id = ? AND round = ?",
                    (up, down, run_id, round),
                )
                if cur.rowcount != 1:
                    raise NotFoundError(f"run {run_id!r} has no round {round}")
            if device_id is not None:
                self._ensure_device(conn, device_id, self._clock())
                conn.execute(
                    "UPDATE devices SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?"
                    " WHERE device_id = ?",
                    (up, down, device_id),
                )

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(
        self,
        run_id: str,
        version: int,
        weights: Mapping[str, npt.ArrayLike],
        masks: Mapping[str, npt.ArrayLike],
        extra_state: Mapping[str, npt.ArrayLike] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        round: int | None = None,
    ) -> str:
        """Store model version ``version`` of a run; returns the file's SHA-256 hex digest.

        The file (deterministic .npz, see ``encode_checkpoint``) is durable before the row
        commits. Saving the same version again with the same content is a no-op; with different
        content it replaces the row only while no round has used that version (a runner that
        died between aggregating and closing the round re-aggregates); otherwise
        StoreConflictError, because a version that devices or a closed round saw is immutable.
        """
        if version < 0:
            raise ValueError(f"checkpoint version must be >= 0, got {version}")
        data = encode_checkpoint(weights, masks, extra_state)
        meta_json = _dumps(meta or {}, f"meta of checkpoint {version}")
        digest = self.write_blob(data)
        now = self._clock()
        with self._write() as conn:
            self._get_run(conn, run_id)
            row = conn.execute(
                "SELECT digest FROM checkpoints WHERE run_id = ? AND version = ?",
                (run_id, version),
            ).fetchone()
            if row is not None and row["digest"] == digest:
                return digest
            if row is not None:
                used = conn.execute(
                    "SELECT round FROM rounds WHERE run_id = ? AND (model_version_in = ?"
                    " OR (status = 'closed' AND model_version_out = ?)) LIMIT 1",
                    (run_id, version, version),
                ).fetchone()
                if used is not None:
                    raise StoreConflictError(
                        f"checkpoint version {version} of run {run_id!r} is used by round "
                        f"{used['round']} and cannot change"
                    )
            conn.execute(
                "INSERT INTO checkpoints (run_id, version, round, digest, size_bytes, meta,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, version) DO UPDATE SET round = excluded.round,"
                " digest = excluded.digest, size_bytes = excluded.size_bytes,"
                " meta = excluded.meta, created_at = excluded.created_at",
                (run_id, version, round, digest, len(data), meta_json, now),
            )
        return digest

    def load_checkpoint(self, run_id: str, version: int | None = None) -> Checkpoint:
        """Load a checkpoint (``version`` None: the highest saved). The file is verified against
        its digest (DataError); NotFoundError if there is none."""
        record = self.checkpoint_record(run_id, version)
        weights, masks, extra = decode_checkpoint(self.read_blob(record.digest))
        return Checkpoint(record=record, weights=weights, masks=masks, extra_state=extra)

    def checkpoint_record(self, run_id: str, version: int | None = None) -> CheckpointRecord:
        conn = self._conn()
        if version is None:
            row = conn.execute(
                "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY version DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT * FROM checkpoints WHERE run_id = ? AND version = ?", (run_id, version)
            ).fetchone()
        if row is None:
            which = "checkpoint" if version is None else f"checkpoint version {version}"
            raise NotFoundError(f"run {run_id!r} has no {which}")
        return self._checkpoint_from_row(row)

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        rows = (
            self._conn()
            .execute("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY version", (run_id,))
            .fetchall()
        )
        return [self._checkpoint_from_row(r) for r in rows]

    def _require_checkpoint(self, conn: sqlite3.Connection, run_id: str, version: int) -> str:
        row = conn.execute(
            "SELECT digest FROM checkpoints WHERE run_id = ? AND version = ?", (run_id, version)
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"run {run_id!r} has no checkpoint of model version {version}; save it first"
            )
        return str(row["digest"])

    @staticmethod
    def _checkpoint_from_row(row: sqlite3.Row) -> CheckpointRecord:
        return CheckpointRecord(
            run_id=row["run_id"],
            version=row["version"],
            round=row["round"],
            digest=row["digest"],
            size_bytes=row["size_bytes"],
            meta=_loads(row["meta"]),
            created_at=row["created_at"],
        )

    # -- devices ----------------------------------------------------------------------------

    @staticmethod
    def _ensure_device(conn: sqlite3.Connection, device_id: str, now: float) -> None:
        conn.execute(
            "INSERT INTO devices (device_id, first_seen) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (device_id, now),
        )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._read() as conn:
            return self._get_device(conn, device_id)

    def list_devices(self) -> list[DeviceRecord]:
        """Every known device, ordered by id."""
        with self._read() as conn:
            counts: dict[str, dict[str, int]] = {}
            for r in conn.execute(
                "SELECT device_id, reason, count(*) AS n FROM rejections GROUP BY device_id, reason"
            ):
                counts.setdefault(r["device_id"], {})[r["reason"]] = r["n"]
            rows = conn.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
            return [self._device_from_row(r, counts.get(r["device_id"], {})) for r in rows]

    def _get_device(self, conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
        row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return None
        counts = {
            r["reason"]: r["n"]
            for r in conn.execute(
                "SELECT reason, count(*) AS n FROM rejections WHERE device_id = ? GROUP BY reason",
                (device_id,),
            )
        }
        return self._device_from_row(row, counts)

    def _require_device(self, conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
        record = self._get_device(conn, device_id)
        if record is None:
            raise NotFoundError(f"no device {device_id!r} in {self.db_path}")
        return record

    @staticmethod
    def _device_from_row(row: sqlite3.Row, rejections: Mapping[str, int]) -> DeviceRecord:
        return DeviceRecord(
            device_id=row["device_id"],
            online=bool(row["online"]),
            session_epoch=row["session_epoch"],
            last_seen=row["last_seen"],
            agent_version=row["agent_version"],
            status=_loads(row["status"]),
            cordoned=bool(row["cordoned"]),
            drained=bool(row["drained"]),
            tags=_loads(row["tags"]),
            rounds_joined=row["rounds_joined"],
            updates_accepted=row["updates_accepted"],
            failures=row["failures"],
            last_failure=row["last_failure"],
            bytes_up=row["bytes_up"],
            bytes_down=row["bytes_down"],
            rejections=dict(rejections),
            first_seen=row["first_seen"],
        )

    def update_device_status(
        self,
        device_id: str,
        *,
        online: bool,
        session_epoch: int,
        agent_version: str,
        status: Mapping[str, Any],
        seen_at: float | None = None,
        accept: Callable[[DeviceRecord | None], bool] | None = None,
    ) -> bool:
        """Apply a birth/will to a device row, creating it if new; True if applied.

        ``accept`` sees the current record inside the write transaction, so a decision such as
        the registry's session-epoch ordering cannot race with another writer. Operator state
        (cordoned, drained, tags) and counters are never touched here.
        """
        _non_empty(device_id, "device id")
        now = self._clock() if seen_at is None else seen_at
        status_json = _dumps(status, f"status of device {device_id!r}")
        with self._write(durable=False) as conn:
            current = self._get_device(conn, device_id)
            if accept is not None and not accept(current):
                return False
            self._ensure_device(conn, device_id, now)
            conn.execute(
                "UPDATE devices SET online = ?, session_epoch = ?, agent_version = ?,"
                " status = ?, last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (int(online), session_epoch, agent_version, status_json, now, now, device_id),
            )
            return True

    def touch_device(self, device_id: str, seen_at: float | None = None) -> bool:
        """Move a known device's ``last_seen`` forward (never back); False if unknown."""
        now = self._clock() if seen_at is None else seen_at
        with self._write(durable=False) as conn:
            cur = conn.execute(
                "UPDATE devices SET last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (now, now, device_id),
            )
            return cur.rowcount == 1

    def set_device_flags(
        self,
        device_id: str,
        *,
        cordoned: bool | None = None,
        drained: bool | None = None,
    ) -> DeviceRecord:
        """Set the operator's cordon/drain flags (None leaves one as is); NotFoundError if the
        device is unknown (a typo must not silently create a device)."""
        with self._write() as conn:
            self._require_device(conn, device_id)
            if cordoned is not None:
                conn.execute(
                    "UPDATE devices SET cordoned = ? WHERE device_id = ?",
                    (int(cordoned), device_id),
                )
            if drained is not None:
                conn.execute(
                    "UPDATE devices SET drained = ? WHERE device_id = ?", (int(drained), device_id)
                )
            return self._require_device(conn, device_id)

    def update_device_tags(
        self,
        device_id: str,
        *,
        set_tags: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
    ) -> DeviceRecord:
        """Change the operator's tags of a known device (``remove`` first, then ``set_tags``)."""
        with self._write() as conn:
            record = self._require_device(conn, device_id)
            tags = dict(record.tags)
            for key in remove:
                tags.pop(key, None)
            for key, value in (set_tags or {}).items():
                tags[_non_empty(key, "tag key")] = str(value)
            conn.execute(
                "UPDATE devices SET tags = ? WHERE device_id = ?",
                (_dumps(tags, f"tags of {device_id!r}"), device_id),
            )
            return self._require_device(conn, device_id)

    def record_device_failure(
        self, device_id: str, reason: str, *, at: float | None = None
    ) -> None:
        """Count a failed job the device reported and keep its reason as ``last_failure``."""
        _non_empty(device_id, "device id")
        now = self._clock() if at is None else at
        with self._write(durable=False) as conn:
            self._ensure_device(conn, device_id, now)
            conn.execute(
                "UPDATE devices SET failures = failures + 1, last_failure = ?,"
                " last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (reason, now, now, device_id),
            )

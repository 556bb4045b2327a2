"""Durable state of the fleet manager: SQLite (WAL) for records, content-addressed tensor files.

Layout under ``root`` (see ``docs/state.md`` for the schema and the resume procedure)::

    fleet.db              SQLite database in WAL mode (fleet.db-wal and fleet.db-shm beside it)
    tensors/ab/abcd...    immutable files named by the SHA-256 hex digest of their bytes

``Store`` is the one object callers hold: it owns the database connections and the tensor
directory and composes one repository per record kind, each in its own module with its own
invariants: ``runs``, ``rounds`` (open/close, counted at most once), ``updates`` (idempotent,
files first; byte counters), ``rejections``, ``devices``, ``chunks`` (sharded transfers),
``checkpoints`` (encode/decode, save/load), over ``db`` (transactions), ``tensors`` (files) and
``schema`` (the one migration path). What holds across all of them, whatever moment the process
dies at:

- **Files first, then rows.** A tensor file is written to a temporary name, fsynced, renamed to its
  digest and its directory fsynced *before* the transaction that inserts a row naming it commits.
  A file without a row is harmless garbage; a row never names a missing file.
- **One transaction per operation.** Every public write is a single ``BEGIN IMMEDIATE`` ...
  ``COMMIT``; counters (device bytes, updates accepted, rounds joined) move in the same
  transaction as the fact they count, so they are exact after a crash.
- **Write, then acknowledge.** Writes that precede an MQTT acknowledgement (updates, rounds,
  checkpoints, runs, operator flags, chunks) commit with ``synchronous=FULL``: when the call
  returns, the row survives a power cut. Device presence (births, wills, last seen), traffic and
  rejection logs commit with ``synchronous=NORMAL``, which in WAL mode survives a process crash
  and becomes power-safe at the next FULL commit.
- **Idempotence.** Updates are keyed by (run, round, device): the first write wins and a
  redelivery changes nothing. A tensor written twice is stored once.
- **Counted at most once.** ``close_round`` moves updates from accepted/late to counted or
  dropped in the same transaction that closes the round, and refuses to count one twice.

Thread-safety: each thread gets its own connection; SQLite serialises writers (busy timeout) and
WAL lets readers in other processes (the ``fleet`` CLI) read while the runner writes.
Times are Unix seconds (``time.time()``); sizes are bytes.

Every record type, ``StoreConflictError``, the schema names and the checkpoint codec are
re-exported here, so ``from fleet.state.store import X`` is the one import callers need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from device.errors import NotFoundError
from fleet.state.checkpoints import CheckpointRepository, decode_checkpoint, encode_checkpoint
from fleet.state.chunks import ChunkRepository
from fleet.state.db import Database
from fleet.state.deployments import DeploymentRepository
from fleet.state.devices import DeviceRepository
from fleet.state.records import (
    Checkpoint,
    CheckpointRecord,
    ChunkKey,
    ChunkOutcome,
    DeviceRecord,
    RejectionRecord,
    RoundRecord,
    RoundStatus,
    RunRecord,
    RunStatus,
    StoreConflictError,
    UpdateRecord,
    UpdateStatus,
)
from fleet.state.rejections import RejectionRepository
from fleet.state.rounds import RoundRepository
from fleet.state.runs import RunRepository
from fleet.state.schema import MIGRATIONS, SCHEMA_VERSION, Migration, migrate, schema_version
from fleet.state.tensors import TensorFiles, check_integrity
from fleet.state.updates import UpdateRepository

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


class Store:
    """SQLite (WAL) plus content-addressed tensor files under ``root``.

    ``create=False`` refuses to create a new state directory (NotFoundError), for read-only
    callers such as ``fleet devices list``. ``clock`` gives Unix seconds (tests inject one).
    ``busy_timeout_s`` is how long a writer waits for another process's write transaction.

    Every method delegates to the repository of its record kind; the repository's docstring
    is the full contract (the one-line summaries here say what it does).
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
        self.root.mkdir(parents=True, exist_ok=True)
        self._files = TensorFiles(self.tensors_dir)
        self._db = Database(self.db_path, busy_timeout_s=busy_timeout_s)
        migrate(self._db, list(migrations), clock)
        self._files.remove_stale_temp_files()
        self._runs = RunRepository(self._db, clock)
        self._rounds = RoundRepository(self._db, self._runs, clock)
        self._devices = DeviceRepository(self._db, clock)
        self._updates = UpdateRepository(self._db, self._files, clock)
        self._rejections = RejectionRepository(self._db, clock)
        self._chunks = ChunkRepository(self._db, clock)
        self._checkpoints = CheckpointRepository(self._db, self._files, self._runs, clock)
        #: Model deployments (``fleet.state.deployments``): used directly, its docstrings are
        #: the contract; artefact bytes are tensor files (``write_blob``/``read_blob``).
        self.deployments = DeploymentRepository(self._db, clock)

    # -- life cycle and schema ----------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        return self._clock()

    def schema_version(self) -> int:
        """The schema version of fleet.db (0 for a database never migrated)."""
        return schema_version(self._db.conn())

    # -- tensor files (fleet.state.tensors) ---------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the file with this SHA-256 hex digest lives (whether or not it exists)."""
        return self._files.path(digest)

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` durably under its SHA-256 hex digest and return the digest."""
        return self._files.write(data)

    def read_blob(self, digest: str) -> bytes:
        """The bytes stored under ``digest``; DataError if the file is missing or corrupt."""
        return self._files.read(digest)

    def check_integrity(self) -> list[str]:
        """Problems found (empty when healthy): SQLite's integrity and foreign-key checks, and
        every row's tensor file present with the right digest. Reads every file; can be slow."""
        return check_integrity(self._db.conn(), self._files)

    # -- runs and rounds (fleet.state.runs, fleet.state.rounds) -------------------------------

    def create_run(
        self, run_id: str, *, config: Mapping[str, Any], strategy: str, model_name: str
    ) -> RunRecord:
        """A new run in status ``created``; StoreConflictError if ``run_id`` exists."""
        return self._runs.create(run_id, config=config, strategy=strategy, model_name=model_name)

    def get_run(self, run_id: str) -> RunRecord:
        """NotFoundError if there is no such run."""
        return self._runs.get(run_id)

    def list_runs(self, *, status: RunStatus | str | None = None) -> list[RunRecord]:
        """Runs in creation order, optionally only those in ``status``."""
        return self._runs.list_runs(status=status)

    def set_run_status(self, run_id: str, status: RunStatus | str, *, error: str = "") -> RunRecord:
        """Move a run to ``status``; StoreConflictError for a transition that is not allowed."""
        return self._runs.set_status(run_id, status, error=error)

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
        """Open ``round`` of a running run with the devices it selected."""
        return self._rounds.open(
            run_id,
            round,
            selected=selected,
            deadline=deadline,
            model_version_in=model_version_in,
            plan=plan,
        )

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
        """Close an open round, atomically with the fate of the updates it decided."""
        return self._rounds.close(
            run_id,
            round,
            model_version_out=model_version_out,
            counted=counted,
            dropped=dropped,
            metrics=metrics,
            reason=reason,
        )

    def set_round_metrics(self, run_id: str, round: int, metrics: Mapping[str, Any]) -> RoundRecord:
        """Merge ``metrics`` into the round's (e.g. an evaluation finished after it closed)."""
        return self._rounds.set_metrics(run_id, round, metrics)

    def get_round(self, run_id: str, round: int) -> RoundRecord:
        """NotFoundError if the run has no such round."""
        return self._rounds.get(run_id, round)

    def find_open_round(self, run_id: str) -> RoundRecord | None:
        """The run's open round (at most one exists), or None: where a restart resumes."""
        return self._rounds.find_open(run_id)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """Every round of the run in round order."""
        return self._rounds.list_rounds(run_id)

    # -- chunks of updates (fleet.state.chunks) -----------------------------------------------

    def store_chunk_manifest(
        self,
        key: ChunkKey,
        total_bytes: int,
        chunk_count: int,
        chunk_bytes: int,
        *,
        max_payload_bytes: int,
    ) -> ChunkOutcome:
        """Store a transfer's manifest durably (one transaction; then the caller may ack it)."""
        return self._chunks.store_manifest(
            key, total_bytes, chunk_count, chunk_bytes, max_payload_bytes=max_payload_bytes
        )

    def store_chunk(
        self, key: ChunkKey, index: int, data: bytes, *, max_device_bytes: int
    ) -> ChunkOutcome:
        """Store chunk ``index`` of a transfer durably (one transaction; then the caller may
        ack it); completes the transfer when this was the last missing piece."""
        return self._chunks.store_chunk(key, index, data, max_device_bytes=max_device_bytes)

    def delete_chunk_set(self, key: ChunkKey) -> int:
        """Delete a transfer's manifest and chunks; returns the rows deleted."""
        return self._chunks.delete_set(key)

    def purge_chunks(
        self, run_id: str, *, rounds_up_to: int | None = None, received_before: float | None = None
    ) -> int:
        """Delete the chunk rows of closed rounds and abandoned transfers; returns the rows."""
        return self._chunks.purge(
            run_id, rounds_up_to=rounds_up_to, received_before=received_before
        )

    def chunk_bytes_held(self, run_id: str, device_id: str | None = None) -> int:
        """Bytes of chunk data stored for ``run_id`` (one device's, or everyone's)."""
        return self._chunks.bytes_held(run_id, device_id)

    # -- updates, rejections, traffic (fleet.state.updates, fleet.state.rejections) -----------

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
        """Store a validated update durably; True if new, False for a duplicate (first wins)."""
        return self._updates.record(
            run_id,
            round,
            device_id,
            payload,
            num_examples,
            meta,
            status=status,
            received_at=received_at,
            bytes_up=bytes_up,
        )

    def get_update(self, run_id: str, round: int, device_id: str) -> UpdateRecord | None:
        return self._updates.get(run_id, round, device_id)

    def updates_for_round(
        self, run_id: str, round: int, *, statuses: Iterable[UpdateStatus | str] | None = None
    ) -> list[UpdateRecord]:
        """The round's updates ordered by device id (not arrival), optionally by status."""
        return self._updates.for_round(run_id, round, statuses=statuses)

    def undecided_updates(self, run_id: str) -> list[UpdateRecord]:
        """Updates still waiting for a round to count or drop them, by (round, device id)."""
        return self._updates.undecided(run_id)

    def add_traffic(
        self,
        run_id: str | None,
        round: int | None,
        device_id: str | None,
        *,
        up: int = 0,
        down: int = 0,
    ) -> None:
        """Add bytes to a round's and/or a device's counters (``up``: device to fleet)."""
        self._updates.add_traffic(run_id, round, device_id, up=up, down=down)

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
        """Log a rejected message and return its id; counts per device and reason."""
        return self._rejections.record(run_id, round, device_id, reason, detail, at=at)

    def rejections(
        self, *, run_id: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[RejectionRecord]:
        """Rejections, newest first, optionally filtered by run and/or device."""
        return self._rejections.list_rejections(run_id=run_id, device_id=device_id, limit=limit)

    def rejection_counts(
        self, *, run_id: str | None = None, device_id: str | None = None
    ) -> dict[str, int]:
        """Number of rejections by reason, optionally for one run and/or device."""
        return self._rejections.counts(run_id=run_id, device_id=device_id)

    # -- checkpoints (fleet.state.checkpoints) ------------------------------------------------

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
        """Store model version ``version`` of a run; returns the file's SHA-256 hex digest."""
        return self._checkpoints.save(
            run_id, version, weights, masks, extra_state, meta, round=round
        )

    def load_checkpoint(self, run_id: str, version: int | None = None) -> Checkpoint:
        """Load a checkpoint (``version`` None: the highest saved), verified against its digest."""
        return self._checkpoints.load(run_id, version)

    def checkpoint_record(self, run_id: str, version: int | None = None) -> CheckpointRecord:
        return self._checkpoints.record(run_id, version)

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        return self._checkpoints.list_checkpoints(run_id)

    # -- devices (fleet.state.devices) --------------------------------------------------------

    def get_device(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)

    def list_devices(self) -> list[DeviceRecord]:
        """Every known device, ordered by id."""
        return self._devices.list_devices()

    def device_totals(self) -> dict[str, int]:
        """``devices``, ``online``, ``cordoned``, ``drained`` and ``updates_accepted`` (summed)
        over every device, without reading the rows one by one."""
        return self._devices.totals()

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
        """Apply a birth/will to a device row, creating it if new; True if applied."""
        return self._devices.update_status(
            device_id,
            online=online,
            session_epoch=session_epoch,
            agent_version=agent_version,
            status=status,
            seen_at=seen_at,
            accept=accept,
        )

    def touch_device(self, device_id: str, seen_at: float | None = None) -> bool:
        """Move a known device's ``last_seen`` forward (never back); False if unknown."""
        return self._devices.touch(device_id, seen_at)

    def set_device_flags(
        self, device_id: str, *, cordoned: bool | None = None, drained: bool | None = None
    ) -> DeviceRecord:
        """Set the operator's cordon/drain flags (None leaves one as is); NotFoundError if the
        device is unknown."""
        return self._devices.set_flags(device_id, cordoned=cordoned, drained=drained)

    def update_device_tags(
        self,
        device_id: str,
        *,
        set_tags: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
    ) -> DeviceRecord:
        """Change the operator's tags of a known device (``remove`` first, then ``set_tags``)."""
        return self._devices.update_tags(device_id, set_tags=set_tags, remove=remove)

    def record_device_failure(
        self, device_id: str, reason: str, *, at: float | None = None
    ) -> None:
        """Count a failed job the device reported and keep its reason as ``last_failure``."""
        self._devices.record_failure(device_id, reason, at=at)

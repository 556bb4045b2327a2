"""Device updates, and the byte counters of rounds and devices.

- **Idempotence.** Updates are keyed by (run, round, device): the first write wins and a
  redelivery changes nothing, not even the tensor file.
- **Files first, then rows; write, then acknowledge.** The payload file is durable before the
  row commits with ``synchronous=FULL``, so the caller may acknowledge the message when
  ``record`` returns.
- Counters (device bytes and accepted updates, round bytes) move in the transaction that stores
  the update, so they are exact after a crash. ``add_traffic`` counts the rest (downlink, chunked
  uplink) with ``synchronous=NORMAL``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from device.errors import NotFoundError
from fleet.state.columns import dumps, loads, non_empty
from fleet.state.db import Database
from fleet.state.devices import DeviceRepository
from fleet.state.records import (
    RoundStatus,
    StoreConflictError,
    UpdateRecord,
    UpdateStatus,
    parse_enum,
)
from fleet.state.tensors import TensorFiles


class UpdateRepository:
    """The ``updates`` table with its payload files; ``clock`` gives Unix seconds."""

    def __init__(self, db: Database, files: TensorFiles, clock: Callable[[], float]) -> None:
        self._db = db
        self._files = files
        self._clock = clock

    def record(
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
        kind = parse_enum(UpdateStatus, status, "update status")
        if kind is UpdateStatus.COUNTED:
            raise ValueError("an update becomes 'counted' only through close_round")
        non_empty(device_id, "device id")
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples} from {device_id!r}")
        traffic = len(payload) if bytes_up is None else bytes_up
        if traffic < 0:
            raise ValueError(f"bytes_up must be >= 0, got {traffic}")
        meta_json = dumps(meta or {}, f"meta of the update from {device_id!r}")
        if self.get(run_id, round, device_id) is not None:
            return False  # redelivery: do not even touch the file
        digest = self._files.write(payload)  # files first, then rows
        at = self._clock() if received_at is None else received_at
        with self._db.write() as conn:
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
            DeviceRepository.ensure(conn, device_id, at)
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

    def get(self, run_id: str, round: int, device_id: str) -> UpdateRecord | None:
        """The stored update of (run, round, device), or None."""
        row = (
            self._db.conn()
            .execute(
                "SELECT * FROM updates WHERE run_id = ? AND round = ? AND device_id = ?",
                (run_id, round, device_id),
            )
            .fetchone()
        )
        return None if row is None else self._from_row(row)

    def for_round(
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
            wanted = [parse_enum(UpdateStatus, s, "update status").value for s in statuses]
            sql += f" AND status IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        rows = self._db.conn().execute(sql + " ORDER BY device_id", params).fetchall()
        return [self._from_row(r) for r in rows]

    def undecided(self, run_id: str) -> list[UpdateRecord]:
        """Updates still waiting for a round to count or drop them (accepted, or late and not
        yet decided), ordered by (round, device id). After a restart these are exactly the
        acknowledged updates that the model does not contain yet."""
        rows = (
            self._db.conn()
            .execute(
                "SELECT * FROM updates WHERE run_id = ? AND status IN ('accepted', 'late')"
                " ORDER BY round, device_id",
                (run_id,),
            )
            .fetchall()
        )
        return [self._from_row(r) for r in rows]

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
        profile command has no run). Use for traffic that ``record`` does not count.
        """
        if up < 0 or down < 0:
            raise ValueError(f"traffic must be >= 0 bytes, got up={up} down={down}")
        with self._db.write(durable=False) as conn:
            if run_id is not None and round is not None:
                cur = conn.execute(
                    "UPDATE rounds SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?"
                    " WHERE run_id = ? AND round = ?",
                    (up, down, run_id, round),
                )
                if cur.rowcount != 1:
                    raise NotFoundError(f"run {run_id!r} has no round {round}")
            if device_id is not None:
                DeviceRepository.ensure(conn, device_id, self._clock())
                conn.execute(
                    "UPDATE devices SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?"
                    " WHERE device_id = ?",
                    (up, down, device_id),
                )

    def _from_row(self, row: sqlite3.Row) -> UpdateRecord:
        return UpdateRecord(
            run_id=row["run_id"],
            round=row["round"],
            device_id=row["device_id"],
            payload_digest=row["payload_digest"],
            payload_bytes=row["payload_bytes"],
            num_examples=row["num_examples"],
            status=UpdateStatus(row["status"]),
            counted_in_round=row["counted_in_round"],
            meta=loads(row["meta"]),
            received_at=row["received_at"],
            _read_blob=self._files.read,
        )

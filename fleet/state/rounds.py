"""Rounds: opening one with its selected devices, and closing it with the fate of its updates.

Invariants, each kept by a single durable transaction:

- A run has at most one open round, and round numbers only grow: a restarted runner finds
  exactly the round it was in. A round opens only on a saved input checkpoint, so a restart can
  always reload its model.
- **Counted at most once.** ``close`` moves updates from accepted/late to counted or dropped in
  the transaction that closes the round, refuses to count one twice, and refuses to leave an
  accepted update of the round undecided (an acknowledged update is never silently lost).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from device.errors import NotFoundError
from fleet.state.checkpoints import CheckpointRepository
from fleet.state.columns import dumps, finite_json, loads, non_empty
from fleet.state.db import Database
from fleet.state.devices import DeviceRepository
from fleet.state.records import (
    RoundRecord,
    RoundStatus,
    RunStatus,
    StoreConflictError,
    UpdateStatus,
)
from fleet.state.runs import RunRepository


class RoundRepository:
    """The ``rounds`` table (and the decisions on ``updates`` taken when a round closes).

    ``clock`` gives Unix seconds for ``opened_at``/``closed_at``.
    """

    def __init__(self, db: Database, runs: RunRepository, clock: Callable[[], float]) -> None:
        self._db = db
        self._runs = runs
        self._clock = clock

    def open(
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
            non_empty(device_id, f"selected device id of round {round}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"round {round} of run {run_id!r} selects a device twice: {devices}")
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        now = self._clock()
        plan_json = dumps(plan or {}, f"plan of round {round}")
        with self._db.write() as conn:
            run = self._runs.fetch(conn, run_id)
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
            CheckpointRepository.require(conn, run_id, model_version_in)
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
                DeviceRepository.ensure(conn, device_id, now)
            conn.executemany(
                "UPDATE devices SET rounds_joined = rounds_joined + 1 WHERE device_id = ?",
                [(d,) for d in devices],
            )
            return self.fetch(conn, run_id, round)

    def close(
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
        metrics_json = dumps(metrics or {}, f"metrics of round {round}")
        with self._db.write() as conn:
            current = self.fetch(conn, run_id, round)
            if current.status is RoundStatus.CLOSED:
                raise StoreConflictError(f"round {round} of run {run_id!r} is already closed")
            version = current.model_version_in if model_version_out is None else model_version_out
            digest = CheckpointRepository.require(conn, run_id, version)
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
                            _undecidable(conn, run_id, key_round, device_id, status, round)
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
            merged = {**current.metrics, **loads(metrics_json)}
            conn.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, model_version_out = ?,"
                " checkpoint_digest = ?, metrics = ?, close_reason = ?"
                " WHERE run_id = ? AND round = ?",
                (now, version, digest, dumps(merged, "metrics"), reason, run_id, round),
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))
            return self.fetch(conn, run_id, round)

    def set_metrics(self, run_id: str, round: int, metrics: Mapping[str, Any]) -> RoundRecord:
        """Merge ``metrics`` into the round's (e.g. an evaluation finished after it closed)."""
        with self._db.write() as conn:
            current = self.fetch(conn, run_id, round)
            merged = {**current.metrics, **finite_json(dict(metrics))}
            conn.execute(
                "UPDATE rounds SET metrics = ? WHERE run_id = ? AND round = ?",
                (dumps(merged, f"metrics of round {round}"), run_id, round),
            )
            return self.fetch(conn, run_id, round)

    def get(self, run_id: str, round: int) -> RoundRecord:
        """NotFoundError if the run has no such round."""
        return self.fetch(self._db.conn(), run_id, round)

    def find_open(self, run_id: str) -> RoundRecord | None:
        """The run's open round (at most one exists), or None: where a restart resumes."""
        row = (
            self._db.conn()
            .execute("SELECT * FROM rounds WHERE run_id = ? AND status = 'open'", (run_id,))
            .fetchone()
        )
        return None if row is None else _round_from_row(row)

    def list_rounds(self, run_id: str) -> list[RoundRecord]:
        """Every round of the run in round order."""
        rows = (
            self._db.conn()
            .execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
            .fetchall()
        )
        return [_round_from_row(r) for r in rows]

    @staticmethod
    def fetch(conn: sqlite3.Connection, run_id: str, round: int) -> RoundRecord:
        """The round as ``conn`` sees it (inside the caller's transaction); NotFoundError."""
        row = conn.execute(
            "SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run_id, round)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"run {run_id!r} has no round {round}")
        return _round_from_row(row)


def _undecidable(
    conn: sqlite3.Connection,
    run_id: str,
    key_round: int,
    device_id: str,
    wanted: UpdateStatus,
    closing: int,
) -> str:
    """Why the update (``key_round``, ``device_id``) cannot become ``wanted`` at this close."""
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


def _round_from_row(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(
        run_id=row["run_id"],
        round=row["round"],
        status=RoundStatus(row["status"]),
        selected=tuple(loads(row["selected"])),
        deadline=row["deadline"],
        plan=loads(row["plan"]),
        model_version_in=row["model_version_in"],
        model_version_out=row["model_version_out"],
        checkpoint_digest=row["checkpoint_digest"],
        close_reason=row["close_reason"],
        metrics=loads(row["metrics"]),
        bytes_up=row["bytes_up"],
        bytes_down=row["bytes_down"],
        opened_at=row["opened_at"],
        closed_at=row["closed_at"],
    )

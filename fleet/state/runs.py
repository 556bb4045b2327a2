"""Runs: one row per training run, its configuration and its status.

A run moves ``created`` -> ``running`` <-> ``stopped``/``failed`` -> ... -> ``finished``;
``finished`` is terminal and nothing returns to ``created``. Every change is one durable
transaction (an operator's ``fleet run stop`` survives a power cut once it returns).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from device.errors import NotFoundError
from fleet.state.columns import dumps, loads, non_empty
from fleet.state.db import Database
from fleet.state.records import RunRecord, RunStatus, StoreConflictError, parse_enum

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


class RunRepository:
    """The ``runs`` table. ``clock`` gives Unix seconds for ``created_at``/``updated_at``."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def create(
        self, run_id: str, *, config: Mapping[str, Any], strategy: str, model_name: str
    ) -> RunRecord:
        """A new run in status ``created``; StoreConflictError if ``run_id`` exists."""
        non_empty(run_id, "run id")
        now = self._clock()
        config_json = dumps(config, f"config of run {run_id!r}")
        with self._db.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO runs (run_id, config, strategy, model_name, status,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, 'created', ?, ?)",
                    (run_id, config_json, strategy, model_name, now, now),
                )
            except sqlite3.IntegrityError:
                raise StoreConflictError(f"run {run_id!r} already exists") from None
            return self.fetch(conn, run_id)

    def get(self, run_id: str) -> RunRecord:
        """NotFoundError if there is no such run."""
        return self.fetch(self._db.conn(), run_id)

    def list_runs(self, *, status: RunStatus | str | None = None) -> list[RunRecord]:
        """Runs in creation order, optionally only those in ``status``."""
        conn = self._db.conn()
        if status is None:
            rows = conn.execute("SELECT * FROM runs ORDER BY created_at, run_id").fetchall()
        else:
            wanted = parse_enum(RunStatus, status, "run status")
            rows = conn.execute(
                "SELECT * FROM runs WHERE status = ? ORDER BY created_at, run_id", (wanted,)
            ).fetchall()
        return [_run_from_row(r) for r in rows]

    def set_status(self, run_id: str, status: RunStatus | str, *, error: str = "") -> RunRecord:
        """Move a run to ``status`` (``error`` says why it failed or stopped).

        ``finished`` is terminal and nothing returns to ``created``; StoreConflictError otherwise.
        """
        new = parse_enum(RunStatus, status, "run status")
        with self._db.write() as conn:
            current = self.fetch(conn, run_id).status
            if new not in _RUN_TRANSITIONS[current]:
                raise StoreConflictError(f"run {run_id!r} cannot go from {current} to {new}")
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, updated_at = ? WHERE run_id = ?",
                (new.value, error, self._clock(), run_id),
            )
            return self.fetch(conn, run_id)

    def fetch(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        """The run as ``conn`` sees it (inside the caller's transaction); NotFoundError if none."""
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in {self._db.path}")
        return _run_from_row(row)


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        config=loads(row["config"]),
        strategy=row["strategy"],
        model_name=row["model_name"],
        status=RunStatus(row["status"]),
        current_round=row["current_round"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )

"""The log of rejected messages: what a device sent that the fleet manager refused, and why.

A rejection may name a run, round or device that does not exist (that can be why it was
rejected), so the table has no foreign keys. Logging is at-least-once (a redelivered bad
message is counted again) and commits with ``synchronous=NORMAL``: nothing is acknowledged on
the strength of a rejection row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet.state.columns import non_empty
from fleet.state.db import Database
from fleet.state.records import RejectionRecord


class RejectionRepository:
    """The ``rejections`` table; ``clock`` gives Unix seconds when no time is passed."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def record(
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
        non_empty(device_id, "device id")
        non_empty(reason, "rejection reason")
        when = self._clock() if at is None else at
        with self._db.write(durable=False) as conn:
            cur = conn.execute(
                "INSERT INTO rejections (run_id, round, device_id, reason, detail, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, round, device_id, reason, detail, when),
            )
            return int(cur.lastrowid or 0)

    def list_rejections(
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
            for r in self._db.conn().execute(sql, params)
        ]

    def counts(self, *, run_id: str | None = None, device_id: str | None = None) -> dict[str, int]:
        """Number of rejections by reason, optionally for one run and/or device."""
        sql = "SELECT reason, count(*) AS n FROM rejections WHERE 1 = 1"
        params: list[Any] = []
        if run_id is not None:
            sql += " AND run_id = ?"
            params.append(run_id)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        rows = self._db.conn().execute(sql + " GROUP BY reason ORDER BY reason", params)
        return {r["reason"]: r["n"] for r in rows}

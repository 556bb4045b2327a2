"""Devices: presence (births, wills, last seen), operator flags and tags, and counters.

A device row is created by whichever comes first: a status message, a selection into a round,
an update, a failure report or traffic. Presence writes (``update_status``, ``touch``,
``record_failure``) commit with ``synchronous=NORMAL`` (they are frequent and a lost one is
repeated by the device); operator writes (flags, tags) are durable, because the operator was
told they happened. Counters that other repositories move (rounds joined, updates accepted,
bytes) move in those repositories' transactions, after ``ensure``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from device.errors import NotFoundError
from fleet.state.columns import dumps, loads, non_empty
from fleet.state.db import Database
from fleet.state.records import DeviceRecord

DEVICE_TOTALS = ("devices", "online", "cordoned", "drained", "updates_accepted")
"""The keys of ``DeviceRepository.totals``."""


class DeviceRepository:
    """The ``devices`` table (and the per-device counts of the ``rejections`` table).

    ``clock`` gives Unix seconds when a caller passes no time of its own.
    """

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        # device id -> (its row's values and rejection counts, the record made from them):
        # ``list_devices`` re-parses only rows that changed (records are frozen, so sharing
        # one between calls is safe). Replaced whole on each listing, so it holds known devices.
        self._parsed: dict[str, tuple[tuple[Any, ...], DeviceRecord]] = {}

    @staticmethod
    def ensure(conn: sqlite3.Connection, device_id: str, now: float) -> None:
        """Inside the caller's transaction: create the row (``first_seen`` = ``now``) if new."""
        conn.execute(
            "INSERT INTO devices (device_id, first_seen) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (device_id, now),
        )

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._db.read() as conn:
            return self._fetch(conn, device_id)

    def list_devices(self) -> list[DeviceRecord]:
        """Every known device, ordered by id.

        A row whose values and rejection counts are those of the previous listing gives the
        same (frozen) record object as then, without decoding its JSON columns again: listing
        1,000 devices of which a few changed costs the query, not 1,000 parses.
        """
        with self._db.read() as conn:
            counts: dict[str, dict[str, int]] = {}
            for r in conn.execute(
                "SELECT device_id, reason, count(*) AS n FROM rejections GROUP BY device_id, reason"
            ):
                counts.setdefault(r["device_id"], {})[r["reason"]] = r["n"]
            rows = conn.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
        previous = self._parsed
        parsed: dict[str, tuple[tuple[Any, ...], DeviceRecord]] = {}
        out: list[DeviceRecord] = []
        for row in rows:
            device_id = row["device_id"]
            rejections = counts.get(device_id, {})
            key = (*row, *sorted(rejections.items()))
            seen = previous.get(device_id)
            record = seen[1] if seen is not None and seen[0] == key else None
            if record is None:
                record = _device_from_row(row, rejections)
            parsed[device_id] = (key, record)
            out.append(record)
        self._parsed = parsed  # one assignment: a concurrent listing sees the old or the new
        return out

    def totals(self) -> dict[str, int]:
        """Counts over every device in one aggregate query (no row decoded): ``devices``,
        ``online``, ``cordoned``, ``drained``, and ``updates_accepted`` summed."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT count(*) AS devices, total(online) AS online, total(cordoned) AS cordoned,"
                " total(drained) AS drained, total(updates_accepted) AS updates_accepted"
                " FROM devices"
            ).fetchone()
        return {key: int(row[key]) for key in DEVICE_TOTALS}

    def update_status(
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
        non_empty(device_id, "device id")
        now = self._clock() if seen_at is None else seen_at
        status_json = dumps(status, f"status of device {device_id!r}")
        with self._db.write(durable=False) as conn:
            current = self._fetch(conn, device_id)
            if accept is not None and not accept(current):
                return False
            self.ensure(conn, device_id, now)
            conn.execute(
                "UPDATE devices SET online = ?, session_epoch = ?, agent_version = ?,"
                " status = ?, last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (int(online), session_epoch, agent_version, status_json, now, now, device_id),
            )
            return True

    def touch(self, device_id: str, seen_at: float | None = None) -> bool:
        """Move a known device's ``last_seen`` forward (never back); False if unknown."""
        now = self._clock() if seen_at is None else seen_at
        with self._db.write(durable=False) as conn:
            cur = conn.execute(
                "UPDATE devices SET last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (now, now, device_id),
            )
            return cur.rowcount == 1

    def set_flags(
        self, device_id: str, *, cordoned: bool | None = None, drained: bool | None = None
    ) -> DeviceRecord:
        """Set the operator's cordon/drain flags (None leaves one as is); NotFoundError if the
        device is unknown (a typo must not silently create a device)."""
        with self._db.write() as conn:
            self._require(conn, device_id)
            if cordoned is not None:
                conn.execute(
                    "UPDATE devices SET cordoned = ? WHERE device_id = ?",
                    (int(cordoned), device_id),
                )
            if drained is not None:
                conn.execute(
                    "UPDATE devices SET drained = ? WHERE device_id = ?", (int(drained), device_id)
                )
            return self._require(conn, device_id)

    def update_tags(
        self,
        device_id: str,
        *,
        set_tags: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
    ) -> DeviceRecord:
        """Change the operator's tags of a known device (``remove`` first, then ``set_tags``)."""
        with self._db.write() as conn:
            record = self._require(conn, device_id)
            tags = dict(record.tags)
            for key in remove:
                tags.pop(key, None)
            for key, value in (set_tags or {}).items():
                tags[non_empty(key, "tag key")] = str(value)
            conn.execute(
                "UPDATE devices SET tags = ? WHERE device_id = ?",
                (dumps(tags, f"tags of {device_id!r}"), device_id),
            )
            return self._require(conn, device_id)

    def record_failure(self, device_id: str, reason: str, *, at: float | None = None) -> None:
        """Count a failed job the device reported and keep its reason as ``last_failure``."""
        non_empty(device_id, "device id")
        now = self._clock() if at is None else at
        with self._db.write(durable=False) as conn:
            self.ensure(conn, device_id, now)
            conn.execute(
                "UPDATE devices SET failures = failures + 1, last_failure = ?,"
                " last_seen = max(coalesce(last_seen, ?), ?) WHERE device_id = ?",
                (reason, now, now, device_id),
            )

    def _fetch(self, conn: sqlite3.Connection, device_id: str) -> DeviceRecord | None:
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
        return _device_from_row(row, counts)

    def _require(self, conn: sqlite3.Connection, device_id: str) -> DeviceRecord:
        record = self._fetch(conn, device_id)
        if record is None:
            raise NotFoundError(f"no device {device_id!r} in {self._db.path}")
        return record


def _device_from_row(row: sqlite3.Row, rejections: Mapping[str, int]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        online=bool(row["online"]),
        session_epoch=row["session_epoch"],
        last_seen=row["last_seen"],
        agent_version=row["agent_version"],
        status=loads(row["status"]),
        cordoned=bool(row["cordoned"]),
        drained=bool(row["drained"]),
        tags=loads(row["tags"]),
        rounds_joined=row["rounds_joined"],
        updates_accepted=row["updates_accepted"],
        failures=row["failures"],
        last_failure=row["last_failure"],
        bytes_up=row["bytes_up"],
        bytes_down=row["bytes_down"],
        rejections=dict(rejections),
        first_seen=row["first_seen"],
    )

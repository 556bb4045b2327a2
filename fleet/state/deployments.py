"""Model deployments: each deployment or rollback, each addressed device's state in it, and what
every device last reported serving (schema version 3, docs/deployment.md).

Invariants:

- **Sequences order deployments.** ``create`` gives a new deployment the next sequence (one more
  than the highest, in the same transaction), which its notice carries; a device serves the
  highest sequence that addresses it, so the store's order is the fleet's.
- **Device states move with the device's clock.** An event is applied only when its device
  timestamp is not older than the last one applied for that device and deployment, so a late
  redelivery never turns ``active`` back into ``downloading``.
- **Nothing is deleted.** Failures keep their reason; a superseded deployment keeps its rows.

Writes commit durably (``synchronous=FULL``); times are Unix seconds.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from device.errors import NotFoundError
from fleet.state.columns import dumps, loads, non_empty
from fleet.state.db import Database

__all__ = [
    "DeploymentDevice",
    "DeploymentRecord",
    "DeploymentRepository",
    "DeploymentStatus",
    "DeviceModel",
]


class DeploymentStatus(enum.StrEnum):
    """``canary``: waiting for the canary devices; ``rolling_out``: published to every target;
    ``completed``: every online target reported active; ``stopped``: a canary failed (the
    notice was withdrawn); ``failed``: targets reported failures."""

    CANARY = "canary"
    ROLLING_OUT = "rolling_out"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


DEVICE_STATES = ("pending", "downloading", "verified", "active", "failed")


@dataclass(frozen=True)
class DeploymentRecord:
    deployment_id: str
    sequence: int
    kind: str  # "deploy" or "rollback"
    version: str
    artefact_sha256: str
    artefact_bytes: int
    manifest: Mapping[str, Any]
    target: str  # as given: "all", a device id, or "tag=K=V"
    all_devices: bool
    canary_percent: float
    status: DeploymentStatus
    reason: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class DeploymentDevice:
    """One addressed device's state in a deployment (``reported_at``: the device's clock)."""

    deployment_id: str
    device_id: str
    role: str  # "canary" or "target"
    state: str  # one of DEVICE_STATES
    reason: str
    updated_at: float
    reported_at: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceModel:
    """What a device last reported serving (from its status)."""

    device_id: str
    version: str
    artefact_sha256: str
    deployment_id: str
    since: float
    inferences: int
    errors: int
    previous_version: str
    reported_at: float


def _record(row: sqlite3.Row) -> DeploymentRecord:
    return DeploymentRecord(
        deployment_id=row["deployment_id"],
        sequence=row["sequence"],
        kind=row["kind"],
        version=row["version"],
        artefact_sha256=row["artefact_sha256"],
        artefact_bytes=row["artefact_bytes"],
        manifest=loads(row["manifest"]),
        target=row["target"],
        all_devices=bool(row["all_devices"]),
        canary_percent=row["canary_percent"],
        status=DeploymentStatus(row["status"]),
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _device(row: sqlite3.Row) -> DeploymentDevice:
    return DeploymentDevice(
        deployment_id=row["deployment_id"],
        device_id=row["device_id"],
        role=row["role"],
        state=row["state"],
        reason=row["reason"],
        updated_at=row["updated_at"],
        reported_at=row["reported_at"],
        metrics=loads(row["metrics"]),
    )


class DeploymentRepository:
    """The ``deployments``, ``deployment_devices`` and ``device_models`` tables."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    # -- deployments ---------------------------------------------------------------------------

    def create(
        self,
        deployment_id: str,
        *,
        kind: str,
        version: str,
        artefact_sha256: str,
        artefact_bytes: int,
        manifest: Mapping[str, Any],
        target: str,
        all_devices: bool,
        devices: Mapping[str, str],
        status: DeploymentStatus | str,
        canary_percent: float = 0.0,
    ) -> DeploymentRecord:
        """A new deployment with the next sequence and its devices (``device id -> role``,
        each ``pending``). ``sqlite3.IntegrityError`` for a duplicate id."""
        non_empty(deployment_id, "deployment id")
        now = self._clock()
        with self._db.write() as conn:
            row = conn.execute("SELECT COALESCE(MAX(sequence), 0) AS s FROM deployments").fetchone()
            sequence = int(row["s"]) + 1
            conn.execute(
                "INSERT INTO deployments (deployment_id, sequence, kind, version, artefact_sha256,"
                " artefact_bytes, manifest, target, all_devices, canary_percent, status, reason,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                (
                    deployment_id,
                    sequence,
                    kind,
                    version,
                    artefact_sha256,
                    artefact_bytes,
                    dumps(manifest, "deployment manifest"),
                    target,
                    int(all_devices),
                    canary_percent,
                    DeploymentStatus(status).value,
                    now,
                    now,
                ),
            )
            conn.executemany(
                "INSERT INTO deployment_devices (deployment_id, device_id, role, state,"
                " updated_at) VALUES (?, ?, ?, 'pending', ?)",
                [(deployment_id, device_id, role, now) for device_id, role in devices.items()],
            )
        return self.get(deployment_id)

    def get(self, deployment_id: str) -> DeploymentRecord:
        """NotFoundError if there is no such deployment."""
        row = (
            self._db.conn()
            .execute("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,))
            .fetchone()
        )
        if row is None:
            raise NotFoundError(f"no deployment {deployment_id!r}")
        return _record(row)

    def list_deployments(self, *, limit: int | None = None) -> list[DeploymentRecord]:
        """Deployments, newest (highest sequence) first."""
        sql = "SELECT * FROM deployments ORDER BY sequence DESC"
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        return [_record(r) for r in self._db.conn().execute(sql, params).fetchall()]

    def set_status(
        self, deployment_id: str, status: DeploymentStatus | str, reason: str = ""
    ) -> DeploymentRecord:
        now = self._clock()
        with self._db.write() as conn:
            cur = conn.execute(
                "UPDATE deployments SET status = ?, reason = ?, updated_at = ?"
                " WHERE deployment_id = ?",
                (DeploymentStatus(status).value, reason, now, deployment_id),
            )
            if cur.rowcount == 0:
                raise NotFoundError(f"no deployment {deployment_id!r}")
        return self.get(deployment_id)

    # -- devices in a deployment ---------------------------------------------------------------

    def devices(self, deployment_id: str, device_id: str | None = None) -> list[DeploymentDevice]:
        """The deployment's devices, ordered by id (only ``device_id``'s row when given: a
        rollout that follows 100 devices reads one row per event, not 100)."""
        query = "SELECT * FROM deployment_devices WHERE deployment_id = ?"
        args: tuple[str, ...] = (deployment_id,)
        if device_id is not None:
            query += " AND device_id = ?"
            args += (device_id,)
        rows = self._db.conn().execute(query + " ORDER BY device_id", args).fetchall()
        return [_device(r) for r in rows]

    def record_event(
        self,
        deployment_id: str,
        device_id: str,
        state: str,
        *,
        reason: str = "",
        metrics: Mapping[str, float] | None = None,
        reported_at: float,
    ) -> bool:
        """Apply a device's event to its row (added as a ``target`` when the deployment
        addressed every device); True if applied, False when older than the row's last event
        or the deployment is unknown, or when it repeats the row's state at the same time
        without metrics (the retained status that follows every event). ``metrics`` None keeps
        the row's (a status repeats the state of an event without its metrics).

        Not power-safe on return (``durable=False``: crash-safe, power-safe at the next durable
        commit): what a device reports is reported again in its retained status, so a lost
        tail is relearned, and one fsync per event made a 100-device rollout spend seconds of
        the fleet manager's time in fsync (docs/benchmarks.md, "Deployment")."""
        if state not in DEVICE_STATES:
            raise ValueError(f"unknown device state {state!r}; known: {', '.join(DEVICE_STATES)}")
        now = self._clock()
        with self._db.write(durable=False) as conn:
            known = conn.execute(
                "SELECT 1 FROM deployments WHERE deployment_id = ?", (deployment_id,)
            ).fetchone()
            if known is None:
                return False
            row = conn.execute(
                "SELECT reported_at, state FROM deployment_devices WHERE deployment_id = ?"
                " AND device_id = ?",
                (deployment_id, device_id),
            ).fetchone()
            if row is not None and row["reported_at"] is not None:
                if row["reported_at"] > reported_at:
                    return False
                if row["reported_at"] == reported_at and row["state"] == state and metrics is None:
                    return False  # a status repeating the event already recorded
            conn.execute(
                "INSERT INTO deployment_devices (deployment_id, device_id, role, state, reason,"
                " metrics, reported_at, updated_at) VALUES (?, ?, 'target', ?, ?, ?, ?, ?)"
                " ON CONFLICT (deployment_id, device_id) DO UPDATE SET state = excluded.state,"
                " reason = excluded.reason,"
                " metrics = CASE WHEN ? THEN excluded.metrics ELSE metrics END,"
                " reported_at = excluded.reported_at, updated_at = excluded.updated_at",
                (
                    deployment_id,
                    device_id,
                    state,
                    reason,
                    dumps(dict(metrics or {}), "event metrics"),
                    reported_at,
                    now,
                    metrics is not None,
                ),
            )
        return True

    def device_history(self, device_id: str) -> list[tuple[DeploymentRecord, DeploymentDevice]]:
        """Every deployment that addressed ``device_id`` with its state there, newest first."""
        conn = self._db.conn()
        rows = conn.execute(
            "SELECT d.* FROM deployments d JOIN deployment_devices x USING (deployment_id)"
            " WHERE x.device_id = ? ORDER BY d.sequence DESC",
            (device_id,),
        ).fetchall()
        out = []
        for row in rows:
            record = _record(row)
            entry = conn.execute(
                "SELECT * FROM deployment_devices WHERE deployment_id = ? AND device_id = ?",
                (record.deployment_id, device_id),
            ).fetchone()
            out.append((record, _device(entry)))
        return out

    # -- what devices serve --------------------------------------------------------------------

    def record_model(self, model: DeviceModel) -> bool:
        """Store what a device reports serving; ignored (False) when older than what is kept."""
        with self._db.write(durable=False) as conn:
            row = conn.execute(
                "SELECT reported_at FROM device_models WHERE device_id = ?", (model.device_id,)
            ).fetchone()
            if row is not None and row["reported_at"] > model.reported_at:
                return False
            conn.execute(
                "INSERT INTO device_models (device_id, version, artefact_sha256, deployment_id,"
                " since, inferences, errors, previous_version, reported_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                " version = excluded.version, artefact_sha256 = excluded.artefact_sha256,"
                " deployment_id = excluded.deployment_id, since = excluded.since,"
                " inferences = excluded.inferences, errors = excluded.errors,"
                " previous_version = excluded.previous_version,"
                " reported_at = excluded.reported_at",
                (
                    model.device_id,
                    model.version,
                    model.artefact_sha256,
                    model.deployment_id,
                    model.since,
                    model.inferences,
                    model.errors,
                    model.previous_version,
                    model.reported_at,
                ),
            )
        return True

    def device_models(self, device_ids: Iterable[str] | None = None) -> dict[str, DeviceModel]:
        """device id -> what it last reported serving (all devices, or those given)."""
        rows = self._db.conn().execute("SELECT * FROM device_models ORDER BY device_id").fetchall()
        wanted = None if device_ids is None else set(device_ids)
        return {
            r["device_id"]: DeviceModel(**{k: r[k] for k in r.keys()})  # noqa: SIM118
            for r in rows
            if wanted is None or r["device_id"] in wanted
        }

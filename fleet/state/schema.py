"""The one schema of fleet.db and the one path that migrates a database to it.

``MIGRATIONS`` is ordered: migration ``n`` brings the schema from version ``n - 1`` to ``n`` and
runs inside the same write transaction that records the new version in ``schema_version``, so a
migration applies completely or not at all (SQLite DDL is transactional). A released migration
is never edited, only appended to: the DDL below is what every existing store was created with.
docs/state.md describes the tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from device.errors import DataError
from fleet.state.db import Database


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


# Version 3: model deployments (fleet.state.deployments, docs/deployment.md). ``deployments``
# holds one row per deployment or rollback (its notice's sequence orders them; the artefact's
# bytes are the tensor file named by ``artefact_sha256``), ``deployment_devices`` each
# addressed device's state in it, ``device_models`` what each device last reported serving.
_SCHEMA_V3 = """
CREATE TABLE deployments (
    deployment_id   TEXT PRIMARY KEY CHECK (length(deployment_id) > 0),
    sequence        INTEGER NOT NULL UNIQUE CHECK (sequence > 0),
    kind            TEXT NOT NULL CHECK (kind IN ('deploy', 'rollback')),
    version         TEXT NOT NULL CHECK (length(version) > 0),
    artefact_sha256 TEXT NOT NULL CHECK (length(artefact_sha256) = 64),
    artefact_bytes  INTEGER NOT NULL CHECK (artefact_bytes >= 0),
    manifest        TEXT NOT NULL CHECK (json_valid(manifest)),
    target          TEXT NOT NULL,
    all_devices     INTEGER NOT NULL DEFAULT 0 CHECK (all_devices IN (0, 1)),
    canary_percent  REAL NOT NULL DEFAULT 0 CHECK (canary_percent >= 0 AND canary_percent <= 100),
    status          TEXT NOT NULL
                    CHECK (status IN ('canary', 'rolling_out', 'completed', 'stopped', 'failed')),
    reason          TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
) STRICT;

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments (deployment_id),
    device_id     TEXT NOT NULL CHECK (length(device_id) > 0),
    role          TEXT NOT NULL CHECK (role IN ('canary', 'target')),
    state         TEXT NOT NULL
                  CHECK (state IN ('pending', 'downloading', 'verified', 'active', 'failed')),
    reason        TEXT NOT NULL DEFAULT '',
    metrics       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metrics)),
    reported_at   REAL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (deployment_id, device_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX deployment_devices_by_device ON deployment_devices (device_id);

CREATE TABLE device_models (
    device_id        TEXT PRIMARY KEY CHECK (length(device_id) > 0),
    version          TEXT NOT NULL,
    artefact_sha256  TEXT NOT NULL DEFAULT '',
    deployment_id    TEXT NOT NULL DEFAULT '',
    since            REAL NOT NULL,
    inferences       INTEGER NOT NULL DEFAULT 0 CHECK (inferences >= 0),
    errors           INTEGER NOT NULL DEFAULT 0 CHECK (errors >= 0),
    previous_version TEXT NOT NULL DEFAULT '',
    reported_at      REAL NOT NULL
) STRICT;
"""


def _create_v3(conn: sqlite3.Connection) -> None:
    for statement in _split_sql(_SCHEMA_V3):
        conn.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _create_v1),
    Migration(2, "chunks of updates reassembled through the store", _create_v2),
    Migration(3, "model deployments", _create_v3),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of the database (0 for a database never migrated)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return int(row["version"]) if row else 0


def migrate(db: Database, migrations: Sequence[Migration], now: Callable[[], float]) -> None:
    """Apply the migrations ``db`` lacks, in one durable transaction; ``now`` gives Unix seconds.

    ValueError if ``migrations`` are not numbered 1..n in order; DataError if the database has a
    newer schema than ``migrations`` know (an older sparsefleet must not write to it). Safe when
    several processes open the same store at once: the version is read again under the lock.
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations must be numbered 1..n in order, got {versions}")
    known = versions[-1] if versions else 0
    # Read first: opening an up-to-date store must not wait for the runner's write lock.
    if _check_version(db, schema_version(db.conn()), known) == known:
        return
    with db.write() as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " version INTEGER NOT NULL, updated_at REAL NOT NULL) STRICT"
        )
        current = _check_version(db, schema_version(conn), known)  # another process?
        for migration in migrations[current:]:
            migration.apply(conn)
        conn.execute(
            "INSERT INTO schema_version (id, version, updated_at) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at",
            (known, now()),
        )


def _check_version(db: Database, current: int, known: int) -> int:
    if current > known:
        raise DataError(
            f"{db.path} has schema version {current}, newer than this sparsefleet "
            f"(knows up to {known}); upgrade sparsefleet"
        )
    return current

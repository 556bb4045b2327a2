"""Chunk sets: the pieces of one update split over sharded aggregator workers, stored until one
worker holds them all (``fleet.runtime.aggregator``).

A transfer is named by a ``ChunkKey`` (run, round, device, SHA-256 of the whole payload) and
consists of one manifest row (``chunk_sets``: total bytes, chunk count, chunk size) and its
pieces (``chunks``). A piece is acknowledged once stored, so every store is one durable
transaction; the first write of a key wins and an identical duplicate changes nothing. The write
that completes a transfer reassembles it in the same transaction and verifies size and SHA-256.
A transfer that contradicts itself is given up: its rows are deleted in the transaction that
found the problem. Deleting and purging are cleanup and commit with ``synchronous=NORMAL``.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable

from fleet.state.columns import non_empty
from fleet.state.db import Database
from fleet.state.records import ChunkKey, ChunkOutcome

_WHERE_KEY = "run_id = ? AND round = ? AND device_id = ? AND sha256 = ?"


class ChunkRepository:
    """The ``chunk_sets`` and ``chunks`` tables; sizes are bytes, ``clock`` Unix seconds."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def store_manifest(
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
        _check_key(key)
        problem = _manifest_problem(total_bytes, chunk_count, chunk_bytes, max_payload_bytes)
        if problem:
            self.delete_set(key)
            return ChunkOutcome(False, problem=problem)
        with self._db.write() as conn:
            cur = conn.execute(
                "INSERT INTO chunk_sets (run_id, round, device_id, sha256, total_bytes,"
                " chunk_count, chunk_bytes, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (key.run_id, key.round, key.device_id, key.sha256, total_bytes, chunk_count,
                 chunk_bytes, self._clock()),
            )  # fmt: skip
            new = cur.rowcount == 1
            if not new:
                row = _manifest(conn, key)
                if row is not None and row != (total_bytes, chunk_count, chunk_bytes):
                    _delete_set(conn, key)
                    return ChunkOutcome(False, problem="two different manifests for one payload")
            return _settle(conn, key, new)

    def store_chunk(
        self, key: ChunkKey, index: int, data: bytes, *, max_device_bytes: int
    ) -> ChunkOutcome:
        """Store chunk ``index`` of a transfer durably (one transaction; then the caller may
        ack it). The first write of an index wins; a different second copy gives the transfer
        up, as does a chunk that does not fit the manifest or that takes the device's stored
        chunk bytes in this run over ``max_device_bytes``. Completes the transfer when this was
        the last missing piece."""
        _check_key(key)
        if index < 0:
            raise ValueError(f"chunk index must be >= 0, got {index}")
        with self._db.write() as conn:
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
                    _delete_set(conn, key)
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
                _delete_set(conn, key)
                return ChunkOutcome(
                    new,
                    problem=f"device {key.device_id!r} would hold {held_bytes} B of chunks in run "
                    f"{key.run_id!r}, over the limit of {max_device_bytes} B",
                )
            return _settle(conn, key, new)

    def delete_set(self, key: ChunkKey) -> int:
        """Delete a transfer's manifest and chunks; returns the rows deleted."""
        with self._db.write(durable=False) as conn:
            return _delete_set(conn, key)

    def purge(
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
        with self._db.write(durable=False) as conn:
            n = conn.execute(f"DELETE FROM chunks WHERE {sql}", args).rowcount
            n += conn.execute(f"DELETE FROM chunk_sets WHERE {sql}", args).rowcount
        return int(n)

    def bytes_held(self, run_id: str, device_id: str | None = None) -> int:
        """Bytes of chunk data stored for ``run_id`` (one device's, or everyone's)."""
        sql = "SELECT coalesce(sum(length(data)), 0) FROM chunks WHERE run_id = ?"
        args: list[str] = [run_id]
        if device_id is not None:
            sql += " AND device_id = ?"
            args.append(device_id)
        with self._db.read() as conn:
            return int(conn.execute(sql, args).fetchone()[0])


def _check_key(key: ChunkKey) -> None:
    non_empty(key.device_id, "device id")
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


def _manifest(conn: sqlite3.Connection, key: ChunkKey) -> tuple[int, int, int] | None:
    row = conn.execute(
        "SELECT total_bytes, chunk_count, chunk_bytes FROM chunk_sets WHERE run_id = ?"
        " AND round = ? AND device_id = ? AND sha256 = ?",
        (key.run_id, key.round, key.device_id, key.sha256),
    ).fetchone()
    if row is None:
        return None
    return int(row["total_bytes"]), int(row["chunk_count"]), int(row["chunk_bytes"])


def _delete_set(conn: sqlite3.Connection, key: ChunkKey) -> int:
    args = (key.run_id, key.round, key.device_id, key.sha256)
    n = conn.execute(f"DELETE FROM chunks WHERE {_WHERE_KEY}", args).rowcount
    return int(n + conn.execute(f"DELETE FROM chunk_sets WHERE {_WHERE_KEY}", args).rowcount)


def _settle(conn: sqlite3.Connection, key: ChunkKey, new: bool) -> ChunkOutcome:
    """Inside a write transaction: check the transfer's stored chunks against its manifest
    and reassemble it when complete."""
    manifest = _manifest(conn, key)
    if manifest is None:
        return ChunkOutcome(new)
    total, count, size = manifest
    args = (key.run_id, key.round, key.device_id, key.sha256)
    for row in conn.execute(
        f"SELECT idx, length(data) AS n FROM chunks WHERE {_WHERE_KEY}"
        " AND (idx >= ? OR length(data) != CASE WHEN idx = ? THEN ? ELSE ? END)",
        (*args, count, count - 1, total - (count - 1) * size, size),
    ):
        _delete_set(conn, key)
        idx, n = int(row["idx"]), int(row["n"])
        why = (
            f"chunk index {idx} beyond chunk_count {count}"
            if idx >= count
            else f"chunk {idx} has {n} B, the manifest says otherwise"
        )
        return ChunkOutcome(new, problem=why)
    have = int(conn.execute(f"SELECT count(*) FROM chunks WHERE {_WHERE_KEY}", args).fetchone()[0])
    if have < count:
        return ChunkOutcome(new)
    digest = hashlib.sha256()
    parts = []
    for row in conn.execute(f"SELECT data FROM chunks WHERE {_WHERE_KEY} ORDER BY idx", args):
        part = bytes(row["data"])
        digest.update(part)
        parts.append(part)
    payload = b"".join(parts)
    if len(payload) != total or digest.digest() != key.sha256:
        _delete_set(conn, key)
        return ChunkOutcome(new, problem="SHA-256 of the reassembled payload does not match")
    return ChunkOutcome(new, payload=payload)

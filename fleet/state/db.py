"""The SQLite database file: per-thread connections and the two kinds of transaction.

- ``write(durable=True)`` is one ``BEGIN IMMEDIATE`` ... ``COMMIT``: every public write of the
  store is exactly one of these, so what it changes commits (or rolls back) as a whole.
  ``durable=True`` commits with ``synchronous=FULL`` (the row survives a power cut when the call
  returns: write, then acknowledge); ``durable=False`` with ``synchronous=NORMAL``, which in WAL
  mode survives a process crash and becomes power-safe at the next FULL commit.
- ``read()`` is a consistent snapshot for several SELECTs; it joins an enclosing transaction.

Each thread gets its own connection; SQLite serialises writers (busy timeout) and WAL lets
readers in other processes (the ``fleet`` CLI) read while the runner writes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from device.errors import DataError, SparseFleetError


class Database:
    """Connections to the SQLite file at ``path`` in WAL mode, with foreign keys on.

    ``busy_timeout_s`` (seconds) is how long a writer waits for another process's write
    transaction. Opening switches the file to WAL; DataError if the filesystem cannot (WAL needs
    shared memory, so a network filesystem is refused rather than silently unsafe).
    """

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        mode = self.conn().execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DataError(
                f"{self.path} cannot use WAL (journal_mode is {mode!r}); "
                "put the state directory on a local filesystem"
            )

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (made on first use); SparseFleetError once closed."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise SparseFleetError(f"store {self.path.parent} is closed")
        conn = sqlite3.connect(
            self.path,
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
    def write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable`` commits with synchronous=FULL (power-safe)."""
        conn = self.conn()
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
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs (joins an enclosing transaction)."""
        conn = self.conn()
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
        """Close every thread's connection; the database cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

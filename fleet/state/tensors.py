"""Content-addressed tensor files: ``tensors/ab/abcd...``, named by the SHA-256 of their bytes.

Files are immutable and written durably *before* any row names them (files first, then rows):
a temporary name in the same directory, fsync, rename to the digest, fsync the directory. A
file without a row is harmless garbage; a row never names a missing file. Identical content is
stored once. Reading verifies the digest, so a corrupt or missing file is a DataError, never
bytes that silently differ from what was stored.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
from pathlib import Path

from device.errors import DataError

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class TensorFiles:
    """The immutable files under ``directory`` (created if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the file with this SHA-256 hex digest lives (whether or not it exists)."""
        check_digest(digest)
        return self.directory / digest[:2] / digest

    def write(self, data: bytes) -> str:
        """Store ``data`` durably under its SHA-256 hex digest and return the digest.

        Temp file in the same directory, fsync, rename, fsync the directory: after return the
        file survives a power cut. Identical content is stored once (the second call only makes
        sure the existing file is durable).
        """
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        directory = path.parent
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            _fsync_dir(self.directory)
        if path.exists() and path.stat().st_size == len(data):
            # Its writer may have died between rename and directory fsync; make sure it is on
            # disk before a row names it.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(directory)
            return digest
        tmp = directory / f".{digest[:16]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return digest

    def read(self, digest: str) -> bytes:
        """The bytes stored under ``digest``; DataError if the file is missing or corrupt."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"tensor file {path} is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DataError(f"tensor file {path} is corrupt: its SHA-256 is {actual}")
        return data

    def remove_stale_temp_files(self) -> None:
        """Delete temp files of writers that died mid-write; a live writer's is left alone."""
        for tmp in self.directory.glob("*/.*.tmp"):
            parts = tmp.name.split(".")
            try:
                pid = int(parts[2])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)


def check_integrity(conn: sqlite3.Connection, files: TensorFiles) -> list[str]:
    """Problems found (empty when healthy): SQLite's integrity and foreign-key checks, and
    every row's tensor file present with the right digest. Reads every file; can be slow."""
    problems: list[str] = []
    for row in conn.execute("PRAGMA integrity_check"):
        if row[0] != "ok":
            problems.append(f"sqlite: {row[0]}")
    for row in conn.execute("PRAGMA foreign_key_check"):
        problems.append(f"foreign key: table {row[0]} rowid {row[1]} -> {row[2]}")
    digests = conn.execute(
        "SELECT payload_digest FROM updates UNION SELECT digest FROM checkpoints"
    ).fetchall()
    for (digest,) in digests:
        try:
            files.read(digest)
        except DataError as exc:
            problems.append(str(exc))
    return problems


def check_digest(digest: str) -> None:
    """ValueError unless ``digest`` is a lowercase SHA-256 hex string (64 characters)."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"digest {digest!r} is not a lowercase SHA-256 hex string")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""SHA-256 checksums of data files (``sha256sum`` format) and the atomic writes that keep them true.

A data directory may hold a ``SHA256SUMS`` file listing the digest of each file's stored bytes;
the loaders check a listed file against it before parsing it. Every file this package writes goes
through :func:`write_atomic` (temporary file, fsync, rename), so a file under its final name is
never half-written and a recorded digest always describes a whole file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from device.errors import DataError

__all__ = [
    "parse_sha256sums",
    "read_sha256sums",
    "sha256_file",
    "write_atomic",
    "write_sha256sums",
]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of the bytes of ``path`` as stored (not decompressed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def read_sha256sums(path: str | os.PathLike[str]) -> dict[str, str]:
    """File name -> lower-case hex SHA-256, from a ``sha256sum``-format file.

    Each non-blank line is ``<64 hex digits><space><space or *><file name>`` (the output of
    ``sha256sum FILES``); a leading ``./`` in the name is dropped.

    Raises:
        DataError: a line does not have that form, or a name is listed twice with different
            digests (the message names the file and line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read checksum file ({exc})") from exc
    return parse_sha256sums(text, str(path))


def parse_sha256sums(text: str, source: str) -> dict[str, str]:
    """:func:`read_sha256sums` of the text of such a file; ``source`` names it in errors."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line.rstrip("\r"))
        if match is None:
            raise DataError(
                f"{source}, line {number}: expected '<64 hex digits>  <file name>', got {line!r}"
            )
        digest, name = match.group(1).lower(), match.group(2).removeprefix("./")
        if sums.get(name, digest) != digest:
            raise DataError(f"{source}, line {number}: {name} listed twice with different digests")
        sums[name] = digest
    return sums


def write_sha256sums(directory: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """Record the SHA-256 of ``names`` (files in ``directory``) in ``directory/SHA256SUMS``.

    Entries already in a valid ``SHA256SUMS`` for other names are kept; the file is rewritten
    atomically, sorted by name. Returns its path.
    """
    directory = Path(directory)
    sums_path = directory / "SHA256SUMS"
    sums = read_sha256sums(sums_path) if sums_path.exists() else {}
    for name in names:
        sums[name] = sha256_file(directory / name)
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    write_atomic(sums_path, text.encode("utf-8"))
    return sums_path

"""IDX files, the container format of MNIST: strict reading, deterministic writing.

An IDX file is a magic number ``0x0000TTNN`` (type code ``TT``, ``NN`` dimensions), ``NN``
big-endian uint32 dimensions, then ``prod(dims)`` big-endian items; it may be gzipped (detected
by content, not by name).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device.data.checksums import write_atomic
from device.errors import DataError

__all__ = ["read_idx", "read_idx_with_digest", "write_idx"]

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}
# Refuse to allocate more than this for one IDX file: a corrupt header must not ask for 100 GB.
_MAX_IDX_BYTES = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"


def _open_idx(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading, through gzip when its content starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exactly(f: io.BufferedIOBase, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = f.read(min(remaining, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_idx_with_digest(path: Path) -> tuple[npt.NDArray[Any], str]:
    """:func:`read_idx`, plus the lower-case hex SHA-256 of the file's decompressed content
    (what :data:`device.data.mnist.MNIST_CONTENT_SHA256` lists), computed from the same read."""
    try:
        with _open_idx(path) as f:
            head = _read_exactly(f, 4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated IDX header ({len(head)} of 4 magic bytes)")
            if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES or head[3] == 0:
                raise DataError(
                    f"{path}: bad IDX magic number 0x{head.hex()} "
                    f"(expected 0x0000TTNN: type TT in {{08,09,0b,0c,0d,0e}}, NN >= 1 dimensions)"
                )
            dtype, ndim = _IDX_TYPES[head[2]], head[3]
            dim_bytes = _read_exactly(f, 4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = tuple(int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim))
            size = math.prod(dims) * dtype.itemsize
            if size > _MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: IDX header announces {dims} items ({size} bytes), more than the "
                    f"{_MAX_IDX_BYTES} bytes accepted"
                )
            payload = _read_exactly(f, size)
            if len(payload) < size:
                raise DataError(
                    f"{path}: IDX data truncated: header {dims} needs {size} bytes after the "
                    f"header, found {len(payload)}"
                )
            if f.read(1):
                raise DataError(
                    f"{path}: trailing bytes after the {size} data bytes that header {dims} "
                    f"announces"
                )
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated gzip stream raises EOFError.
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    digest = hashlib.sha256(head + dim_bytes + payload).hexdigest()
    array = np.frombuffer(bytearray(payload), dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False), digest


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """The array stored in IDX file ``path`` (gzipped or raw, detected by content), native order.

    The header is checked strictly: magic ``0x0000TTNN`` with a known type code ``TT`` and
    ``NN >= 1`` dimensions, and exactly ``prod(dims) * itemsize`` data bytes after it (a
    truncated file or trailing bytes are errors).

    Raises:
        DataError: the file cannot be read or is not a well-formed IDX file (message names it).
    """
    return read_idx_with_digest(Path(path))[0]


def write_idx(
    path: str | os.PathLike[str], array: npt.NDArray[Any], *, compress: bool = True
) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress``), atomically.

    Raises:
        ValueError: the dtype has no IDX type code (uint8, int8, int16, int32, float32, float64)
            or the array has no dimensions.
    """
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in _IDX_CODES or array.ndim == 0 or array.ndim > 255:
        raise ValueError(
            f"write_idx: cannot store dtype {array.dtype} with {array.ndim} dimensions"
        )
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    if compress:
        # mtime=0: the same array always gives the same bytes, hence the same SHA-256.
        data = gzip.compress(data, mtime=0)
    write_atomic(Path(path), data)

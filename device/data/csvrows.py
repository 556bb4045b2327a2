"""One CSV file's rows, parsed with the ``csv`` module and kept up to date as the file grows.

:class:`CsvTable` holds a file's parsed rows: features (float32), labels (class indices),
timestamps (float64 seconds, when a timestamp column is set) and each row's line number. Its
:meth:`~CsvTable.refresh` re-reads only what changed:

- the file's (device, inode, size, mtime) unchanged and every line parsed: nothing is read;
- the file grew and the bytes already parsed are unchanged (its first and last 4 KiB before the
  parsed offset are compared): only the appended rows are parsed;
- otherwise (rewritten, truncated, replaced): the whole file is parsed again.

A last line without a newline is a row being written: it is left for the next scan, unless the
file has not changed for :data:`~device.data.dircache.RACY_NS` (then the writer is done and the
line is the file's last row). The new bytes are decoded and parsed as a stream (1 MiB at a
time), never the whole file at once. Errors name the file and line: a missing column, a row
with the wrong number of fields, a feature that is not a finite number, a label outside the
run's classes, a bad timestamp, text that is not UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from device.data.dircache import RACY_NS
from device.data.labelspace import LabelSpace
from device.errors import DataError

__all__ = ["CsvColumns", "CsvTable", "parse_timestamp"]

_CsvReader = Any  # the csv module's reader type (``_csv.reader``) is not public
_CHECK_BYTES = 4096
_SEEK_BLOCK = 65536  # bytes read backwards at a time to find the last newline
_READ_BLOCK = 1 << 20  # bytes read at a time while parsing


class _Region(io.RawIOBase):
    """The next ``size`` bytes of ``f`` as a raw stream (stops there: the rest is unparsed)."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        super().__init__()
        self._f = f
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(view[:n])  # type: ignore[attr-defined]
        self._left -= got
        return int(got)


@dataclass(frozen=True)
class CsvColumns:
    """Which columns to read: ``label`` (required), ``features`` (``None``: every column but the
    label and the timestamp), ``timestamp`` (optional) and the ``delimiter``."""

    label: str
    features: tuple[str, ...] | None
    timestamp: str | None
    delimiter: str = ","


def parse_timestamp(text: str) -> float:
    """Seconds: a number as it is, else ISO 8601 (``2024-05-01T12:00:00Z``; naive is UTC).

    Raises ``ValueError`` for anything else."""
    try:
        value = float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text.strip())
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite time")
    return value


@dataclass(frozen=True)
class _Signature:
    dev: int
    ino: int
    size: int
    mtime_ns: int


class CsvTable:
    """The parsed rows of the CSV file ``path`` (see the module docstring).

    After :meth:`refresh`: ``features`` float32 ``[rows, F]``, ``labels`` int64 ``[rows]``,
    ``stamps`` float64 ``[rows]`` (``None`` without a timestamp column), ``lines`` int64
    ``[rows]`` (1-based line of each row; the header is line 1), ``feature_names``.
    """

    def __init__(self, path: str, columns: CsvColumns, labels: LabelSpace) -> None:
        self.path = path
        self._columns = columns
        self._label_space = labels
        self._reset()

    def _reset(self) -> None:
        self.feature_names: tuple[str, ...] = ()
        self.features: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)
        self.labels: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.stamps: npt.NDArray[np.float64] | None = None
        self.lines: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._header: tuple[int, int, list[int], int | None] | None = None  # see _read_header
        self._signature: _Signature | None = None
        self._offset = 0  # bytes parsed
        self._line = 0  # lines parsed
        self._ended_open = False  # the last parsed line had no newline
        self._head_digest = b""
        self._tail_digest = b""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def refresh(self) -> tuple[bool, int]:
        """Bring the rows up to date with the file: ``(changed, rows_parsed)``.

        Raises ``DataError`` naming the file (and line) when it cannot be read or parsed; the
        table is then empty until a refresh succeeds."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                signature = _Signature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if signature == self._signature and self._offset == signature.size:
                    return False, 0
                settled = time.time_ns() - st.st_mtime_ns > RACY_NS
                if not self._appended_only(f, signature):
                    self._reset()
                try:
                    parsed = self._parse(f, signature.size, settled)
                except BaseException:
                    self._reset()
                    raise
                self._signature = signature
                return True, parsed
        except OSError as exc:
            self._reset()
            raise DataError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None

    def _digest(self, f: BinaryIO, start: int, size: int) -> bytes:
        f.seek(start)
        return hashlib.blake2b(f.read(size), digest_size=16).digest()

    def _appended_only(self, f: BinaryIO, new: _Signature) -> bool:
        old = self._signature
        if old is None or self._ended_open or (old.dev, old.ino) != (new.dev, new.ino):
            return False
        if new.size < self._offset:
            return False
        head = min(self._offset, _CHECK_BYTES)
        tail_start = max(0, self._offset - _CHECK_BYTES)
        return (
            self._digest(f, 0, head) == self._head_digest
            and self._digest(f, tail_start, self._offset - tail_start) == self._tail_digest
        )

    def _complete_end(self, f: BinaryIO, size: int, settled: bool) -> int:
        """Where the parsable bytes after the offset end: after the last newline, or at the
        end of the file when it has settled (its last line then lacks only the newline)."""
        if settled:
            if size > self._offset:
                f.seek(size - 1)
                self._ended_open = f.read(1) != b"\n"
            return size
        end = size
        while end > self._offset:
            start = max(self._offset, end - _SEEK_BLOCK)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return self._offset

    def _parse(self, f: BinaryIO, size: int, settled: bool) -> int:
        end = self._complete_end(f, size, settled)
        f.seek(self._offset)
        # The csv module reads text: Python's buffered UTF-8 decoder over exactly the complete
        # lines (a BOM is dropped at the start of the file).
        text = io.TextIOWrapper(
            io.BufferedReader(_Region(f, end - self._offset), _READ_BLOCK),
            encoding="utf-8-sig" if self._offset == 0 else "utf-8",
            newline="",
        )
        reader = csv.reader(text, delimiter=self._columns.delimiter)
        base = self._line
        try:
            parsed = self._parse_rows(f, reader, base)
        except csv.Error as exc:
            raise DataError(f"{self.path}:{self._line}: not valid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            line = self._first_undecodable_line(f, base, end)
            raise DataError(f"{self.path}:{line}: not UTF-8 text ({exc.reason})") from None
        self._offset = end
        self._line = base + reader.line_num
        self._store_digests(f)
        return parsed

    def _first_undecodable_line(self, f: BinaryIO, base: int, end: int) -> int:
        """The line number of the first line after the offset that is not UTF-8 (the error
        path only: the decoder fails on a whole buffer and cannot say which line)."""
        f.seek(self._offset)
        line = base
        while f.tell() < end:
            line += 1
            try:
                f.readline().decode("utf-8")
            except UnicodeDecodeError:
                return line
        return line

    def _parse_rows(self, f: BinaryIO, reader: _CsvReader, base: int) -> int:
        """Parse the records of ``reader`` (lines after line ``base``); the hot loop keeps to
        locals and C calls, and computes line numbers only for messages and at the end."""
        if self._header is None:
            for row in reader:
                if row:  # blank lines before the header are skipped
                    self._line = base + reader.line_num
                    self._header = self._read_header(row)
                    break
            else:
                return 0
        width, label_at, feature_at, stamp_at = self._header
        pick = operator.itemgetter(*feature_at) if len(feature_at) > 1 else None
        features: list[Sequence[float]] = []
        labels: list[int] = []
        stamps: list[str] = []
        lines: list[int] = []
        index = self._label_space.positions
        for row in reader:
            if len(row) != width:
                if not row:
                    continue  # a blank line
                self._line = base + reader.line_num
                raise DataError(
                    f"{self.path}:{self._line}: {len(row)} fields, the header has {width}"
                )
            try:
                values = (
                    tuple(map(float, pick(row)))
                    if pick is not None
                    else (float(row[feature_at[0]]),)
                )
            except ValueError:
                self._line = base + reader.line_num
                raise self._not_a_number(row, feature_at) from None
            label = index.get(row[label_at])
            if label is None:
                self._line = base + reader.line_num
                raise self._label_space.outside(repr(row[label_at]), f"{self.path}:{self._line}")
            features.append(values)
            labels.append(label)
            lines.append(reader.line_num)
            if stamp_at is not None:
                stamps.append(row[stamp_at])
        line_numbers = np.asarray(lines, dtype=np.int64) + base
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
            new = np.asarray(features, dtype=np.float32)
        new = new.reshape(len(features), len(self.feature_names))
        self._check_finite(new, line_numbers)
        self._append(new, labels, self._stamps(stamps, line_numbers), line_numbers)
        return len(labels)

    def _store_digests(self, f: BinaryIO) -> None:
        head = min(self._offset, _CHECK_BYTES)
        tail_start = max(0, self._offset - _CHECK_BYTES)
        self._head_digest = self._digest(f, 0, head)
        self._tail_digest = self._digest(f, tail_start, self._offset - tail_start)

    def _not_a_number(self, row: list[str], feature_at: list[int]) -> DataError:
        for name, at in zip(self.feature_names, feature_at, strict=True):
            try:
                float(row[at])
            except ValueError:
                return DataError(
                    f"{self.path}:{self._line}: column {name!r}: {row[at]!r} is not a number"
                )
        return DataError(f"{self.path}:{self._line}: a feature is not a number")  # unreachable

    def _check_finite(self, rows: npt.NDArray[np.float32], lines: npt.NDArray[np.int64]) -> None:
        """A NaN or infinity (or a value beyond float32) would poison training: refused."""
        bad = np.argwhere(~np.isfinite(rows))
        if bad.size:
            row, column = (int(v) for v in bad[0])
            raise DataError(
                f"{self.path}:{lines[row]}: column {self.feature_names[column]!r}: "
                f"{rows[row, column]} is not a finite float32 number"
            )

    def _stamps(
        self, stamps: list[str], lines: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64] | None:
        if self._columns.timestamp is None:
            return None
        try:
            values = np.asarray(stamps, dtype=np.float64)  # the fast path: numeric times
        except ValueError:
            values = np.empty(len(stamps), dtype=np.float64)
            for i, text in enumerate(stamps):
                try:
                    values[i] = parse_timestamp(text)
                except ValueError:
                    raise DataError(
                        f"{self.path}:{lines[i]}: column {self._columns.timestamp!r}: "
                        f"{text!r} is neither a number nor an ISO 8601 time"
                    ) from None
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise DataError(
                f"{self.path}:{lines[int(bad[0])]}: column {self._columns.timestamp!r}: "
                f"{stamps[int(bad[0])]!r} is not a finite time"
            )
        return values

    def _read_header(self, row: list[str]) -> tuple[int, int, list[int], int | None]:
        """``(width, label index, feature indices, timestamp index)`` from the header row."""
        names = [name.strip() for name in row]
        position = {name: i for i, name in enumerate(names)}
        columns = self._columns
        wanted = [columns.label] + ([columns.timestamp] if columns.timestamp else [])
        wanted += list(columns.features or ())
        missing = [name for name in wanted if name not in position]
        if missing:
            setting = (
                "label_column"
                if missing[0] == columns.label
                else ("timestamp_column" if missing[0] == columns.timestamp else "feature_columns")
            )
            raise DataError(
                f"{self.path}: no column {missing[0]!r} (data.{setting}); the header has: "
                + ", ".join(names)
            )
        feature_names = columns.features or tuple(
            n for n in names if n not in (columns.label, columns.timestamp)
        )
        if not feature_names:
            raise DataError(f"{self.path}: no feature columns besides the label and timestamp")
        self.feature_names = tuple(feature_names)
        stamp_at = position[columns.timestamp] if columns.timestamp else None
        return len(names), position[columns.label], [position[n] for n in feature_names], stamp_at

    def _append(
        self,
        new: npt.NDArray[np.float32],
        labels: list[int],
        stamps: npt.NDArray[np.float64] | None,
        lines: npt.NDArray[np.int64],
    ) -> None:
        self.features = new if not len(self) else np.concatenate([self.features, new])
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=np.int64)])
        self.lines = np.concatenate([self.lines, lines])
        if stamps is not None:
            old = self.stamps if self.stamps is not None else np.zeros(0)
            self.stamps = np.concatenate([old, stamps])

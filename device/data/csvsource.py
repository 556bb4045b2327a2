"""``format: csv``: one example per row, or time-series windows of timestamp-ordered rows.

``path`` is one ``.csv`` file or a directory of them (walked recursively; hidden files skipped).
Every file has a header row naming its columns. Each file is its own series: rows are ordered
by ``timestamp_column`` when set (stable: equal times keep file order), else kept in file order,
and windows never span two files (one file per recording, session or day).

Examples:
    - without ``window``: one row, features ``[F]`` (the ``feature_columns``, in that order);
    - with ``window: W``: rows ``s .. s+W-1`` for ``s = 0, stride, 2*stride, ...`` while the
      window fits, features ``[F, W]`` (channels x time, what ``Conv1d`` takes). Its label is
      the label of its last row (``window_label: last``, the default: the activity at the end
      of the window) or the most frequent label in it (``majority``; a tie goes to the class
      listed first in ``classes``).

Identity (what the split hashes): ``FILE:LINE`` of the example's (first) row, FILE relative to
``path``. Rows appended to a file keep every earlier example's identity, so the split is stable
as data grows. With ``stride < window`` neighbouring windows share rows and may fall on
different sides of the split: the evaluation then overlaps training data.

Every row of every file must hold a label in the run's classes, also rows no window ends on.
Rows are parsed at scan time (:class:`~device.data.csvrows.CsvTable`: appended rows only) into
float32 arrays; windows are cut when examples are decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from device.data.csvrows import CsvColumns, CsvTable
from device.data.dataset import IndexArray
from device.data.dircache import DirectoryCache
from device.data.local_source import LocalSource, Snapshot, Work
from device.data.local_spec import LocalDataSpec
from device.errors import DataError

__all__ = ["CsvSource", "window_labels"]


def window_labels(
    labels: npt.NDArray[np.int64], starts: IndexArray, window: int, rule: str, num_classes: int
) -> IndexArray:
    """The label of each window ``labels[s : s + window]``: its last row's (``rule="last"``) or
    the most frequent (``"majority"``, ties to the lowest class index)."""
    if rule == "last":
        return np.asarray(labels[starts + window - 1], dtype=np.int64)
    rows = labels[starts[:, None] + np.arange(window)]
    counts = np.stack([(rows == k).sum(axis=1) for k in range(num_classes)], axis=1)
    winner: IndexArray = counts.argmax(axis=1).astype(np.int64)
    return winner


class _WindowDecoder:
    """Cuts examples out of one snapshot's rows: ``rows[start : start + width]``."""

    def __init__(
        self, rows: npt.NDArray[np.float32], starts: IndexArray, labels: IndexArray, window: int
    ) -> None:
        self._rows = rows
        self._starts = starts
        self._labels = labels
        self._window = window  # 0: one row per example, features [F]

    def __call__(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts[positions]
        if self._window == 0:
            x = self._rows[starts]
        else:
            # [B, W, F] -> [B, F, W]: channels first, time last.
            x = np.ascontiguousarray(
                self._rows[starts[:, None] + np.arange(self._window)].transpose(0, 2, 1)
            )
        return torch.from_numpy(x), torch.from_numpy(self._labels[positions])


class CsvSource(LocalSource):
    """CSV rows or windows of them (see the module docstring)."""

    def __init__(self, spec: LocalDataSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None and spec.label_column is not None  # the spec checks both
        self.path: Path = spec.path
        self._columns = CsvColumns(
            label=spec.label_column,
            features=spec.feature_columns,
            timestamp=spec.timestamp_column,
            delimiter=spec.delimiter or ",",
        )
        self._tree = DirectoryCache(self.path, (".csv",))
        self._tables: dict[str, CsvTable] = {}
        self._cached: Snapshot | None = None

    def _files(self) -> tuple[list[tuple[str, str]], int, int]:
        """``([(relative name, full path)], directories listed, reused)``."""
        if self.path.is_file():
            return [(self.path.name, str(self.path))], 0, 0
        if not self.path.is_dir():
            raise DataError(f"data.path {self.path} does not exist (a .csv file or a directory)")
        try:
            tree = self._tree.scan()
        except OSError as exc:
            raise DataError(f"data.path {self.path}: cannot be read ({exc.strerror})") from None
        files = [(rel, str(self.path / rel)) for listing in tree.listings for rel in listing.files]
        if not files:
            raise DataError(f"data.path {self.path}: no *.csv files in this directory")
        return files, tree.listed, tree.reused

    def _rescan(self) -> tuple[Snapshot, Work]:
        files, _, _ = self._files()
        tables: dict[str, CsvTable] = {}
        parsed = rows_read = 0
        for rel, full in files:
            table = self._tables.get(rel) or CsvTable(full, self._columns, self.label_space)
            changed, rows = table.refresh()
            parsed += changed
            rows_read += rows
            tables[rel] = table
        unchanged = parsed == 0 and tables.keys() == self._tables.keys()
        self._tables = tables
        if not unchanged or self._cached is None:
            self._cached = self._build(tables)
        return self._cached, Work(parsed, len(files) - parsed, rows_read)

    def _build(self, tables: dict[str, CsvTable]) -> Snapshot:
        first_rel = next(iter(tables))
        # The reference header: the first file that has one (a new file may be empty so far).
        first = next((t for t in tables.values() if t.feature_names), tables[first_rel])
        window = self.spec.window or 0
        span = max(window, 1)
        stride = self.spec.window_stride
        blocks: list[npt.NDArray[np.float32]] = []
        labels: list[npt.NDArray[np.int64]] = []
        starts: list[IndexArray] = []
        identities: list[str] = []
        offset = 0
        for rel, table in tables.items():
            if table.feature_names and table.feature_names != first.feature_names:
                raise DataError(
                    f"{table.path}: feature columns {', '.join(table.feature_names)} differ from "
                    f"{first.path}'s ({', '.join(first.feature_names)}); set "
                    "data.feature_columns to choose them"
                )
            order = (
                np.argsort(table.stamps, kind="stable")
                if table.stamps is not None
                else np.arange(len(table))
            )
            local = np.arange(0, len(table) - span + 1, stride, dtype=np.int64)
            blocks.append(table.features[order])
            labels.append(table.labels[order])
            lines = table.lines[order][local]
            identities.extend(f"{rel}:{line}" for line in lines.tolist())
            starts.append(local + offset)
            offset += len(table)
        if not identities:
            rows = sum(len(t) for t in tables.values())
            what = f"no complete window of {window} rows" if window else "no data rows"
            raise DataError(
                f"data.path {self.path}: {what} ({rows} rows in {len(tables)} file(s), "
                f"first {first_rel})"
            )
        all_rows = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        all_labels = np.concatenate(labels) if len(labels) > 1 else labels[0]
        all_starts = np.concatenate(starts)
        example_labels = window_labels(
            all_labels,
            all_starts,
            span,
            self.spec.window_label or "last",
            len(self.label_space),
        )
        decoder = _WindowDecoder(all_rows, all_starts, example_labels, window)
        # Windows are gathered [B, W, F], then transposed into a copy: twice the result.
        return Snapshot(identities, example_labels, decoder, chunk=1024 if window else None)

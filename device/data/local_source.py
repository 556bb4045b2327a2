"""What every device-local data source shares: scanning, the split, and lazy examples.

A :class:`LocalSource` (one subclass per format) turns its origin into a :class:`Snapshot` on
each :meth:`~LocalSource.scan`: the identity and label of every example, and a function that
decodes examples by position. Nothing heavy happens at scan time: images are decoded, npz rows
read, and python datasets indexed only when :class:`LocalExamples` are asked for them.

Invariants of a snapshot: identities are distinct; ``labels`` (when known without decoding) lie
in ``[0, num_classes)``; every decoded example has the same shape; a snapshot never changes
(the next scan makes a new one), so examples handed out keep working while the data grows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.utils.data

from device.data.dataset import Dataset, IndexArray
from device.data.labelspace import LabelSpace
from device.data.local_spec import LocalDataSpec
from device.data.local_split import SplitMemo
from device.data.spool import Spool, spooled_tensor
from device.errors import DataError

__all__ = ["Decoder", "LocalExamples", "LocalSource", "ScanResult", "Snapshot"]

#: Positions into a snapshot -> ``(x, y)``: float32 ``[B, *example_shape]`` and int64 ``[B]``.
Decoder = Callable[[IndexArray], tuple[torch.Tensor, torch.Tensor]]

#: Decoded bytes per decode call when a side is spooled to a file (its temporaries' bound).
SPOOL_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The examples one scan found. ``identities[i]`` names example ``i`` (a relative path and
    row, stable across scans); ``labels[i]`` is its class index, or ``labels`` is ``None`` when
    labels are known only by decoding (python datasets); ``decode`` reads examples by position.
    """

    identities: Sequence[str]
    labels: IndexArray | None
    decode: Decoder
    #: Examples per ``decode`` call when decoding everything (``None``: all in one call, when a
    #: call's temporaries are no bigger than its result; a number where they are, so that the
    #: peak stays the result plus one chunk's temporaries).
    chunk: int | None = None

    def __len__(self) -> int:
        return len(self.identities)


@dataclass(frozen=True)
class ScanResult:
    """One scan's outcome.

    ``examples`` is the count the device reports (``train + evaluation``; a round update
    reports ``train``, the examples it trained on, which weight aggregation). ``added`` and
    ``removed`` count examples new since / gone since the previous scan (all are added at the
    first). The work done: ``listed`` (directories listed for an image folder; files parsed for
    csv and npz; 1 for python, the call of its function), ``reused`` (directories or files whose
    cached result was kept unchanged) and ``rows_read`` (CSV rows parsed, npz labels read).
    """

    examples: int
    train: int
    evaluation: int
    added: int
    removed: int
    listed: int
    reused: int
    rows_read: int = 0


@dataclass(frozen=True)
class Work:
    """A format's share of :class:`ScanResult`: the work its scan did."""

    listed: int
    reused: int
    rows_read: int = 0


class LocalExamples(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """One side of a source's split as of one scan: a map-style torch ``Dataset`` of
    ``(x, label)`` (``x`` float32, ``label`` an int in ``[0, num_classes)``) that decodes on
    access, plus :meth:`batch` (decode many at once) and :meth:`to_dataset` (decode all into
    the project's :class:`~device.data.dataset.Dataset`, what the trainer takes today).

    Raises :class:`DataError` from decoding, naming the file (or setting) and example.
    """

    def __init__(
        self, snapshot: Snapshot, positions: IndexArray, num_classes: int, side: str
    ) -> None:
        self._snapshot = snapshot
        self._positions = positions
        self.num_classes = num_classes
        self.side = side  # "train" or "evaluation", for messages

    def __len__(self) -> int:
        return int(self._positions.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)} ({self.side})")
        x, y = self.batch([index])
        return x[0], int(y[0])

    def batch(
        self, indices: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``indices`` (positions in this side, any order) as ``(x [B, ...], y [B])``."""
        index = np.asarray(indices.numpy() if isinstance(indices, torch.Tensor) else indices)
        if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
            raise DataError(f"batch indices must be 1-D integers, got {index.dtype} {index.shape}")
        return self._snapshot.decode(self._positions[index.astype(np.int64)])

    def identities(self) -> list[str]:
        """Each example's identity, in order (``cat/0001.png``, ``log.csv:812``, ``a.npz#17``)."""
        return [self._snapshot.identities[int(p)] for p in self._positions]

    def labels(self) -> IndexArray:
        """Each example's class index (int64, a copy); decodes only for python datasets."""
        if self._snapshot.labels is not None:
            return self._snapshot.labels[self._positions].copy()
        return self.to_dataset().labels()

    def to_dataset(self, *, chunk: int | None = None, spool: Spool | None = None) -> Dataset:
        """Every example decoded into one :class:`Dataset`, ``chunk`` examples per decode call
        (default: the format's :attr:`Snapshot.chunk`); chunks are written into one
        preallocated tensor, so the peak is the data plus one chunk's temporaries. With
        ``spool``, a side larger than its ``in_memory_mb`` is decoded into a file-backed
        tensor instead (:mod:`device.data.spool`): its memory is then the page cache's.

        Raises:
            DataError: this side holds no example, decoding failed, or the spool has no room.
        """
        n = len(self)
        if not n:
            raise DataError(f"the {self.side} split holds no examples")
        x_all = torch.empty(0)
        y_all = torch.empty(n, dtype=torch.int64)
        chunk = chunk or self._snapshot.chunk or n
        if spool is not None:
            # One example tells the side's size; a spooled side is decoded a few MiB at a time
            # (a format that decodes all at once would otherwise hold it in memory anyway).
            probe, _ = self.batch(np.arange(1))
            shape = (n, *probe.shape[1:])
            if spool.wants(shape):
                x_all = spooled_tensor(shape, spool.directory)
                chunk = min(chunk, max(1, SPOOL_CHUNK_BYTES // max(1, probe[0].numel() * 4)))
        for first in range(0, n, chunk):
            x, y = self.batch(np.arange(first, min(first + chunk, n)))
            if not first and not x_all.numel():
                shape = (n, *x.shape[1:])
                x_all = x if len(x) == n else torch.empty(shape, dtype=torch.float32)
            if x.shape[1:] != x_all.shape[1:]:
                raise DataError(
                    f"examples of the {self.side} split differ in shape: "
                    f"{tuple(x_all.shape[1:])} and {tuple(x.shape[1:])}"
                )
            if x_all is not x:
                x_all[first : first + len(x)] = x
            y_all[first : first + len(y)] = y
        return Dataset(x_all, y_all, self.num_classes)


class LocalSource(abc.ABC):
    """A device's own data in one format: :meth:`scan` before each job (cheap when nothing
    changed), then :meth:`train` / :meth:`evaluation`.

    ``scan`` raises :class:`DataError` naming the path or setting when the data is missing,
    empty or holds a label outside the run's classes; the previous snapshot stays in use until
    a scan succeeds. Not thread-safe: one job at a time.
    """

    def __init__(self, spec: LocalDataSpec) -> None:
        if spec.classes is None:
            raise DataError(
                "data.classes is not set: the run's label space (class names, in order) is "
                "needed to read labels"
            )
        self.spec = spec
        self.label_space = LabelSpace(spec.classes)
        self._memo = SplitMemo(seed=spec.seed, eval_fraction=spec.eval_fraction)
        self._snapshot: Snapshot | None = None
        self._is_eval: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self._last: ScanResult | None = None

    @abc.abstractmethod
    def _rescan(self) -> tuple[Snapshot, Work]:
        """Re-read the origin (reusing what is unchanged): the new snapshot and the work done.

        Raises ``DataError`` for missing or empty data (a snapshot is never empty)."""

    @property
    def where(self) -> str:
        """The data's location as messages name it."""
        return (
            str(self.spec.path)
            if self.spec.path is not None
            else f"data.function {self.spec.function}"
        )

    def scan(self) -> ScanResult:
        """Re-read the origin; the examples and counts that :meth:`train`, :meth:`evaluation`
        and :attr:`num_examples` give until the next scan."""
        snapshot, work = self._rescan()
        if not len(snapshot):
            raise DataError(f"{self.where}: no examples")
        is_eval, added, removed = self._memo.sides(snapshot.identities)
        n_eval = int(is_eval.sum())
        self._snapshot, self._is_eval = snapshot, is_eval
        self._last = ScanResult(
            examples=len(snapshot),
            train=len(snapshot) - n_eval,
            evaluation=n_eval,
            added=added,
            removed=removed,
            listed=work.listed,
            reused=work.reused,
            rows_read=work.rows_read,
        )
        return self._last

    @property
    def last_scan(self) -> ScanResult | None:
        """The latest successful scan's result (``None`` before the first)."""
        return self._last

    @property
    def num_examples(self) -> int:
        """Examples found by the latest scan, both sides (scans first if never scanned)."""
        return len(self._current())

    def train(self) -> LocalExamples:
        """The training side of the latest scan (scans first if never scanned)."""
        snapshot = self._current()
        return LocalExamples(
            snapshot,
            np.flatnonzero(~self._is_eval).astype(np.int64),
            len(self.label_space),
            "train",
        )

    def evaluation(self) -> LocalExamples:
        """The evaluation side of the latest scan (empty when ``eval_fraction`` is 0)."""
        snapshot = self._current()
        return LocalExamples(
            snapshot,
            np.flatnonzero(self._is_eval).astype(np.int64),
            len(self.label_space),
            "evaluation",
        )

    def _current(self) -> Snapshot:
        if self._snapshot is None:
            self.scan()
        assert self._snapshot is not None
        return self._snapshot

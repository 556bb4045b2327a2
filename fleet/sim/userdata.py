"""A user's dataset, in one of the device-local formats, split into per-device directories.

A simulation over ``data: {dataset: imagefolder|csv|npz|python, ...}`` runs its devices on the
same code path as a real device: each simulated device reads its own directory with a
:class:`~device.local_data.LocalData` source, re-scanned before each job. :func:`materialise`
makes those directories from the user's data:

1. the whole dataset is read as a device would read it (``LocalDataSpec`` of the run file's
   ``data`` section). When the fleet manager evaluates on a test set (``data.evaluate``), the
   evaluation side of that split (``eval_fraction``, ``seed``) is its test set and only the
   training side is handed out; otherwise every example is;
2. the examples handed out are partitioned over the devices by label (``iid``, ``shards``,
   ``dirichlet``: ``device.data.partitioners``, seeded from the dataset and ``SimSpec.seed``);
3. each device's examples are written to ``root/DEVICE_ID/`` in the format it then reads:

   - ``imagefolder``: a tree of symbolic links ``CLASS/.../NAME`` to the user's images (nothing
     is copied; the device decodes with the run file's ``resize``/``channels``/``mean``/``std``);
   - ``csv``: CSV files with the user's header and the device's rows as written (in the
     timestamp order when ``timestamp_column`` is set). With ``window``, every run of the
     device's consecutive windows of one file becomes a file of its own, so that the device
     cuts exactly those windows again and no window spans two devices' rows;
   - ``npz`` and ``python``: one ``part.npz`` with the device's decoded examples ``x`` (float32)
     and labels ``y`` (class indices); the device reads it as ``format: npz``.

Each device splits its own examples again for federated evaluation, with the same
``eval_fraction`` and a seed of its own (the identities of its files are new). The directories
are rebuilt from scratch on every call (a resumed simulation gets the same ones).
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device.data import LocalDataSpec, LocalExamples, open_source, partition
from device.data.csvrows import parse_timestamp
from device.errors import DataError
from device.local_data import DataCounts, LocalData
from device.seeding import derive_seed

__all__ = ["DeviceDirectories", "local_spec", "materialise"]

_NPZ_NAME = "part.npz"


def local_spec(dataset: str, data_dir: Path | None, options: Mapping[str, Any]) -> LocalDataSpec:
    """The ``LocalDataSpec`` of a run file's data section: format ``dataset`` at ``data_dir``
    with ``options`` (``classes``, ``eval_fraction``, ``seed`` and the format's own)."""
    return LocalDataSpec(format=dataset, path=data_dir, **options)  # type: ignore[arg-type]


def materialise(
    spec: LocalDataSpec,
    root: Path,
    device_ids: list[str],
    *,
    partitioner: str,
    partition_options: Mapping[str, Any],
    seed: int,
    hold_out: bool,
) -> list[LocalDataSpec]:
    """Write each device's share of ``spec``'s data under ``root`` (module docstring); the
    specs the devices read, in ``device_ids`` order. ``hold_out``: keep the evaluation side
    of ``spec``'s split for the fleet manager's test set.

    Raises:
        DataError: the data cannot be read, or a device would get no example.
        ValueError, ConfigError: the partitioner refuses its options.
    """
    source = open_source(spec if hold_out else dataclasses.replace(spec, eval_fraction=0.0))
    source.scan()
    examples = source.train()
    labels = examples.labels()
    parts = partition(
        partitioner,
        labels,
        len(device_ids),
        seed=derive_seed("partition", spec.format, seed),
        **dict(partition_options),
    )
    if root.exists():
        shutil.rmtree(root)
    specs = []
    identities = examples.identities()
    for index, (device_id, part) in enumerate(zip(device_ids, parts, strict=True)):
        if not len(part):
            raise DataError(
                f"device {device_id} gets no example of {source.where} ({len(labels)} examples "
                f"over {len(device_ids)} devices with partitioner {partitioner}); use fewer "
                "devices or another partition"
            )
        directory = root / device_id
        directory.mkdir(parents=True)
        device_spec = dataclasses.replace(spec, path=directory, seed=derive_seed(seed, index))
        if spec.format == "imagefolder":
            _link_images(spec, [identities[int(i)] for i in part], directory)
        elif spec.format == "csv":
            _write_csv(spec, [identities[int(i)] for i in part], directory)
        else:
            _write_npz(examples, part, directory)
            device_spec = LocalDataSpec(
                format="npz",
                path=directory,
                classes=spec.classes,
                eval_fraction=spec.eval_fraction,
                seed=derive_seed(seed, index),
            )
        specs.append(device_spec)
    return specs


def _link_images(spec: LocalDataSpec, identities: list[str], directory: Path) -> None:
    """Symbolic links ``directory/REL`` -> ``spec.path/REL`` (``REL`` = ``CLASS/.../NAME``)."""
    assert spec.path is not None
    origin = spec.path.resolve()
    for rel in identities:
        link = directory / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(origin / rel)


def _write_npz(examples: LocalExamples, positions: npt.NDArray[np.int64], directory: Path) -> None:
    x, y = examples.batch(positions)
    np.savez(directory / _NPZ_NAME, x=x.numpy().astype(np.float32), y=y.numpy())


@dataclass(frozen=True)
class _CsvFile:
    """One CSV file of the user's: its header and its rows in the source's order, with the
    line each row ends on (what identities name)."""

    header: list[str]
    rows: list[list[str]]
    position: dict[int, int]  # line -> index into rows


def _read_csv(path: Path, spec: LocalDataSpec) -> _CsvFile:
    delimiter = spec.delimiter or ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next((row for row in reader if row), [])  # blank lines before it skipped
        rows: list[list[str]] = []
        lines: list[int] = []
        for row in reader:
            if not row:
                continue
            rows.append(row)
            lines.append(reader.line_num)
    order = list(range(len(rows)))
    if spec.timestamp_column is not None:
        column = header.index(spec.timestamp_column)
        stamps = [parse_timestamp(row[column]) for row in rows]
        order.sort(key=lambda i: stamps[i])  # stable, as the device's ordering
    ordered = [rows[i] for i in order]
    return _CsvFile(header, ordered, {lines[i]: k for k, i in enumerate(order)})


def _write_csv(spec: LocalDataSpec, identities: list[str], directory: Path) -> None:
    """The device's rows (or runs of windows) of each of the user's CSV files (identities
    ``FILE:LINE``)."""
    assert spec.path is not None
    by_file: dict[str, list[int]] = {}
    for identity in identities:
        rel, _, line = identity.rpartition(":")
        by_file.setdefault(rel, []).append(int(line))
    for rel, lines in by_file.items():
        path = spec.path if spec.path.is_file() else spec.path / rel
        table = _read_csv(path, spec)
        starts = sorted(table.position[line] for line in lines)
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not spec.window:
            _write_rows(target, table.header, [table.rows[s] for s in starts], spec)
            continue
        stride = spec.window_stride
        runs: list[list[int]] = [[starts[0]]]
        for start in starts[1:]:
            if start - runs[-1][-1] == stride:
                runs[-1].append(start)
            else:
                runs.append([start])
        for n, run in enumerate(runs):
            rows = table.rows[run[0] : run[-1] + spec.window]
            _write_rows(target.with_name(f"{target.stem}.{n:05d}.csv"), table.header, rows, spec)


def _write_rows(path: Path, header: list[str], rows: list[list[str]], spec: LocalDataSpec) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=spec.delimiter or ",")
        writer.writerow(header)
        writer.writerows(rows)


class DeviceDirectories:
    """The simulated devices' data: device ``i`` reads ``specs[i]`` (its materialised
    directory) with a :class:`~device.local_data.LocalData` source, made once per process.
    Picklable: only the specs travel to the device processes.

    The sources leave ``classes`` to the run, as a device config that does not list them: a
    simulated device learns its label space from the run's model snapshot, as a real one does
    (``counts`` scans with the specs' classes, for the first status only)."""

    def __init__(self, specs: list[LocalDataSpec]) -> None:
        self.specs = specs
        self._sources: dict[int, LocalData] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"specs": self.specs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["specs"])  # type: ignore[misc]

    def source_for(self, index: int) -> LocalData:
        """Device ``index``'s data source."""
        with self._lock:
            if index not in self._sources:
                spec = dataclasses.replace(self.specs[index], classes=None)
                self._sources[index] = LocalData(spec)
            return self._sources[index]

    def counts(self, index: int) -> DataCounts:
        """Device ``index``'s examples now (a scan of its directory)."""
        return LocalData(self.specs[index]).refresh()

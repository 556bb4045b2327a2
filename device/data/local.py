"""Device-local data: open a :class:`LocalDataSpec` as the source of its format.

Wiring, for a device (the config holds a ``LocalDataSpec``; the run supplies the classes)::

    source = open_source(spec.with_classes(run_classes))   # once, at start
    counts = source.scan()             # before each job: picks up new data, cheaply
    data = source.train().to_dataset() # what train_round takes; report counts.train
    held_out = source.evaluation()     # for an EvaluateCommand (len() is its example count)

and for a simulation, through the dataset registry: ``load_dataset("imagefolder", data_dir,
split, classes=[...], resize=[28, 28])`` (``split="test"`` is the evaluation side), see
:func:`load_local`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from device.data.csvsource import CsvSource
from device.data.dataset import Dataset, Split, check_split
from device.data.dircache import DirectoryCache
from device.data.imagefolder import ImageFolderSource
from device.data.local_source import LocalSource
from device.data.local_spec import IMAGE_SUFFIXES, LocalDataSpec
from device.data.npzsource import NpzSource
from device.data.pysource import PythonSource
from device.errors import DataError

__all__ = ["SOURCES", "check_local", "load_local", "open_source"]

#: format -> the source class that reads it.
SOURCES: dict[str, type[LocalSource]] = {
    "imagefolder": ImageFolderSource,
    "csv": CsvSource,
    "npz": NpzSource,
    "python": PythonSource,
}

_SUFFIXES = {"imagefolder": IMAGE_SUFFIXES, "csv": (".csv",), "npz": (".npz",)}


def open_source(spec: LocalDataSpec) -> LocalSource:
    """The source for ``spec``'s format; nothing is read until its first ``scan()``.

    Raises:
        DataError: ``spec.classes`` is not set (the run's label space is needed).
    """
    return SOURCES[spec.format](spec)


def load_local(
    fmt: str, data_dir: str | os.PathLike[str] | None, split: Split, **options: Any
) -> Dataset:
    """One side of a local source, decoded: ``split="train"`` the training side, ``"test"``
    the evaluation side. ``options`` are the spec's other settings (``classes`` required).

    Raises:
        ValueError: an unknown split or an invalid setting (``SettingError`` names it).
        DataError: as the source's scan or decoding raises it.
    """
    check_split(split)
    path = Path(data_dir) if data_dir is not None else None
    spec = LocalDataSpec(format=fmt, path=path, **options)  # type: ignore[arg-type]
    source = open_source(spec)
    source.scan()
    side = source.train() if split == "train" else source.evaluation()
    return side.to_dataset(spool=spec.spool)


def check_local(fmt: str, data_dir: str | os.PathLike[str] | None) -> None:
    """Cheap check that format ``fmt`` has data at ``data_dir``: the path exists and (for a
    directory) holds at least one file it reads, listing directories only.

    Raises:
        DataError: naming the path (or saying that none was given).
    """
    if fmt == "python":
        return  # the function is the origin; only calling it tells
    if data_dir is None:
        raise DataError(f"format {fmt} reads files from a path, and none was given (data_dir)")
    path = Path(data_dir)
    if path.is_file() and fmt != "imagefolder":
        return
    if not path.is_dir():
        raise DataError(f"data.path {path} does not exist")
    tree = DirectoryCache(path, _SUFFIXES[fmt]).scan()
    if fmt == "imagefolder":
        found = any(listing.rel_dir for listing in tree.listings)
    else:
        found = bool(tree.listings)
    if not found:
        pattern = "CLASS_NAME/*.png" if fmt == "imagefolder" else f"*{_SUFFIXES[fmt][0]}"
        raise DataError(f"data.path {path}: no files ({pattern}) for format {fmt}")

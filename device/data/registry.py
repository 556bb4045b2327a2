"""The dataset registry: a dataset's name -> its loader, and :func:`load_dataset`.

Where new data sources go: the device-local formats of the next issue (``imagefolder``, ``csv``
with time-series windowing, ``npz``, ``python``) each get a module of their own in this package
(e.g. ``device/data/imagefolder.py``, returning a :class:`~device.data.dataset.Dataset`) and one
entry in :data:`DATASETS` here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from device.data.dataset import Dataset, Split, check_split
from device.data.digits import load_digits
from device.data.mnist import MNIST_FILES, load_mnist, mnist_files
from device.errors import DataError

__all__ = ["DATASETS", "check_dataset", "dataset_names", "load_dataset"]


def _mnist_dir(data_dir: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if data_dir is None:
        raise DataError(
            "dataset 'mnist' reads IDX files from a directory, and none was given: pass "
            "data_dir (the CLI's --data-dir); files expected there: "
            + ", ".join(f"{n}.gz" for pair in MNIST_FILES.values() for n in pair)
        )
    return data_dir


def _load_mnist_entry(
    data_dir: str | os.PathLike[str] | None, split: Split, **kwargs: Any
) -> Dataset:
    return load_mnist(_mnist_dir(data_dir), split=split, **kwargs)


def _check_mnist(data_dir: str | os.PathLike[str] | None, split: Split) -> None:
    mnist_files(_mnist_dir(data_dir), split)


def _load_digits_entry(
    data_dir: str | os.PathLike[str] | None, split: Split, **kwargs: Any
) -> Dataset:
    del data_dir  # bundled with scikit-learn: no directory to read
    return load_digits(split=split, **kwargs)


#: name -> loader ``(data_dir, split, **kwargs) -> Dataset``.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": _load_mnist_entry,
    "digits": _load_digits_entry,
}


#: name -> a cheap check ``(data_dir, split) -> None`` that the files the loader reads are
#: there (``DataError`` if not), without reading them; datasets without files have none.
CHECKS: dict[str, Callable[[str | os.PathLike[str] | None, Split], None]] = {
    "mnist": _check_mnist,
}


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None, split: Split) -> None:
    """Raise ``DataError`` when dataset ``name``'s ``split`` cannot be read from ``data_dir``
    (what `fleet config check` asks before a run needs the data); ``ValueError`` for an unknown
    name or split."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    check_split(split)
    check = CHECKS.get(name)
    if check is not None:
        check(data_dir, split)


def dataset_names() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(DATASETS)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: Split = "train",
    **kwargs: Any,
) -> Dataset:
    """Dataset ``name``'s ``split``; ``data_dir`` is where files are read (mnist needs one).

    Keyword arguments go to the loader (``verify`` for mnist; ``test_fraction``, ``flatten``
    for digits).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or ``split``.
        DataError: as the loader raises it (e.g. mnist files missing).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    check_split(split)
    return DATASETS[name](data_dir, split, **kwargs)

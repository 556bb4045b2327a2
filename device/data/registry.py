"""The dataset registry: a dataset's name -> its loader, and :func:`load_dataset`.

Besides the bundled datasets (``mnist``, ``digits``), the device-local formats are registered
under their format names, so a simulation reads a user's data the way a device does::

    load_dataset("imagefolder", "data/pets", "train", classes=["cat", "dog"], resize=[32, 32])
    load_dataset("csv", "logs/", "test", classes=["walk", "run"], label_column="activity",
                 window=128, stride=64)

The keyword arguments are :class:`~device.data.local_spec.LocalDataSpec` settings (``classes``
required; ``eval_fraction`` and ``seed`` choose the split); ``"train"`` is the training side of
the split and ``"test"`` its evaluation side (:func:`device.data.local.load_local`). The formats
live in :data:`LOCAL_FORMATS`, apart from the named datasets of :data:`DATASETS` (a format
needs its settings; ``dataset_names()`` stays the list of names that need none). A new format
is a module of its own in this package (a :class:`~device.data.local_source.LocalSource`
subclass), an entry in ``device.data.local.SOURCES``, its options in
``local_spec.FORMAT_OPTIONS`` and its name in ``local_spec.LocalFormat``; it is then registered
here by itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from device.data.dataset import Dataset, Split, check_split
from device.data.digits import load_digits
from device.data.local import check_local, load_local
from device.data.local_spec import FORMATS
from device.data.mnist import MNIST_FILES, load_mnist, mnist_files
from device.errors import DataError

__all__ = [
    "DATASETS",
    "LOCAL_FORMATS",
    "check_dataset",
    "dataset_names",
    "load_dataset",
    "local_format_names",
]


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


def _local_entry(fmt: str) -> Callable[..., Dataset]:
    def load(data_dir: str | os.PathLike[str] | None, split: Split, **kwargs: Any) -> Dataset:
        return load_local(fmt, data_dir, split, **kwargs)

    return load


def _local_check(fmt: str) -> Callable[[str | os.PathLike[str] | None, Split], None]:
    def check(data_dir: str | os.PathLike[str] | None, split: Split) -> None:
        del split  # both sides come from the same files
        check_local(fmt, data_dir)

    return check


#: name -> loader ``(data_dir, split, **kwargs) -> Dataset``: the named datasets.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": _load_mnist_entry,
    "digits": _load_digits_entry,
}

#: format -> loader, like :data:`DATASETS`: the device-local formats (``device.data.local``),
#: loaded by the same :func:`load_dataset` under their format names. Kept apart from the named
#: datasets because they need settings (``classes``, the format's options) that a bare name
#: does not carry: :func:`dataset_names` lists the named ones, :func:`local_format_names` these.
LOCAL_FORMATS: dict[str, Callable[..., Dataset]] = {fmt: _local_entry(fmt) for fmt in FORMATS}


#: name -> a cheap check ``(data_dir, split) -> None`` that the files the loader reads are
#: there (``DataError`` if not), without reading them; datasets without files have none.
CHECKS: dict[str, Callable[[str | os.PathLike[str] | None, Split], None]] = {
    "mnist": _check_mnist,
    **{fmt: _local_check(fmt) for fmt in FORMATS},
}


def _loader(name: str) -> Callable[..., Dataset]:
    loader = DATASETS.get(name) or LOCAL_FORMATS.get(name)
    if loader is None:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(dataset_names())}; "
            f"device-local formats: {', '.join(local_format_names())}"
        )
    return loader


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None, split: Split) -> None:
    """Raise ``DataError`` when dataset ``name``'s ``split`` cannot be read from ``data_dir``
    (what `fleet config check` asks before a run needs the data); ``ValueError`` for an unknown
    name or split. ``name`` may be a device-local format (then ``data_dir`` must hold files of
    that format)."""
    _loader(name)
    check_split(split)
    check = CHECKS.get(name)
    if check is not None:
        check(data_dir, split)


def dataset_names() -> list[str]:
    """The named datasets, sorted (the device-local formats: :func:`local_format_names`)."""
    return sorted(DATASETS)


def local_format_names() -> list[str]:
    """The device-local formats :func:`load_dataset` also takes, in the docs' order."""
    return list(LOCAL_FORMATS)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: Split = "train",
    **kwargs: Any,
) -> Dataset:
    """Dataset ``name``'s ``split``; ``data_dir`` is where files are read (mnist needs one).

    ``name`` is a named dataset or a device-local format. Keyword arguments go to the loader
    (``verify`` for mnist; ``test_fraction``, ``flatten`` for digits; the ``LocalDataSpec``
    settings for the local formats, ``classes`` required).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or ``split``; an
            invalid local-format setting (``SettingError`` names it).
        DataError: as the loader raises it (e.g. mnist files missing).
    """
    loader = _loader(name)
    check_split(split)
    return loader(data_dir, split, **kwargs)

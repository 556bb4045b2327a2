"""Datasets a device trains on, and the partitioners that split one dataset over simulated devices.

Datasets
    :class:`Dataset` is a plain frozen dataclass of tensors. :func:`load_mnist` reads the four
    MNIST IDX files (gzipped or raw) from a directory and checks them (headers strictly, SHA-256
    against ``SHA256SUMS`` or the canonical MNIST content); :func:`download_mnist` fetches them
    into a cache directory for users who have internet; :func:`load_digits` is scikit-learn's
    bundled 8x8 digits, the zero-download dataset. :func:`load_dataset` is the registry.

    A device on a real Pi reads its own local data directory (which may hold just its share of
    MNIST, see :func:`export_mnist_subset`); in simulation every device reads its partition of
    one dataset (``dataset.subset(parts[i])``).

Partitioners
    :func:`shards` (the FedDST/LotteryFL pathological split), :func:`dirichlet` and :func:`iid`
    return one sorted ``int64`` index array per client, disjoint, as a pure function of their
    arguments and ``seed`` (use :func:`device.seeding.derive_seed` to name seeds).
    :func:`partition` is the registry.

The package, one concept per module (import from ``device.data``; the modules are its inside):

- ``dataset``: the :class:`Dataset` type, ``Split`` and ``IndexArray``;
- ``checksums``: ``SHA256SUMS`` files and atomic writes; ``idx``: the IDX file format;
- ``mnist``: MNIST from IDX files; ``download``: fetching them; ``digits``: scikit-learn's digits;
- ``registry``: dataset name or local format -> loader (:func:`load_dataset`,
  :func:`dataset_names`, :func:`local_format_names`);
- ``partitioners``: shards, Dirichlet, iid (:func:`partition`, :func:`partitioner_names`).

Device-local data
    A device's own data, in one of four formats, described by a :class:`LocalDataSpec` (the
    device config's ``data:``): :func:`open_source` gives a :class:`LocalSource` whose
    ``scan()`` re-reads the origin cheaply before each job (only what changed), and whose
    ``train()`` / ``evaluation()`` are the two sides of a deterministic split by example
    identity, as :class:`LocalExamples` (a torch map-style dataset decoding on access;
    ``to_dataset()`` gives a :class:`Dataset`). The formats are registered in the dataset
    registry too (``load_dataset("csv", path, "train", classes=[...], label_column=...)``;
    :func:`local_format_names`).

- ``local_spec``: :class:`LocalDataSpec`; ``local``: :func:`open_source`, the registry glue;
- ``local_source``: :class:`LocalSource`, :class:`LocalExamples`, :class:`ScanResult`;
- ``local_split``: the blake2b split; ``labelspace``: the run's classes; ``dircache``: the
  mtime-cached directory listing;
- one module per format: ``imagefolder``; ``csvsource`` (rows, windows) over ``csvrows`` (one
  file, parsed incrementally); ``npzsource`` (memory-mapped); ``pysource`` (``module:function``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device.data.checksums import read_sha256sums, sha256_file, write_sha256sums
    from device.data.dataset import Dataset, IndexArray, Split
    from device.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
    from device.data.download import DEFAULT_MNIST_URL, download_mnist
    from device.data.idx import read_idx, write_idx
    from device.data.labelspace import LabelSpace
    from device.data.local import SOURCES, open_source
    from device.data.local_source import LocalExamples, LocalSource, ScanResult
    from device.data.local_spec import FORMATS, LocalDataSpec
    from device.data.local_split import split_point
    from device.data.mnist import (
        MNIST_CONTENT_SHA256,
        MNIST_FILES,
        MNIST_MEAN,
        MNIST_STD,
        export_mnist_subset,
        load_mnist,
    )
    from device.data.partitioners import (
        PARTITIONERS,
        dirichlet,
        iid,
        partition,
        partitioner_names,
        shards,
    )
    from device.data.registry import (
        DATASETS,
        LOCAL_FORMATS,
        check_dataset,
        dataset_names,
        load_dataset,
        local_format_names,
    )

#: Each public name -> the module of this package that defines it. The package loads a module
#: on first use of one of its names (PEP 562), so that importing ``device.data.local_spec``
#: (the device config does) or ``device.data.mnist`` does not load torch with every loader.
_EXPORTS = {
    "DATASETS": "registry",
    "DEFAULT_MNIST_URL": "download",
    "DIGITS_MEAN": "digits",
    "DIGITS_STD": "digits",
    "Dataset": "dataset",
    "FORMATS": "local_spec",
    "IndexArray": "dataset",
    "LOCAL_FORMATS": "registry",
    "LabelSpace": "labelspace",
    "LocalDataSpec": "local_spec",
    "LocalExamples": "local_source",
    "LocalSource": "local_source",
    "MNIST_CONTENT_SHA256": "mnist",
    "MNIST_FILES": "mnist",
    "MNIST_MEAN": "mnist",
    "MNIST_STD": "mnist",
    "PARTITIONERS": "partitioners",
    "SOURCES": "local",
    "ScanResult": "local_source",
    "Split": "dataset",
    "check_dataset": "registry",
    "dataset_names": "registry",
    "dirichlet": "partitioners",
    "download_mnist": "download",
    "export_mnist_subset": "mnist",
    "iid": "partitioners",
    "load_dataset": "registry",
    "load_digits": "digits",
    "load_mnist": "mnist",
    "local_format_names": "registry",
    "open_source": "local",
    "partition": "partitioners",
    "partitioner_names": "partitioners",
    "read_idx": "idx",
    "read_sha256sums": "checksums",
    "sha256_file": "checksums",
    "shards": "partitioners",
    "split_point": "local_split",
    "write_idx": "idx",
    "write_sha256sums": "checksums",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DATASETS",
    "DEFAULT_MNIST_URL",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "FORMATS",
    "LOCAL_FORMATS",
    "MNIST_CONTENT_SHA256",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "PARTITIONERS",
    "SOURCES",
    "Dataset",
    "IndexArray",
    "LabelSpace",
    "LocalDataSpec",
    "LocalExamples",
    "LocalSource",
    "ScanResult",
    "Split",
    "check_dataset",
    "dataset_names",
    "dirichlet",
    "download_mnist",
    "export_mnist_subset",
    "iid",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "local_format_names",
    "open_source",
    "partition",
    "partitioner_names",
    "read_idx",
    "read_sha256sums",
    "sha256_file",
    "shards",
    "split_point",
    "write_idx",
    "write_sha256sums",
]

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
- ``registry``: dataset name -> loader (:func:`load_dataset`, :func:`dataset_names`);
- ``partitioners``: shards, Dirichlet, iid (:func:`partition`, :func:`partitioner_names`).

Device-local data formats (``imagefolder``, ``csv``, ``npz``, ``python``: the next issue) go in
modules of their own here, one per format, each registered in ``registry.DATASETS``.
"""

from __future__ import annotations

from device.data.checksums import read_sha256sums, sha256_file, write_sha256sums
from device.data.dataset import Dataset, IndexArray, Split
from device.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from device.data.download import DEFAULT_MNIST_URL, download_mnist
from device.data.idx import read_idx, write_idx
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
from device.data.registry import DATASETS, check_dataset, dataset_names, load_dataset

__all__ = [
    "DATASETS",
    "DEFAULT_MNIST_URL",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "MNIST_CONTENT_SHA256",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "PARTITIONERS",
    "Dataset",
    "IndexArray",
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
    "partition",
    "partitioner_names",
    "read_idx",
    "read_sha256sums",
    "sha256_file",
    "shards",
    "write_idx",
    "write_sha256sums",
]

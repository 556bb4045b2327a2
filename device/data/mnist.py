"""MNIST from a directory of IDX files: loading with checksum verification, and exporting the
share of one device as a data directory of its own.

Fetching the files over the network is :mod:`device.data.download`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from device.data.checksums import read_sha256sums, sha256_file, write_sha256sums
from device.data.dataset import Dataset, Split, check_split
from device.data.idx import read_idx_with_digest, write_idx
from device.errors import DataError

__all__ = [
    "MNIST_CONTENT_SHA256",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "export_mnist_subset",
    "load_mnist",
]

#: split -> (images file, labels file), the canonical names without ``.gz``.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: SHA-256 of the canonical MNIST files' *decompressed* content. Checking the content rather
#: than the .gz bytes accepts every mirror and every re-compression of the same data.
MNIST_CONTENT_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Mean and standard deviation of MNIST training pixels scaled to [0, 1]; :func:`load_mnist`
#: returns ``(pixel / 255 - MNIST_MEAN) / MNIST_STD`` (the usual torchvision normalisation).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_MNIST_SIDE = 28
_MNIST_CLASSES = 10


def _find_file(directory: Path, name: str) -> Path | None:
    """``name.gz`` if present, else ``name``, else None."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_mnist(directory: Path, split: str, missing: list[str]) -> DataError:
    names = " and ".join(f"{n}.gz (or {n})" for n in MNIST_FILES[split])
    where = "does not exist" if not directory.is_dir() else f"lacks {', '.join(missing)}"
    return DataError(
        f"MNIST {split} split not found: directory {directory} {where}. Expected {names} "
        f'there. Download them (needs internet) with python -c "from device.data import '
        f"download_mnist; download_mnist('{directory}')\", or copy the files from a machine "
        f"that has them (a torchvision MNIST/raw folder works)."
    )


def _check_listed(path: Path, sums: Mapping[str, str], sums_path: Path) -> None:
    """The stored bytes of ``path`` match its entry in ``SHA256SUMS``."""
    actual = sha256_file(path)
    if actual != sums[path.name]:
        raise DataError(
            f"{path}: SHA-256 {actual} does not match {sums[path.name]} listed in {sums_path} "
            f"(corrupt or replaced file; download or copy it again)"
        )


def _check_canonical(
    path: Path, content_sha256: str, sums: Mapping[str, str] | None, sums_path: Path
) -> None:
    """The decompressed content of ``path`` (not listed in ``SHA256SUMS``) is canonical MNIST."""
    canonical_name = path.name.removesuffix(".gz")
    if MNIST_CONTENT_SHA256.get(canonical_name) != content_sha256:
        listed = f"not listed in {sums_path}" if sums is not None else f"no {sums_path} exists"
        raise DataError(
            f"{path}: content SHA-256 {content_sha256} is not that of the canonical MNIST file "
            f"{canonical_name}, and {listed}. For your own data, record its checksum with "
            f"`sha256sum FILES > SHA256SUMS` in that directory (or load with verify=False)."
        )


def _sha256sums_for(directory: Path, verify: bool) -> tuple[dict[str, str] | None, Path]:
    sums_path = directory / "SHA256SUMS"
    return (read_sha256sums(sums_path) if verify and sums_path.is_file() else None), sums_path


def mnist_files(directory: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """The images and labels files of ``split`` in ``directory`` (``.gz`` preferred), without
    reading them; ``DataError`` naming the directory and what to do when one is missing."""
    check_split(split)
    directory = Path(directory)
    names = MNIST_FILES[split]
    paths = [_find_file(directory, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise _missing_mnist(directory, split, missing)
    images_path, labels_path = paths
    assert images_path is not None and labels_path is not None
    return images_path, labels_path


def _load_mnist_arrays(
    directory: Path, split: str, verify: bool
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Raw uint8 images ``[N, 28, 28]`` and labels ``[N]`` of ``split``, checked."""
    images_path, labels_path = mnist_files(directory, split)
    sums, sums_path = _sha256sums_for(directory, verify)
    listed = [p for p in (images_path, labels_path) if sums is not None and p.name in sums]
    for path in listed:
        # Stored bytes first: a corrupt file then reads as a checksum error, not as some header
        # error further down.
        assert sums is not None
        _check_listed(path, sums, sums_path)
    images, images_sha = read_idx_with_digest(images_path)
    labels, labels_sha = read_idx_with_digest(labels_path)
    if verify:
        for path, content_sha in ((images_path, images_sha), (labels_path, labels_sha)):
            if path not in listed:
                _check_canonical(path, content_sha, sums, sums_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_MNIST_SIDE,) * 2:
        raise DataError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape [N], got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: holds no images")
    bad = np.flatnonzero(labels >= _MNIST_CLASSES)
    if bad.size:
        raise DataError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is not a digit 0-9"
        )
    return images, labels


def load_mnist(
    data_dir: str | os.PathLike[str], *, split: Split = "train", verify: bool = True
) -> Dataset:
    """MNIST ``split`` from the IDX files in ``data_dir``.

    Files: ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (train) or ``t10k-...``
    (test), each gzipped (``.gz``, preferred when both exist) or raw. Any number of examples is
    accepted, so a device's directory may hold just its own share (60,000/10,000 for the full
    set).

    Returns float32 images ``[N, 1, 28, 28]`` normalised as ``(pixel / 255 - 0.1307) / 0.3081``
    (:data:`MNIST_MEAN`, :data:`MNIST_STD`) and int64 labels in ``[0, 10)``.

    With ``verify``, every file read must match: its entry in ``data_dir/SHA256SUMS`` (digest
    of the stored bytes) when listed there, otherwise the canonical MNIST content
    (:data:`MNIST_CONTENT_SHA256`, digest of the decompressed bytes).

    Raises:
        DataError: the directory or a file is missing (the message names the directory, the
            files expected and how to get them), a header is malformed, images and labels
            disagree, a label is not 0-9, or a checksum does not match.
        ValueError: ``split`` is neither "train" nor "test".
    """
    images, labels = _load_mnist_arrays(Path(data_dir), split, verify)
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32)
    x.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    y = torch.from_numpy(labels).to(torch.int64)
    return Dataset(x, y, _MNIST_CLASSES)


def export_mnist_subset(
    data_dir: str | os.PathLike[str],
    indices: Sequence[int] | npt.NDArray[np.integer[Any]],
    out_dir: str | os.PathLike[str],
    *,
    split: Split = "train",
    verify: bool = True,
) -> Path:
    """Write the examples ``indices`` of MNIST ``split`` as a device's own data directory.

    Creates ``out_dir`` with gzipped IDX files under the canonical names (so the device runs
    :func:`load_mnist` on it unchanged) and a ``SHA256SUMS`` listing them. Returns ``out_dir``.

    Raises:
        DataError: as :func:`load_mnist` for the source, or an index out of range.
    """
    images, labels = _load_mnist_arrays(Path(data_dir), split, verify)
    index = np.asarray(indices, dtype=np.int64)
    if index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= labels.shape[0])):
        raise DataError(
            f"export_mnist_subset: indices must be 1-D within [0, {labels.shape[0]}) for the "
            f"MNIST {split} split in {data_dir}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = (f"{n}.gz" for n in MNIST_FILES[split])
    write_idx(out / images_name, images[index])
    write_idx(out / labels_name, labels[index])
    write_sha256sums(out, [images_name, labels_name])
    return out

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
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import io
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from device import __version__
from device.errors import ConfigError, DataError
from device.seeding import derive_seed

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

Split = Literal["train", "test"]
IndexArray = npt.NDArray[np.int64]

# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples and labels held as tensors (``eq=False``: tensors do not compare to one bool).

    Invariants (checked on construction, :class:`DataError` otherwise):
        - ``x`` is float32 with shape ``[N, C, H, W]`` (images) or ``[N, F]`` (features);
        - ``y`` is int64 with shape ``[N]``, every label in ``[0, num_classes)``;
        - ``num_classes >= 2``. ``N`` may be 0 (an empty subset).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() not in (2, 4):
            raise DataError(
                f"Dataset.x must be float32 [N, C, H, W] or [N, F], "
                f"got {self.x.dtype} with shape {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise DataError(
                f"Dataset.y must be int64 [N], got {self.y.dtype} with shape {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"Dataset has {self.x.shape[0]} examples but {self.y.shape[0]} labels")
        if self.num_classes < 2:
            raise DataError(f"Dataset.num_classes must be at least 2, got {self.num_classes}")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(
                f"Dataset labels must lie in [0, {self.num_classes}), "
                f"found {int(self.y.min())}..{int(self.y.max())}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension, e.g. ``(1, 28, 28)``."""
        return tuple(self.x.shape[1:])

    def labels(self) -> IndexArray:
        """The labels as a numpy int64 array (a copy), the input the partitioners take."""
        return self.y.numpy().copy()

    def subset(
        self, indices: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor
    ) -> Dataset:
        """The examples at ``indices``, in that order (copied; the original is untouched).

        Raises:
            DataError: an index is outside ``[0, len(self))`` or ``indices`` is not 1-D integers.
        """
        index = (
            indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        )
        # Booleans would silently act as 0/1 positions, floats would truncate: both refused
        # (an empty list arrives as float64 from numpy and is fine).
        wrong_type = index.dtype == torch.bool or index.dtype.is_floating_point
        if index.dim() != 1 or (index.numel() and wrong_type):
            raise DataError(
                f"subset indices must be a 1-D integer array, "
                f"got {index.dtype} with shape {tuple(index.shape)}"
            )
        index = index.to(torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise DataError(
                f"subset index out of range: {int(index.min())}..{int(index.max())} "
                f"for a dataset of {len(self)} examples"
            )
        return Dataset(self.x[index], self.y[index], self.num_classes)

    def flatten(self) -> Dataset:
        """The same examples as ``[N, F]`` feature vectors (e.g. digits 1x8x8 -> 64)."""
        return Dataset(self.x.reshape(len(self), -1).clone(), self.y.clone(), self.num_classes)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: test, train")


# ---------------------------------------------------------------------------------------------
# IDX files and checksums

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}
# Refuse to allocate more than this for one IDX file: a corrupt header must not ask for 100 GB.
_MAX_IDX_BYTES = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"


def _open_idx(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading, through gzip when its content starts with the gzip magic."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exactly(f: io.BufferedIOBase, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = f.read(min(remaining, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_idx(path: Path) -> tuple[npt.NDArray[Any], str]:
    """Parse one IDX file; return the array and the SHA-256 of its (decompressed) content."""
    try:
        with _open_idx(path) as f:
            head = _read_exactly(f, 4)
            if len(head) < 4:
                raise DataError(f"{path}: truncated IDX header ({len(head)} of 4 magic bytes)")
            if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES or head[3] == 0:
                raise DataError(
                    f"{path}: bad IDX magic number 0x{head.hex()} "
                    f"(expected 0x0000TTNN: type TT in {{08,09,0b,0c,0d,0e}}, NN >= 1 dimensions)"
                )
            dtype, ndim = _IDX_TYPES[head[2]], head[3]
            dim_bytes = _read_exactly(f, 4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = tuple(int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim))
            size = math.prod(dims) * dtype.itemsize
            if size > _MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: IDX header announces {dims} items ({size} bytes), more than the "
                    f"{_MAX_IDX_BYTES} bytes accepted"
                )
            payload = _read_exactly(f, size)
            if len(payload) < size:
                raise DataError(
                    f"{path}: IDX data truncated: header {dims} needs {size} bytes after the "
                    f"header, found {len(payload)}"
                )
            if f.read(1):
                raise DataError(
                    f"{path}: trailing bytes after the {size} data bytes that header {dims} "
                    f"announces"
                )
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated gzip stream raises EOFError.
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    digest = hashlib.sha256(head + dim_bytes + payload).hexdigest()
    array = np.frombuffer(bytearray(payload), dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False), digest


def read_idx(path: str | os.PathLike[str]) -> npt.NDArray[Any]:
    """The array stored in IDX file ``path`` (gzipped or raw, detected by content), native order.

    The header is checked strictly: magic ``0x0000TTNN`` with a known type code ``TT`` and
    ``NN >= 1`` dimensions, and exactly ``prod(dims) * itemsize`` data bytes after it (a
    truncated file or trailing bytes are errors).

    Raises:
        DataError: the file cannot be read or is not a well-formed IDX file (message names it).
    """
    return _read_idx(Path(path))[0]


def write_idx(
    path: str | os.PathLike[str], array: npt.NDArray[Any], *, compress: bool = True
) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress``), atomically.

    Raises:
        ValueError: the dtype has no IDX type code (uint8, int8, int16, int32, float32, float64)
            or the array has no dimensions.
    """
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in _IDX_CODES or array.ndim == 0 or array.ndim > 255:
        raise ValueError(
            f"write_idx: cannot store dtype {array.dtype} with {array.ndim} dimensions"
        )
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    if compress:
        # mtime=0: the same array always gives the same bytes, hence the same SHA-256.
        data = gzip.compress(data, mtime=0)
    _write_atomic(Path(path), data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of the bytes of ``path`` as stored (not decompressed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def read_sha256sums(path: str | os.PathLike[str]) -> dict[str, str]:
    """File name -> lower-case hex SHA-256, from a ``sha256sum``-format file.

    Each non-blank line is ``<64 hex digits><space><space or *><file name>`` (the output of
    ``sha256sum FILES``); a leading ``./`` in the name is dropped.

    Raises:
        DataError: a line does not have that form, or a name is listed twice with different
            digests (the message names the file and line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read checksum file ({exc})") from exc
    return _parse_sha256sums(text, str(path))


def _parse_sha256sums(text: str, source: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUMS_LINE.match(line.rstrip("\r"))
        if match is None:
            raise DataError(
                f"{source}, line {number}: expected '<64 hex digits>  <file name>', got {line!r}"
            )
        digest, name = match.group(1).lower(), match.group(2).removeprefix("./")
        if sums.get(name, digest) != digest:
            raise DataError(f"{source}, line {number}: {name} listed twice with different digests")
        sums[name] = digest
    return sums


def write_sha256sums(directory: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """Record the SHA-256 of ``names`` (files in ``directory``) in ``directory/SHA256SUMS``.

    Entries already in a valid ``SHA256SUMS`` for other names are kept; the file is rewritten
    atomically, sorted by name. Returns its path.
    """
    directory = Path(directory)
    sums_path = directory / "SHA256SUMS"
    sums = read_sha256sums(sums_path) if sums_path.exists() else {}
    for name in names:
        sums[name] = sha256_file(directory / name)
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
    _write_atomic(sums_path, text.encode("utf-8"))
    return sums_path


# ---------------------------------------------------------------------------------------------
# MNIST

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

#: Where :func:`download_mnist` fetches from by default (the mirror torchvision uses; another
#: is ``https://storage.googleapis.com/cvdf-datasets/mnist``).
DEFAULT_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist"

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
        f"there. Download them with --download (device.data.download_mnist, needs internet), or "
        f"copy the files from a machine that has them (a torchvision MNIST/raw folder works)."
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


def _load_mnist_arrays(
    directory: Path, split: str, verify: bool
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Raw uint8 images ``[N, 28, 28]`` and labels ``[N]`` of ``split``, checked."""
    _check_split(split)
    names = MNIST_FILES[split]
    paths = [_find_file(directory, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise _missing_mnist(directory, split, missing)
    images_path, labels_path = paths
    assert images_path is not None and labels_path is not None
    sums, sums_path = _sha256sums_for(directory, verify)
    listed = [p for p in (images_path, labels_path) if sums is not None and p.name in sums]
    for path in listed:
        # Stored bytes first: a corrupt file then reads as a checksum error, not as some header
        # error further down.
        assert sums is not None
        _check_listed(path, sums, sums_path)
    images, images_sha = _read_idx(images_path)
    labels, labels_sha = _read_idx(labels_path)
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


def _fetch(url: str, timeout_s: float, max_bytes: int, sink: IO[bytes] | None) -> bytes:
    """GET ``url``; stream into ``sink`` (returning b"") or return the body. Caps the size."""
    request = urllib.request.Request(url, headers={"User-Agent": f"sparsefleet/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise DataError(f"{url}: {length} bytes announced, more than the {max_bytes} accepted")
        body: list[bytes] = []
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if received > max_bytes:
                raise DataError(f"{url}: more than the {max_bytes} bytes accepted")
            if sink is None:
                body.append(chunk)
            else:
                sink.write(chunk)
        return b"".join(body)


# HTTPError is a URLError; timeouts and resets are OSErrors; a short body or a malformed URL
# raise http.client's exceptions (IncompleteRead, InvalidURL).
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def _download_error(url: str, exc: Exception) -> DataError:
    return DataError(f"cannot download {url}: {exc}")


def _check_download(
    path: Path, name: str, served_sums: Mapping[str, str] | None, source: str
) -> None:
    """``path`` (holding MNIST file ``name``) has the expected checksum and is well-formed IDX."""
    if served_sums is not None:
        actual = sha256_file(path)
        if actual != served_sums[name]:
            raise DataError(
                f"{source}: SHA-256 {actual} does not match {served_sums[name]} in the "
                f"server's SHA256SUMS (corrupt or replaced download)"
            )
        _read_idx(path)
        return
    _, content_sha = _read_idx(path)
    if content_sha != MNIST_CONTENT_SHA256[name.removesuffix(".gz")]:
        raise DataError(
            f"{source}: content SHA-256 {content_sha} is not that of the canonical MNIST file "
            f"{name}, and the server serves no SHA256SUMS to check other data against"
        )


def download_mnist(
    cache_dir: str | os.PathLike[str],
    base_url: str = DEFAULT_MNIST_URL,
    *,
    splits: Sequence[Split] = ("train", "test"),
    timeout_s: float = 60.0,
    max_bytes: int = 64 << 20,
    overwrite: bool = False,
) -> Path:
    """Download the gzipped MNIST files of ``splits`` from ``base_url`` into ``cache_dir``.

    Files are fetched as ``{base_url}/{name}.gz``. When the server also serves
    ``{base_url}/SHA256SUMS`` (sha256sum format, listing the ``.gz`` names), each download must
    match it; otherwise (HTTP 404, or 403 as S3 answers) it must match the canonical MNIST content
    (:data:`MNIST_CONTENT_SHA256`). Every file is written to a temporary file in ``cache_dir``,
    checked (checksum and IDX structure), fsynced and only then renamed into place, so an
    interrupted or bad download never leaves a partial file under the final name. Files already
    present that pass the same check are not fetched again unless ``overwrite``. Finally
    ``cache_dir/SHA256SUMS`` records the files, so :func:`load_mnist` verifies them cheaply.

    Args:
        cache_dir: created if missing.
        base_url: an ``http://`` or ``https://`` URL (no trailing file name).
        splits: which splits to fetch.
        timeout_s: socket timeout per request, in seconds.
        max_bytes: the most bytes accepted per file (the largest MNIST file is 9.9 MB).
        overwrite: fetch even files that are present and valid.

    Returns:
        ``cache_dir`` as a Path, ready for :func:`load_mnist`.

    Raises:
        ConfigError: ``base_url`` is not http(s).
        DataError: the server cannot be reached, answers with an error, sends too much, or a
            file fails its checksum or IDX check (nothing is left under the final name).
    """
    for split in splits:
        _check_split(split)
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"MNIST download base URL must be http:// or https://, got {base_url!r}")
    base = base_url.rstrip("/")
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)

    sums_url = f"{base}/SHA256SUMS"
    served_sums: dict[str, str] | None
    try:
        text = _fetch(sums_url, timeout_s, 1 << 16, None)
    except urllib.error.HTTPError as exc:
        # S3 buckets answer 403 rather than 404 for a key that does not exist.
        if exc.code not in (403, 404, 410):
            raise _download_error(sums_url, exc) from exc
        served_sums = None
    except _NETWORK_ERRORS as exc:
        raise _download_error(sums_url, exc) from exc
    else:
        try:
            served_sums = _parse_sha256sums(text.decode("utf-8"), sums_url)
        except UnicodeDecodeError as exc:
            raise DataError(f"{sums_url}: not a text checksum file ({exc})") from exc

    names = [f"{name}.gz" for split in splits for name in MNIST_FILES[split]]
    if served_sums is not None:
        unlisted = [n for n in names if n not in served_sums]
        if unlisted:
            raise DataError(f"{sums_url} does not list {', '.join(unlisted)}")

    for name in names:
        final = directory / name
        if final.is_file() and not overwrite:
            try:
                _check_download(final, name, served_sums, sums_url)
                continue
            except DataError:
                pass  # present but wrong: fetch it again
        url = f"{base}/{name}"
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    _fetch(url, timeout_s, max_bytes, sink)
                except _NETWORK_ERRORS as exc:
                    raise _download_error(url, exc) from exc
                sink.flush()
                os.fsync(sink.fileno())
            _check_download(tmp, name, served_sums, url)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    write_sha256sums(directory, names)
    return directory


# ---------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits

#: Mean and standard deviation of the digits pixels scaled to [0, 1] (pixel / 16), over all
#: 1,797 images; :func:`load_digits` returns ``(pixel / 16 - DIGITS_MEAN) / DIGITS_STD``.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
_DIGITS_CLASSES = 10


@functools.cache
def _digits_arrays() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The 1,797 digits as float32 ``[N, 8, 8]`` pixels in 0..16 and int64 labels (cached)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DataError(
            "the digits dataset ships with scikit-learn, which is not installed "
            "(pip install scikit-learn)"
        ) from exc
    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _digits_split(labels: IndexArray, test_fraction: float) -> dict[str, IndexArray]:
    """Stratified train/test indices: per class, a fixed shuffle, the first share to test."""
    rng = np.random.default_rng(derive_seed("digits", "split"))
    train: list[IndexArray] = []
    test: list[IndexArray] = []
    for c in range(_DIGITS_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def load_digits(
    *, split: Split = "train", test_fraction: float = 0.25, flatten: bool = False
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; nothing is downloaded).

    Returns float32 images ``[N, 1, 8, 8]`` (``[N, 64]`` with ``flatten``) normalised as
    ``(pixel / 16 - 0.3053) / 0.3760`` (:data:`DIGITS_MEAN`, :data:`DIGITS_STD`) and int64
    labels. The split is stratified and fixed: per class, the same shuffle on every machine
    puts ``round(test_fraction * class size)`` images in test and the rest in train
    (1,347 train / 450 test at the default 0.25). The two splits are disjoint and together
    hold every image.

    Raises:
        ValueError: unknown ``split``, or ``test_fraction`` outside (0, 1).
        DataError: scikit-learn is not installed.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = _digits_arrays()
    index = _digits_split(labels, test_fraction)[split]
    x = torch.from_numpy(images[index]).unsqueeze(1)
    x.div_(16.0).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    dataset = Dataset(x, torch.from_numpy(labels[index]), _DIGITS_CLASSES)
    return dataset.flatten() if flatten else dataset


# ---------------------------------------------------------------------------------------------
# Dataset registry


def _load_mnist_entry(
    data_dir: str | os.PathLike[str] | None, split: Split, **kwargs: Any
) -> Dataset:
    if data_dir is None:
        raise DataError(
            "dataset 'mnist' reads IDX files from a directory, and none was given: pass "
            "data_dir (the CLI's --data-dir); files expected there: "
            + ", ".join(f"{n}.gz" for pair in MNIST_FILES.values() for n in pair)
        )
    return load_mnist(data_dir, split=split, **kwargs)


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
    _check_split(split)
    return DATASETS[name](data_dir, split, **kwargs)


# ---------------------------------------------------------------------------------------------
# Partitioners


def _as_labels(labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor) -> IndexArray:
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise DataError(
            f"labels must be a 1-D integer array, got {array.dtype} with shape {array.shape}"
        )
    if array.size and array.min() < 0:
        raise DataError(f"labels must be non-negative, found {int(array.min())}")
    return array.astype(np.int64, copy=False)


def _rng(seed: int, num_clients: int, who: str) -> np.random.Generator:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"{who}: num_clients must be a positive integer, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"{who}: seed must be an integer in [0, 2**64), got {seed!r}")
    return np.random.default_rng(seed)


def iid(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
) -> list[IndexArray]:
    """Every example to exactly one of ``num_clients`` clients, uniformly at random.

    Client sizes differ by at most one (the first ``N mod num_clients`` clients get one more).
    Each index array is sorted.

    Raises:
        ConfigError: ``num_clients`` is not in ``[1, N]`` or the seed is invalid.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "iid")
    if num_clients > len(y):
        raise ConfigError(f"iid: {num_clients} clients but only {len(y)} examples")
    order = rng.permutation(len(y))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def _max_shard_clients(fits: IndexArray, classes_per_client: int) -> int:
    """The most clients that ``classes_per_client`` distinct classes each can serve.

    ``fits[c]`` is how many clients class ``c`` can serve. K clients fit iff
    ``sum_c min(fits[c], K) >= K * classes_per_client``; the left side grows by at most
    ``#{c: fits[c] > K}`` per extra client, so feasibility is an interval [0, K_max].
    """
    if classes_per_client > len(fits):
        return 0
    upper = int(fits.sum()) // classes_per_client
    if upper == 0:
        return 0
    candidates = np.arange(1, upper + 1)
    served = np.minimum(fits[None, :], candidates[:, None]).sum(axis=1)
    feasible = candidates[served >= candidates * classes_per_client]
    return int(feasible.max()) if feasible.size else 0


def _level_counts(caps: IndexArray, total: int, rng: np.random.Generator) -> IndexArray:
    """Per-class slot counts, as even as ``caps`` allow, summing to ``total`` (<= caps.sum())."""
    lo, hi = 0, int(caps.max())
    while lo < hi:  # the highest level L with sum(min(caps, L)) <= total
        mid = (lo + hi + 1) // 2
        if int(np.minimum(caps, mid).sum()) <= total:
            lo = mid
        else:
            hi = mid - 1
    counts = np.minimum(caps, lo)
    remainder = total - int(counts.sum())
    if remainder:
        # By the choice of L, fewer classes than remain are above it: one extra slot each.
        counts[rng.choice(np.flatnonzero(caps > lo), size=remainder, replace=False)] += 1
    return counts


def shards(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
    classes_per_client: int = 2,
    per_class: int = 20,
) -> list[IndexArray]:
    """The pathological non-IID split of FedDST and LotteryFL.

    Each client gets ``classes_per_client`` distinct classes with exactly ``per_class``
    examples of each (defaults: 2 classes x 20 images, as in FedDST with K = 400 on MNIST), no
    example is given twice, and examples no client needs are left out.

    How: classes get client slots as evenly as their sizes allow (class ``c`` can fill at most
    ``min(count_c // per_class, num_clients)``); slots are laid out class after class and dealt
    to clients column-wise, which gives every client distinct classes; then random swaps of
    classes between clients (keeping every client's classes distinct) decorrelate which
    classes are paired; finally each class's examples, shuffled, are dealt ``per_class`` at a
    time. Each returned index array is sorted.

    Raises:
        ConfigError: a parameter is out of range, or the labels cannot serve that many clients
            (the message says how many they can serve).
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "shards")
    if classes_per_client < 1 or per_class < 1:
        raise ConfigError(
            f"shards: classes_per_client and per_class must be at least 1, "
            f"got {classes_per_client} and {per_class}"
        )
    classes, class_counts = np.unique(y, return_counts=True)
    fits = class_counts // per_class
    caps = np.minimum(fits, num_clients)
    total = num_clients * classes_per_client
    if classes_per_client > len(classes) or int(caps.sum()) < total:
        raise ConfigError(
            f"shards: cannot give {num_clients} clients {classes_per_client} distinct classes "
            f"with {per_class} examples each: the labels hold {len(classes)} classes "
            f"({', '.join(f'{c}: {n}' for c, n in zip(classes, class_counts, strict=True))} "
            f"examples), enough for at most {_max_shard_clients(fits, classes_per_client)} clients"
        )
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    counts = _level_counts(caps, total, rng)
    order = rng.permutation(len(classes))
    # Column-wise deal: client k gets slots k, k + K, k + 2K, ...; a class's run of at most K
    # consecutive slots therefore lands on distinct clients.
    table = np.repeat(order, counts[order]).reshape(classes_per_client, num_clients).T
    rows: list[list[int]] = table.tolist()
    if num_clients > 1 and classes_per_client < len(classes):
        steps = 10 * total
        picks = zip(
            rng.integers(num_clients, size=steps).tolist(),
            rng.integers(classes_per_client, size=steps).tolist(),
            rng.integers(num_clients, size=steps).tolist(),
            rng.integers(classes_per_client, size=steps).tolist(),
            strict=True,
        )
        for k1, j1, k2, j2 in picks:
            a, b = rows[k1], rows[k2]
            c1, c2 = a[j1], b[j2]
            if c1 != c2 and c2 not in a and c1 not in b:
                a[j1], b[j2] = c2, c1
    rows = [rows[k] for k in rng.permutation(num_clients).tolist()]
    cursor = [0] * len(classes)
    parts: list[IndexArray] = []
    for row in rows:
        chunks = []
        for c in row:
            chunks.append(pools[c][cursor[c] : cursor[c] + per_class])
            cursor[c] += per_class
        parts.append(np.sort(np.concatenate(chunks)).astype(np.int64))
    return parts


def dirichlet(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
    beta: float = 0.5,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[IndexArray]:
    """Label-skewed split: each class spread over clients by Dirichlet(beta) proportions.

    For every class, proportions ``p ~ Dir(beta, ..., beta)`` over the ``num_clients`` clients
    split that class's shuffled examples (client k gets ``floor``-rounded share ``p_k``).
    Small ``beta`` (e.g. 0.1) gives each client few classes; large ``beta`` approaches iid.
    Every example goes to exactly one client. Draws are repeated (up to ``max_tries``) until
    every client holds at least ``min_size`` examples. Each returned index array is sorted.

    Raises:
        ConfigError: ``beta <= 0``, ``min_size < 0``, ``num_clients * min_size`` exceeds the
            examples, or no draw in ``max_tries`` gave every client ``min_size`` examples.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "dirichlet")
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"dirichlet: beta must be a positive number, got {beta}")
    if min_size < 0 or max_tries < 1:
        raise ConfigError(
            f"dirichlet: min_size must be >= 0 and max_tries >= 1, got {min_size}, {max_tries}"
        )
    if num_clients * min_size > len(y):
        raise ConfigError(
            f"dirichlet: {num_clients} clients x min_size {min_size} exceeds the {len(y)} examples"
        )
    members = [np.flatnonzero(y == c) for c in np.unique(y)]
    alpha = np.full(num_clients, float(beta))
    for _ in range(max_tries):
        # Sizes first, examples only for an accepted draw: rejected draws stay cheap.
        cuts = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in members:
            shares = np.cumsum(rng.dirichlet(alpha))[:-1]
            cut = np.minimum(np.floor(shares * len(idx)).astype(np.int64), len(idx))
            cuts.append(cut)
            sizes += np.diff(np.concatenate(([0], cut, [len(idx)])))
        if int(sizes.min()) < min_size:
            continue
        pieces: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for idx, cut in zip(members, cuts, strict=True):
            for k, chunk in enumerate(np.split(rng.permutation(idx), cut)):
                pieces[k].append(chunk)
        return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
    raise ConfigError(
        f"dirichlet: no draw in {max_tries} gave each of {num_clients} clients at least "
        f"{min_size} of the {len(y)} examples (beta={beta}); lower min_size or num_clients, "
        f"or raise beta"
    )


#: name -> partitioner ``(labels, num_clients, *, seed, **options) -> list of index arrays``.
PARTITIONERS: dict[str, Callable[..., list[IndexArray]]] = {
    "shards": shards,
    "dirichlet": dirichlet,
    "iid": iid,
}


def partitioner_names() -> list[str]:
    """The registered partitioner names, sorted."""
    return sorted(PARTITIONERS)


def partition(
    name: str,
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    seed: int,
    **kwargs: Any,
) -> list[IndexArray]:
    """Split ``labels``' indices over ``num_clients`` clients with partitioner ``name``.

    ``kwargs`` are the partitioner's options (``classes_per_client``, ``per_class`` for
    shards; ``beta``, ``min_size`` for dirichlet). The result is a pure function of the
    arguments (with the same numpy version): derive ``seed`` from the run's name with
    :func:`device.seeding.derive_seed` so every process computes the same split.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
        ConfigError, DataError: as the partitioner raises them.
    """
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; known: {', '.join(partitioner_names())}")
    return PARTITIONERS[name](labels, num_clients, seed=seed, **kwargs)

"""``format: npz``: arrays ``x`` (examples) and ``y`` (labels) in ``.npz`` files.

``path`` is one ``.npz`` file or a directory of them (walked recursively; each file adds its
rows, so a device can drop in a file per day). In each file:

- ``x``: ``[N, ...]`` numbers (bool, integer or float; converted to float32 unchanged, so
  normalise before saving), one example per row, ``[F]``, ``[C, L]`` or ``[C, H, W]``; every
  file's examples must have one shape;
- ``y``: ``[N]`` class indices (integers into the run's ``classes``) or class names (strings).

``x`` is memory-mapped when the file stores it uncompressed (``numpy.savez``): rows are read
from disk when examples are decoded, never the whole array. numpy's own ``load`` cannot map a
member of an npz; the member's offset in the zip is computed here instead. Compressed files
(``numpy.savez_compressed``) are loaded whole. Arrays are read with ``allow_pickle=False``.

Identity: ``FILE#ROW``. A file is read again only when its (device, inode, size, mtime)
changed. Errors name the file: not an npz, ``x`` or ``y`` missing, different lengths, a label
outside the classes (with its row), a non-finite value (with its row, when decoded).
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from device.data.dataset import IndexArray
from device.data.dircache import DirectoryCache
from device.data.labelspace import LabelSpace
from device.data.local_source import LocalSource, Snapshot, Work
from device.data.local_spec import LocalDataSpec
from device.errors import DataError

__all__ = ["NpzSource", "read_npz"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


@dataclass(frozen=True, eq=False)
class NpzArrays:
    """One file's ``x`` (``np.memmap`` when mapped) and checked int64 labels."""

    path: str
    x: npt.NDArray[Any]
    labels: npt.NDArray[np.int64]
    mapped: bool


def _mapped_member(path: str, info: zipfile.ZipInfo) -> npt.NDArray[Any] | None:
    """The stored (uncompressed) ``.npy`` member ``info`` of ``path`` as a read-only memmap,
    or ``None`` when it cannot be mapped (compressed, encrypted, an npy version numpy has no
    public header reader for)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    fmt = np.lib.format
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            return None
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            return None
        raw.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        version = fmt.read_magic(raw)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(raw)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(raw)
        else:
            return None
        offset = raw.tell()
    if dtype.hasobject:
        return None  # read_array refuses it with allow_pickle=False
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _labels(path: str, y: npt.NDArray[Any], space: LabelSpace) -> npt.NDArray[np.int64]:
    if y.dtype.kind in "iu":
        return space.check_indices(y, f"{path}: y")
    if y.dtype.kind in "US":
        names, inverse = np.unique(y, return_inverse=True)
        index = np.empty(len(names), dtype=np.int64)
        for i, name in enumerate(names.tolist()):
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            row = int(np.flatnonzero(inverse == i)[0])
            index[i] = space.index(text, f"{path}: y[{row}]")
        return index[inverse.reshape(-1)]
    raise DataError(
        f"{path}: y must hold class indices (integers) or class names (text), got {y.dtype}"
    )


def read_npz(path: str, space: LabelSpace) -> NpzArrays:
    """Open ``path``'s ``x`` (mapped when stored uncompressed) and read and check its ``y``.

    Raises:
        DataError: naming ``path``: not an npz, a member missing or malformed, lengths differ,
            a label outside ``space``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            missing = [key for key in ("x", "y") if key not in members]
            if missing:
                raise DataError(
                    f"{path}: no array {missing[0]!r}; it holds: {', '.join(sorted(members))} "
                    "(expected x and y, as numpy.savez(path, x=..., y=...) writes)"
                )
            with archive.open(members["y"]) as f:
                y = np.lib.format.read_array(f, allow_pickle=False)
            x = _mapped_member(path, archive.getinfo(members["x"]))
            mapped = x is not None
            if x is None:
                with archive.open(members["x"]) as f:
                    x = np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not an npz file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # a malformed .npy header, or a pickled (object) array
        raise DataError(f"{path}: unreadable array ({exc})") from None
    if y.ndim != 1:
        raise DataError(f"{path}: y must be one label per example, [N], got shape {y.shape}")
    if x.ndim not in (2, 3, 4) or x.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: x must be numbers shaped [N, F], [N, C, L] or [N, C, H, W], "
            f"got {x.dtype} with shape {x.shape}"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path}: x and y differ in length: x has {x.shape[0]} examples, y {y.shape[0]} labels"
        )
    return NpzArrays(path, x, _labels(path, y, space), mapped)


class _NpzDecoder:
    """Reads rows of one snapshot's files, by position."""

    def __init__(
        self, files: list[NpzArrays], file_of: IndexArray, row_of: IndexArray, labels: IndexArray
    ) -> None:
        self._files = files
        self._file_of = file_of
        self._row_of = row_of
        self._labels = labels

    def __call__(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        file_of = self._file_of[positions]
        rows = self._row_of[positions]
        out = np.empty((len(positions), *self._files[0].x.shape[1:]), dtype=np.float32)
        for f in np.unique(file_of).tolist():
            x = self._files[f].x
            here = file_of == f
            wanted = rows[here]
            first = int(wanted[0])
            if here.all() and np.array_equal(wanted, np.arange(first, first + len(wanted))):
                out[...] = x[first : first + len(wanted)]  # a run of rows: one copy, no gather
            else:
                out[here] = x[wanted]
        if not any(f.x.dtype.kind == "f" for f in self._files):
            return torch.from_numpy(out), torch.from_numpy(self._labels[positions])
        finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"{self._files[int(file_of[bad])].path}: x[{int(rows[bad])}] holds a value that "
                "is not a finite number"
            )
        return torch.from_numpy(out), torch.from_numpy(self._labels[positions])


class NpzSource(LocalSource):
    """Examples from ``.npz`` files (see the module docstring)."""

    def __init__(self, spec: LocalDataSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None  # the spec requires it for this format
        self.path: Path = spec.path
        self._tree = DirectoryCache(self.path, (".npz",))
        self._opened: dict[str, tuple[tuple[int, int, int, int], NpzArrays]] = {}

    def _files(self) -> list[tuple[str, str]]:
        if self.path.is_file():
            return [(self.path.name, str(self.path))]
        if not self.path.is_dir():
            raise DataError(f"data.path {self.path} does not exist (an .npz file or a directory)")
        try:
            tree = self._tree.scan()
        except OSError as exc:
            raise DataError(f"data.path {self.path}: cannot be read ({exc.strerror})") from None
        files = [(rel, str(self.path / rel)) for listing in tree.listings for rel in listing.files]
        if not files:
            raise DataError(f"data.path {self.path}: no *.npz files in this directory")
        return files

    def _rescan(self) -> tuple[Snapshot, Work]:
        opened: dict[str, tuple[tuple[int, int, int, int], NpzArrays]] = {}
        read = rows_read = 0
        for rel, full in self._files():
            try:
                st = os.stat(full)
            except OSError as exc:
                raise DataError(f"{full}: cannot be read ({exc.strerror})") from None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._opened.get(rel)
            if known is None or known[0] != key:
                known = (key, read_npz(full, self.label_space))
                read += 1
                rows_read += len(known[1].labels)
            opened[rel] = known
        self._opened = opened
        files = [arrays for _, arrays in opened.values()]
        shape = files[0].x.shape[1:]
        for arrays in files:
            if arrays.x.shape[1:] != shape:
                raise DataError(
                    f"{arrays.path}: examples are shaped {arrays.x.shape[1:]}, those of "
                    f"{files[0].path} {shape}; every file must hold one example shape"
                )
        counts = [len(arrays.labels) for arrays in files]
        if not sum(counts):
            raise DataError(f"data.path {self.path}: no examples (every x and y is empty)")
        identities = [
            f"{rel}#{row}" for rel, n in zip(opened, counts, strict=True) for row in range(n)
        ]
        file_of = np.repeat(np.arange(len(files), dtype=np.int64), counts)
        row_of = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        labels = np.concatenate([arrays.labels for arrays in files])
        decoder = _NpzDecoder(files, file_of, row_of, labels)
        return Snapshot(identities, labels, decoder), Work(read, len(files) - read, rows_read)

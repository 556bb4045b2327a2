"""``format: imagefolder``: ``path/CLASS_NAME/**/*.png|jpg|jpeg``, like torchvision's ImageFolder.

The label of an image is the name of the top-level directory it lies under (subdirectories
below it are walked too); files directly in ``path``, hidden files and other extensions are
ignored. A class directory whose name is not one of the run's classes is an error naming the
directory's first image, not skipped: a device must not train on data the run cannot label.
A class of the run with no directory on this device is fine (non-IID data).

Scanning lists directories only (:class:`~device.data.dircache.DirectoryCache`: unchanged
directories are not listed again); images are decoded with Pillow when examples are asked for:
converted to greyscale (``channels: 1``) or RGB (``channels: 3``), resized bilinearly to
``resize`` when set, scaled to [0, 1] and normalised per channel, ``(v - mean) / std``.
Example shape: ``[channels, H, W]``. An unreadable or corrupt image raises a ``DataError``
naming its path when that example is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from device.data.dataset import IndexArray
from device.data.dircache import DirectoryCache
from device.data.local_source import LocalSource, Snapshot, Work
from device.data.local_spec import IMAGE_SUFFIXES, LocalDataSpec
from device.errors import DataError

__all__ = ["ImageFolderSource", "decode_image"]


def decode_image(path: str, mode: str, size: tuple[int, int] | None) -> npt.NDArray[np.uint8]:
    """The pixels of the image at ``path`` in Pillow ``mode`` ("L" or "RGB"), resized
    bilinearly to ``size`` = (width, height) when given: uint8 ``[H, W]`` or ``[H, W, 3]``.

    Raises:
        DataError: naming ``path``: missing, unreadable, not an image, or corrupt/truncated.
    """
    from PIL import Image  # lazy: devices without image data never import Pillow

    try:
        with Image.open(path) as opened:
            image = opened.convert(mode)  # decodes: a truncated or corrupt file fails here
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image is gone (removed since the data was scanned)") from None
    except Exception as exc:  # any failure to decode a user's file is that file's fault
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return opened.size
    except Exception as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


class _ImageDecoder:
    """Decodes the images of one snapshot by position (see the module docstring)."""

    def __init__(
        self,
        root: str,
        files: Sequence[str],
        labels: IndexArray,
        spec: LocalDataSpec,
    ) -> None:
        self._root = root
        self._files = files
        self._labels = labels
        self._channels = spec.image_channels
        self._mode = "L" if self._channels == 1 else "RGB"
        # Pillow sizes are (width, height); the spec's resize is [height, width].
        self._size = (spec.resize[1], spec.resize[0]) if spec.resize is not None else None
        self._resized = spec.resize is not None
        self._mean = self._per_channel(spec.mean)
        self._std = self._per_channel(spec.std)

    @staticmethod
    def _per_channel(values: tuple[float, ...] | None) -> npt.NDArray[np.float32] | None:
        return None if values is None else np.asarray(values, np.float32).reshape(-1, 1, 1)

    def __call__(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._size is None:
            # Without resize every image must have one size: the snapshot's first image's.
            self._size = _image_size(os.path.join(self._root, self._files[0]))
        width, height = self._size
        out = np.empty((len(positions), self._channels, height, width), dtype=np.float32)
        for j, position in enumerate(positions):
            path = os.path.join(self._root, self._files[position])
            pixels = decode_image(path, self._mode, self._size if self._resized else None)
            if pixels.shape[:2] != (height, width):
                raise DataError(
                    f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} pixels, the others "
                    f"{width}x{height} (set data.resize: [height, width] to resize every image)"
                )
            out[j] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out *= np.float32(1 / 255)
        if self._mean is not None and self._std is not None:
            out -= self._mean
            out /= self._std
        return torch.from_numpy(out), torch.from_numpy(self._labels[positions])


class ImageFolderSource(LocalSource):
    """Images in class directories (see the module docstring)."""

    def __init__(self, spec: LocalDataSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None  # the spec requires it for this format
        self.root: Path = spec.path
        self._tree = DirectoryCache(self.root, IMAGE_SUFFIXES)

    def _rescan(self) -> tuple[Snapshot, Work]:
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise DataError(f"data.path {self.root} {what} (an image folder: CLASS_NAME/*.png)")
        try:
            tree = self._tree.scan()
        except OSError as exc:
            raise DataError(f"data.path {self.root}: cannot be read ({exc.strerror})") from None
        files: list[str] = []
        labels: list[npt.NDArray[np.int64]] = []
        for listing in tree.listings:
            if not listing.rel_dir:
                continue  # images directly in the root belong to no class
            class_name = listing.rel_dir.split("/", 1)[0]
            label = self.label_space.index(class_name, str(self.root / listing.files[0]))
            files.extend(listing.files)
            labels.append(np.full(len(listing.files), label, dtype=np.int64))
        if not files:
            raise DataError(
                f"data.path {self.root}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})"
                f" in class directories; expected {self.root}/CLASS_NAME/IMAGE.png with "
                f"CLASS_NAME one of the run's classes ({self.label_space.describe()})"
            )
        all_labels = np.concatenate(labels)
        decoder = _ImageDecoder(os.fspath(self.root), files, all_labels, self.spec)
        return Snapshot(files, all_labels, decoder), Work(tree.listed, tree.reused)

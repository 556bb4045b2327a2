"""Examples for ``fleet-device predict --input FILE``: images, CSV rows or numpy arrays, as the
deployed model takes them (``[N, *input_shape]`` float32).

- **Images** (``.png .jpg .jpeg .bmp .gif .pgm .ppm .tif .tiff .webp``, or a directory of them,
  sorted by name; needs Pillow): converted to the model's channels (1: grey, 3: RGB), resized
  to its height and width, scaled to [0, 1] and normalised with the manifest's ``preprocess``
  (``(x - mean[c]) / std[c]``), as the training data was.
- **CSV** (``.csv``): one example per row, numbers only, ``prod(input_shape)`` of them in the
  model's (row-major) order; a first row that is not numeric is a header and skipped.
- **NumPy** (``.npy``, or ``.npz`` with an array ``x``, or exactly one array): ``[N, *shape]``,
  one example of ``shape``, or ``[N, prod(shape)]``.

CSV and NumPy values are the model's input as they are (already normalised). Problems raise
``DataError`` naming the file and, for CSV, the line.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "read_examples"]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
)
#: Most examples one input may hold (a guard against a mistaken, huge file).
MAX_EXAMPLES = 1_000_000

FloatArray = npt.NDArray[np.float32]


def read_examples(
    path: Path, input_shape: Sequence[int], preprocess: Mapping[str, Any] | None = None
) -> FloatArray:
    """The examples in ``path`` as float32 ``[N, *input_shape]`` (see the module docstring)."""
    shape = tuple(int(d) for d in input_shape)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return np.stack([_image(p, shape, preprocess or {}) for p in images[:MAX_EXAMPLES]])
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _image(path, shape, preprocess or {})[None]
    if suffix == ".csv":
        return _batch(_csv(path), shape, path)
    if suffix in (".npy", ".npz"):
        return _batch(_numpy(path), shape, path)
    raise DataError(
        f"{path}: unknown input type {suffix!r}; give an image, a .csv, a .npy or a .npz file"
    )


def _batch(array: npt.NDArray[Any], shape: tuple[int, ...], path: Path) -> FloatArray:
    size = int(np.prod(shape))
    values = np.asarray(array, dtype=np.float32)
    if values.shape == shape:
        return values[None]
    if values.ndim >= 1 and values.shape[1:] == shape:
        return values
    if values.ndim == 2 and values.shape[1] == size:
        return values.reshape((values.shape[0], *shape))
    raise DataError(
        f"{path}: an array of shape {list(values.shape)} is not examples of shape {list(shape)} "
        f"(give [N, {', '.join(map(str, shape))}] or [N, {size}])"
    )


def _numpy(path: Path) -> npt.NDArray[Any]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable numpy file: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        if "x" in names or len(names) == 1:
            array: npt.NDArray[Any] = loaded["x" if "x" in names else names[0]]
            return array
    raise DataError(f"{path}: holds arrays {names}; name the examples 'x'")


def _csv(path: Path) -> npt.NDArray[np.float32]:
    rows: list[list[float]] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for line, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                try:
                    rows.append([float(cell) for cell in row])
                except ValueError:
                    if line == 1 and not rows:
                        continue  # a header
                    raise DataError(f"{path}:{line}: not a row of numbers: {row[:5]}") from None
                if len(rows) > MAX_EXAMPLES:
                    raise DataError(f"{path}: more than {MAX_EXAMPLES} rows")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: rows have different numbers of values: {sorted(widths)}")
    return np.asarray(rows, dtype=np.float32)


def _image(path: Path, shape: tuple[int, ...], preprocess: Mapping[str, Any]) -> FloatArray:
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise DataError(
            f"{path}: the model takes examples of shape {list(shape)}, not images "
            "([channels, height, width] with 1 or 3 channels)"
        )
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow (pip install pillow)") from None
    channels, height, width = shape
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB").resize((width, height))
            pixels = np.asarray(converted, dtype=np.float32) / 255.0
    except OSError as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from None
    x = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    if preprocess:
        mean = np.asarray(preprocess["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(preprocess["std"], dtype=np.float32).reshape(-1, 1, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)

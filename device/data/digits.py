"""scikit-learn's bundled 8x8 digits: the dataset that needs no download."""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
import torch

from device.data.dataset import Dataset, IndexArray, Split, check_split
from device.errors import DataError
from device.seeding import derive_seed

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "load_digits"]

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
    check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = _digits_arrays()
    index = _digits_split(labels, test_fraction)[split]
    x = torch.from_numpy(images[index]).unsqueeze(1)
    x.div_(16.0).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    dataset = Dataset(x, torch.from_numpy(labels[index]), _DIGITS_CLASSES)
    return dataset.flatten() if flatten else dataset

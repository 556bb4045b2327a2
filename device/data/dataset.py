"""The Dataset type every loader returns: examples and labels as tensors, with their invariants.

``Split`` names the splits a loader serves; ``IndexArray`` is the sorted int64 index array that
the partitioners return and :meth:`Dataset.subset` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from device.errors import DataError

__all__ = ["Dataset", "IndexArray", "Split", "check_split"]

#: The splits a loader serves.
Split = Literal["train", "test"]
#: Example indices, e.g. one client's partition: a 1-D int64 array.
IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples and labels held as tensors (``eq=False``: tensors do not compare to one bool).

    Invariants (checked on construction, :class:`DataError` otherwise):
        - ``x`` is float32 with shape ``[N, C, H, W]`` (images), ``[N, C, L]`` (sequences, e.g.
          windows of sensor rows: channels x time steps) or ``[N, F]`` (features);
        - ``y`` is int64 with shape ``[N]``, every label in ``[0, num_classes)``;
        - ``num_classes >= 2``. ``N`` may be 0 (an empty subset).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() not in (2, 3, 4):
            raise DataError(
                f"Dataset.x must be float32 [N, C, H, W], [N, C, L] or [N, F], "
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


def check_split(split: str) -> None:
    """``ValueError`` unless ``split`` is one a loader serves ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: test, train")

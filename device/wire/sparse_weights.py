"""A received model's weights kept as they travelled (kept values and masks), dense on access.

A device agent keeps the newest snapshot of every run it trains in, between jobs. Decoded to
dense arrays, a sparse model costs one float32 per entry for as long as it is kept (25.7 MB for
femnist_cnn's fc1 at any density), on top of the model the job trains. :class:`SparseWeights`
holds the pruned tensors as their kept values and masks instead (2.6 MB at density 0.1) and
builds a dense array only when one is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from device.wire.codec import SparseTensor

__all__ = ["SparseWeights"]

FloatArray = npt.NDArray[np.float32]


class SparseWeights(Mapping[str, FloatArray]):
    """``name -> dense float32 array``, built from a :class:`SparseTensor` on every access.

    A tensor whose every entry is kept reads as a read-only view of its values (no copy); a
    pruned one as a new array, zero off its mask, that nothing here keeps: read each once.
    """

    def __init__(self, tensors: Mapping[str, SparseTensor]) -> None:
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> FloatArray:
        tensor = self._tensors[name]
        if tensor.values.size == tensor.mask.size:
            view = tensor.values.reshape(tensor.shape).view()
            view.flags.writeable = False
            return view
        return tensor.to_dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The dense shape of ``name``, without building it."""
        return self._tensors[name].shape

    def sparse(self, name: str) -> SparseTensor | None:
        """``name`` as it travelled (its mask and kept values), None where every entry is kept."""
        tensor = self._tensors[name]
        return None if tensor.values.size == tensor.mask.size else tensor

    def views(self) -> dict[str, FloatArray]:
        """The tensors that read without a copy (every entry kept), as read-only views."""
        return {
            name: self[name]
            for name, tensor in self._tensors.items()
            if tensor.values.size == tensor.mask.size
        }

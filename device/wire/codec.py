"""Sparse tensor codec: ``SparseTensor`` <-> protobuf ``sparsefleet.v1.SparseTensor``.

(To be completed by the codec work; the public names below are the contract other modules use.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A tensor given by its shape, a boolean mask and the values at the mask's positions.

    Invariants: ``mask.shape == shape``, ``mask.dtype == bool``, ``values`` is 1-D float32 with
    ``values.size == mask.sum()``, values in increasing flat (row-major) coordinate order.
    """

    shape: tuple[int, ...]
    mask: npt.NDArray[np.bool_]
    values: npt.NDArray[np.float32]

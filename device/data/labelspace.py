"""The run's label space: class names -> indices, and the one error for a label outside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from device.errors import DataError

__all__ = ["LabelSpace"]


class LabelSpace:
    """The run's classes; class ``i`` is ``names[i]``. Immutable.

    Every loader maps the labels it reads through :meth:`index` (names) or
    :meth:`check_indices` (integers), so a device whose data holds a label the run does not know
    fails with one :class:`DataError` naming the label and where it was found, before training.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if len(names) < 2:
            raise DataError(f"a label space needs at least 2 classes, got {list(names)}")
        self._names = tuple(names)
        self._index = {name: i for i, name in enumerate(self._names)}
        if len(self._index) != len(self._names):
            raise DataError(f"class names must be distinct, got {list(names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def positions(self) -> Mapping[str, int]:
        """Class name -> index (read-only view), for loops that look up many labels."""
        return MappingProxyType(self._index)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LabelSpace({list(self._names)!r})"

    def describe(self) -> str:
        """The classes as a message shows them: ``cat, dog`` (the first 20, then a count)."""
        shown = ", ".join(self._names[:20])
        more = len(self._names) - 20
        return shown + (f", ... ({more} more)" if more > 0 else "")

    def index(self, label: str, where: str) -> int:
        """The index of class ``label``; ``where`` (a file, a row) goes into the error.

        Raises:
            DataError: ``label`` is not one of the classes.
        """
        try:
            return self._index[label]
        except KeyError:
            raise self.outside(repr(label), where) from None

    def outside(self, label: str, where: str) -> DataError:
        """The error for ``label`` (already formatted) found at ``where``, outside the classes."""
        return DataError(
            f"{where}: label {label} is not one of the run's classes ({self.describe()})"
        )

    def check_indices(self, labels: npt.NDArray[np.integer], where: str) -> npt.NDArray[np.int64]:
        """``labels`` as int64 after checking each lies in ``[0, len(self))``.

        Raises:
            DataError: naming ``where``, the first offending position and its value.
        """
        labels = np.asarray(labels)
        bad = np.flatnonzero((labels < 0) | (labels >= len(self)))
        if bad.size:
            first = int(bad[0])
            raise self.outside(
                f"{int(labels[first])} (index {first}; classes are 0..{len(self) - 1})", where
            )
        return labels.astype(np.int64, copy=False)

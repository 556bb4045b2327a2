"""``format: python``: ``function: "module:function"`` returns a map-style torch Dataset.

The function is imported (``module`` must be importable in the device's environment, e.g. from
an installed package) and called at every scan, with ``kwargs`` and, when ``path`` is set,
``root=path`` (torchvision's convention), so it re-reads its own origin before each job. It
must return an object with ``__len__`` and ``__getitem__`` (``torch.utils.data.Dataset`` or
any sequence) whose item ``i`` is ``(x, label)``: ``x`` a tensor or numpy array of numbers,
the same shape for every item (``[F]``, ``[C, L]`` or ``[C, H, W]``), ``label`` an int in
``[0, len(classes))``. Items are fetched only when examples are decoded.

Identity: ``#INDEX``; growing data must therefore keep earlier items at their indices
(append), or the split moves. Every failure, import, call, wrong return type, a raising or
malformed item, is one ``DataError`` naming ``data.function`` (and the item).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data

from device.data.dataset import IndexArray
from device.data.labelspace import LabelSpace
from device.data.local_source import LocalSource, Snapshot, Work
from device.data.local_spec import LocalDataSpec
from device.errors import DataError

__all__ = ["PythonSource", "resolve_function"]


def resolve_function(target: str) -> Callable[..., Any]:
    """The callable named ``"module:attr.attr"``.

    Raises:
        DataError: naming ``data.function``: the module cannot be imported (with the import's
            own error), an attribute is missing, or the target is not callable.
    """
    setting = f"data.function {target!r}"
    module_name, _, attributes = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise DataError(
            f"{setting}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for name in attributes.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise DataError(f"{setting}: {module_name} has no attribute {attributes!r}") from None
    if not callable(obj):
        raise DataError(f"{setting}: {attributes!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


class _ItemDecoder:
    """Fetches items of one returned dataset and checks each (see the module docstring)."""

    def __init__(self, dataset: Any, labels: LabelSpace, setting: str) -> None:
        self._dataset = dataset
        self._labels = labels
        self._setting = setting

    def _where(self, index: int) -> str:
        return f"{self._setting}: item {index}"

    def _item(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            item = self._dataset[index]
        except Exception as exc:
            raise DataError(f"{self._where(index)} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(
                f"{self._where(index)} is {type(item).__name__}, expected a pair (x, label)"
            )
        x, label = item
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.from_numpy(np.asarray(x))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise DataError(
                    f"{self._where(index)}: x is not a tensor of numbers ({exc})"
                ) from None
        if x.dtype.is_complex:
            raise DataError(f"{self._where(index)}: x is not a tensor of real numbers ({x.dtype})")
        if not 1 <= x.dim() <= 3:
            raise DataError(
                f"{self._where(index)}: x is shaped {tuple(x.shape)}; an example must be [F], "
                "[C, L] or [C, H, W]"
            )
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise DataError(f"{self._where(index)}: label {label!r} is not an int class index")
        if not 0 <= label < len(self._labels):
            raise self._labels.outside(
                f"{int(label)} (classes are 0..{len(self._labels) - 1})", self._where(index)
            )
        return x, int(label)

    def __call__(self, positions: IndexArray) -> tuple[torch.Tensor, torch.Tensor]:
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        for position in positions.tolist():
            x, y = self._item(position)
            if xs and x.shape != xs[0].shape:
                raise DataError(
                    f"{self._setting}: item {position} is shaped {tuple(x.shape)}, item "
                    f"{int(positions[0])} {tuple(xs[0].shape)}; every item needs one shape"
                )
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        batch = torch.stack(xs).to(torch.float32)
        finite = torch.isfinite(batch.reshape(len(xs), -1)).all(dim=1)
        if not bool(finite.all()):
            bad = int(positions[int((~finite).nonzero()[0])])
            raise DataError(f"{self._setting}: item {bad}: x holds a value that is not finite")
        return batch, torch.tensor(ys, dtype=torch.int64)


class PythonSource(LocalSource):
    """A dataset built by the user's function (see the module docstring)."""

    def __init__(self, spec: LocalDataSpec) -> None:
        super().__init__(spec)
        assert spec.function is not None  # the spec requires it for this format
        self.setting = f"data.function {spec.function!r}"
        self._function: Callable[..., Any] | None = None

    def _rescan(self) -> tuple[Snapshot, Work]:
        if self._function is None:
            self._function = resolve_function(self.spec.function or "")
        kwargs = dict(self.spec.kwargs or {})
        if self.spec.path is not None:
            kwargs["root"] = str(self.spec.path)
        try:
            dataset = self._function(**kwargs)
        except Exception as exc:
            raise DataError(f"{self.setting} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise DataError(
                f"{self.setting} returned an iterable-style dataset ({type(dataset).__name__}); "
                "a map-style one (__len__ and __getitem__) is needed to split it"
            )
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DataError(
                f"{self.setting} returned {type(dataset).__name__}, not a map-style torch "
                "Dataset (an object with __len__ and __getitem__)"
            )
        try:
            size = len(dataset)
        except Exception as exc:
            raise DataError(f"{self.setting}: len() of its dataset raised {exc!r}") from exc
        if not size:
            raise DataError(f"{self.setting} returned an empty dataset")
        identities = [f"#{i}" for i in range(size)]
        decoder = _ItemDecoder(dataset, self.label_space, self.setting)
        # Items are stacked from a list: decoding everything at once would hold it twice.
        return Snapshot(identities, None, decoder, chunk=1024), Work(1, 0)

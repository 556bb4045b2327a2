"""Building a model on the ``meta`` device without running its initialisers.

A model built under ``torch.device("meta")`` has shapes and dtypes but no values, so its
layers' ``reset_parameters`` (``nn.init.kaiming_uniform_`` and friends) compute nothing worth
keeping. They still run, and on torch 2.7.1 (the Raspberry Pi's pin) an initialiser on a meta
tensor goes through a Python reference implementation that imports
``torch.fx.experimental.symbolic_shapes`` and sympy: 33 MB for every job on arm64
(docs/benchmarks.md, "Where the memory goes"). :func:`on_meta` builds with the ``nn.init``
functions skipping meta tensors.

The skip is per tensor, not per thread: while any :func:`on_meta` block is open the
``nn.init`` functions are wrappers that return a meta tensor untouched and call the original on
any other tensor, so another thread initialising a real model meanwhile gets exactly the values
it would have got.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import init

__all__ = ["on_meta"]

# The in-place initialisers of torch.nn.init (``init.kaiming_uniform_(self.weight, ...)``: the
# layers look them up on the module at call time, so replacing the attribute reaches them).
_INITIALISERS = tuple(
    name
    for name in dir(init)
    if name.endswith("_") and not name.startswith("_") and callable(getattr(init, name))
)

_lock = threading.Lock()
_depth = 0
_originals: dict[str, Callable[..., Any]] = {}


def _skipping_meta(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialise(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return original(tensor, *args, **kwargs)

    return initialise


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build under ``torch.device("meta")`` with ``nn.init`` skipping meta tensors. Re-entrant
    and safe to open from several threads at once (the last to close restores ``nn.init``)."""
    global _depth
    with _lock:
        if _depth == 0:
            for name in _INITIALISERS:
                original = getattr(init, name)
                _originals[name] = original
                setattr(init, name, _skipping_meta(original))
        _depth += 1
    try:
        with torch.device("meta"):
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, original in _originals.items():
                    setattr(init, name, original)
                _originals.clear()

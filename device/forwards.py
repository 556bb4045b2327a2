"""Instance-level ``forward`` overrides of modules, recorded so that they can be undone.

The sparse kernels (``device.sparse.kernels``) and the gradient buffers (``device.gradbuffers``)
change how a layer computes without touching its parameters or ``state_dict``: they set a bound
method as the module's own ``forward`` attribute, which ``nn.Module.__call__`` prefers over the
class's. One layer takes at most one override at a time; :meth:`ForwardOverrides.restore` puts
back exactly what was there (usually nothing, so the class's ``forward`` applies again).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

from device.errors import ConfigError


def is_overridden(module: nn.Module) -> bool:
    """True when ``module`` has an instance-level ``forward`` (a bound method) of its own."""
    return isinstance(module.__dict__.get("forward"), types.MethodType)


class ForwardOverrides:
    """The overrides one owner installed; :meth:`restore` undoes all of them (idempotent)."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, Any]] = []

    def install(
        self, module: nn.Module, forward: Callable[..., Any], *, what: str = "layer"
    ) -> None:
        """Make ``forward(module, *inputs)`` the module's forward.

        Raises ``ConfigError`` naming ``what`` if the module already has an override (two
        owners would otherwise restore each other's).
        """
        if is_overridden(module):
            raise ConfigError(f"{what} already has an overridden forward (attached twice?)")
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(forward, module)

    def restore(self) -> None:
        """Give every module back the ``forward`` it had before :meth:`install`."""
        for module, saved in reversed(self._saved):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._saved.clear()

"""Registered model names: the built-ins and the entry points of group ``sparsefleet.models``.

An installed package registers a model as Flower or pytest plugins register themselves, in its
``pyproject.toml``::

    [project.entry-points."sparsefleet.models"]
    sensor_cnn = "my_pkg.models:build"

and a run may then say ``model: sensor_cnn``. The value is a callable returning a
``torch.nn.Module``; it may carry ``input_shape`` (one example, without the batch dimension)
and ``num_classes`` attributes, which run files are checked against.

The built-ins are ordinary entries of the same group (sparsefleet's own ``pyproject.toml``
registers them), and :data:`BUILTIN` holds the same table for a source checkout whose package
metadata is not installed. Their names are reserved: another package registering one of them is
ignored with a warning. Two packages registering the same new name for different callables make
that name ambiguous: using it is a ``ConfigError`` naming both.

Discovery reads the installed metadata at every call (about 3 ms), so a package installed or
put on ``sys.path`` while the process runs is found. Nothing here imports torch; a factory's
module is imported only by :func:`load_factory`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from device.errors import ConfigError
from device.model_ref import FACTORY_PATTERN, NAME_PATTERN

__all__ = [
    "BUILTIN",
    "GROUP",
    "ModelEntry",
    "ModelFactoryError",
    "load_factory",
    "lookup",
    "model_names",
    "registered",
]

log = logging.getLogger(__name__)

#: The entry-point group that packages register models in.
GROUP = "sparsefleet.models"

#: The built-in models: name -> ``module:callable`` (the same entries as pyproject.toml's).
BUILTIN: Mapping[str, str] = MappingProxyType(
    {
        "cifar_cnn": "device.models:CifarCNN",
        "femnist_cnn": "device.models:FemnistCNN",
        "mlp": "device.models:MLP",
        "mnist_cnn": "device.models:MnistCNN",
    }
)


class ModelFactoryError(ConfigError, ValueError):
    """A model cannot be built: its factory cannot be imported, raised, or returned something
    that is not a ``torch.nn.Module``. The message names the factory. A ``ValueError`` too, as
    registries' refusals are (DESIGN section 10.6)."""


@dataclass(frozen=True)
class ModelEntry:
    """One registration: ``target`` is ``module:callable``; ``origin`` is ``"built-in"`` or the
    registering distribution (``"name version"``)."""

    name: str
    target: str
    origin: str


def _entry_points() -> list[tuple[str, str, str]]:
    """(name, target, origin) of every entry point of :data:`GROUP`, in discovery order."""
    found = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        found.append((ep.name, ep.value.replace(" ", ""), origin))
    return found


def registered() -> dict[str, tuple[ModelEntry, ...]]:
    """Every registered name -> its entries (one, or several distinct ones: ambiguous).

    Entries with a malformed name or target are skipped with a warning (one bad package must
    not take the others down); so is an entry point that claims a built-in name for another
    callable.
    """
    table: dict[str, list[ModelEntry]] = {
        name: [ModelEntry(name, target, "built-in")] for name, target in BUILTIN.items()
    }
    for name, target, origin in _entry_points():
        if not NAME_PATTERN.fullmatch(name) or not FACTORY_PATTERN.fullmatch(target):
            log.warning(
                "entry point %r = %r of group %s (%s) ignored: expected a model name and "
                "'package.module:callable'",
                name,
                target,
                GROUP,
                origin,
            )
            continue
        entries = table.setdefault(name, [])
        if any(entry.target == target for entry in entries):
            continue  # the same registration seen twice (e.g. sparsefleet's own built-ins)
        if name in BUILTIN:
            log.warning(
                "entry point %r = %r (%s) ignored: %r is a built-in model name",
                name,
                target,
                origin,
                name,
            )
            continue
        entries.append(ModelEntry(name, target, origin))
    return {name: tuple(entries) for name, entries in table.items()}


def model_names() -> list[str]:
    """The registered model names (built-ins and entry points), sorted."""
    return sorted(registered())


def lookup(name: str) -> ModelEntry:
    """The one entry registered as ``name``.

    Raises:
        ValueError: no model is registered as ``name`` (the message lists the known names).
        ConfigError: two packages register ``name`` for different callables.
    """
    if name in BUILTIN:
        # A built-in name is never anyone else's (``registered`` ignores such claims), so the
        # installed metadata (about 3 ms a scan, once per job on a device) need not be read.
        return ModelEntry(name, BUILTIN[name], "built-in")
    table = registered()
    entries = table.get(name)
    if not entries:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(table))}")
    if len(entries) > 1:
        listed = "; ".join(f"{e.target} (from {e.origin})" for e in entries)
        raise ConfigError(
            f"model name {name!r} is registered by more than one package: {listed}; "
            "uninstall one, or name the model by its factory ('package.module:callable')"
        )
    return entries[0]


def load_factory(target: str, what: str) -> Callable[..., Any]:
    """The callable ``target`` (``"module:attr.attr"``), imported.

    ``what`` names it in errors, e.g. ``"model factory 'my_pkg.models:build'"``.

    Raises:
        ModelFactoryError: the module cannot be imported (with the import's own error), an
            attribute is missing, or the target is not callable.
    """
    module_name, _, attributes = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ModelFactoryError(
            f"{what}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for part in attributes.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelFactoryError(
                f"{what}: module {module_name!r} has no {attributes!r}"
            ) from None
    if not callable(obj):
        raise ModelFactoryError(f"{what}: {attributes!r} is not callable ({type(obj).__name__})")
    return obj  # type: ignore[no-any-return]

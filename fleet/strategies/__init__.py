"""Server strategies: each configures a round and aggregates; the loop lives in
``fleet.runtime.runner``.

``create_strategy("feddst", density=0.2, training={"epochs": 10})`` builds a strategy by name with
its options (``LocalTraining`` fields may be given as a mapping and enums by value, as YAML
configs give them); ``strategy_names()`` lists the known names.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

from device.errors import ConfigError
from device.wire.messages import LocalTraining
from fleet.strategies.base import (
    Candidate,
    ClientResult,
    GlobalModel,
    InitialJob,
    RoundConfig,
    Strategy,
)
from fleet.strategies.fedavg import FedAvg, FedAvgM, FedAvgMOptions, FedAvgOptions
from fleet.strategies.feddst import FedDST, FedDSTOptions
from fleet.strategies.prunefl import CostModel, PruneFL, PruneFLOptions

__all__ = [
    "Candidate",
    "ClientResult",
    "CostModel",
    "FedAvg",
    "FedAvgM",
    "FedAvgMOptions",
    "FedAvgOptions",
    "FedDST",
    "FedDSTOptions",
    "GlobalModel",
    "InitialJob",
    "PruneFL",
    "PruneFLOptions",
    "RoundConfig",
    "Strategy",
    "create_strategy",
    "strategy_names",
]

# name -> (options dataclass, factory taking the options)
_STRATEGIES: dict[str, tuple[type[Any], Callable[[Any], Strategy]]] = {
    "fedavg": (FedAvgOptions, FedAvg),
    "fedavgm": (FedAvgMOptions, FedAvgM),
    "feddst": (FedDSTOptions, FedDST),
    "prunefl": (PruneFLOptions, PruneFL),
}


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_STRATEGIES)


def _coerce(name: str, field: dataclasses.Field[Any], value: Any) -> Any:
    """Turn config-file values into the option's type: mappings into LocalTraining, strings into
    enums. Anything else is passed through for the options' own checks."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if isinstance(default, LocalTraining) and isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(LocalTraining)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"{name}: unknown training option(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        return LocalTraining(**value)
    if isinstance(default, enum.Enum) and isinstance(value, str):
        enum_type = type(default)
        try:
            return enum_type(value)
        except ValueError:
            known_values = ", ".join(str(m.value) for m in enum_type)
            raise ConfigError(
                f"{name}: {field.name} must be one of {known_values}, got {value!r}"
            ) from None
    return value


def create_strategy(name: str, **options: Any) -> Strategy:
    """The strategy called ``name`` with ``options`` (fields of its options dataclass).

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``ConfigError`` for an
    unknown or invalid option.
    """
    try:
        options_type, factory = _STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; known: {', '.join(strategy_names())}"
        ) from None
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"{name}: unknown option(s) {unknown}; known: {', '.join(sorted(fields))}"
        )
    values = {key: _coerce(name, fields[key], value) for key, value in options.items()}
    return factory(options_type(**values))

"""Values to and from SQLite columns: canonical JSON text and checked identifiers.

JSON columns hold ``json.dumps(..., sort_keys=True, separators=(",", ":"))`` of the value with
non-finite floats written as null, so equal values give equal text (and every store ever written
reads back the same). Every repository of the store converts through these functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def finite_json(value: Any) -> Any:
    """JSON has no NaN/Inf: store non-finite floats as null rather than fail a round close."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return finite_json(value.item())
    return value


def dumps(value: Any, what: str) -> str:
    """Canonical JSON text of ``value``; ValueError naming ``what`` if it is not JSON-able."""
    try:
        return json.dumps(finite_json(value), sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc


def loads(text: str) -> Any:
    """The value of a JSON column."""
    return json.loads(text)


def non_empty(value: str, what: str) -> str:
    """``value`` if it is a non-empty string, else ValueError naming ``what``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value

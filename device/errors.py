"""The named exceptions of SparseFleet and their process exit codes.

Every error a user can cause maps to one exception class here; the CLIs translate them into one
clear line and the exit code below (``fleet.cli`` and ``device.cli`` are the only places that do).
Messages say what was wrong and where (file, field, device, topic), never just "invalid".
"""

from __future__ import annotations


class SparseFleetError(Exception):
    """Base class; ``exit_code`` is what a CLI exits with when this escapes a command."""

    exit_code = 1


class ConfigError(SparseFleetError):
    """A configuration file or option is invalid (the message names the file, line and field)."""

    exit_code = 3


class BrokerUnavailableError(SparseFleetError):
    """The MQTT broker cannot be reached or refused the connection."""

    exit_code = 4


class SessionTakenOverError(BrokerUnavailableError):
    """Another MQTT client connected with this client's id and took over its session.

    The connection stops instead of taking the session back (the two would fight forever);
    ``client_id`` is the shared id. Exits with the broker code (4), like any lost broker.
    """

    def __init__(self, message: str, *, client_id: str = "") -> None:
        super().__init__(message)
        self.client_id = client_id


class NotFoundError(SparseFleetError):
    """A named run, device, model or file does not exist."""

    exit_code = 5


class DataError(SparseFleetError):
    """A dataset is missing, incomplete or fails its checksum."""

    exit_code = 6


class DecodeError(SparseFleetError, ValueError):
    """A message or tensor on the wire is malformed; ``reason`` is a short machine-readable code.

    Subclasses say which part was wrong. Decoders raise only this family for bad input, never
    IndexError, MemoryError or protobuf's own exceptions.
    """

    exit_code = 7

    def __init__(self, message: str, *, reason: str = "bad_message") -> None:
        super().__init__(message)
        self.reason = reason


class TensorDecodeError(DecodeError):
    """A SparseTensor's shape, values, positions, dtype or mask reference is inconsistent."""


class EnvelopeDecodeError(DecodeError):
    """The envelope is not protobuf, has the wrong schema version, or the wrong kind."""


class ChunkError(DecodeError):
    """A chunked payload is incomplete, oversized or fails its SHA-256."""


class ValidationError(SparseFleetError):
    """A well-formed update that must not be aggregated (stale round, foreign mask, NaN, ...).

    ``reason`` is a short code counted per device, e.g. ``"stale_round"`` or ``"non_finite"``.
    """

    exit_code = 8

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

"""What a device id may be: the one rule both the device agent and the fleet manager apply.

A device id is the MQTT username, the MQTT client id, the certificate CN, one topic level, a line
key in the broker's password file and part of file names. So it is kept to 1..64 characters from
``A-Z a-z 0-9 . _ -``, starting with a letter or digit (no ``/ + # :``, no whitespace, no
``..``-style path tricks), and it must not be one of the ``RESERVED_NAMES`` nor start with
``RESERVED_PREFIX``: a device connecting under the fleet manager's client id would take over the
fleet manager's persistent MQTT session (its queued updates, its subscriptions) on any broker
that does not force client id = username.

``fleet.ops.certs`` (before signing), ``fleet.ops.enroll`` (before creating an account) and
``device.settings`` (when a device config loads, before connecting) all call
``device_id_problem`` / ``validate_device_id`` from here; nothing else defines the rule.
"""

from __future__ import annotations

import re

from device.errors import ConfigError

__all__ = [
    "DEVICE_ID_PATTERN",
    "FLEET_MANAGER_USER",
    "MAX_DEVICE_ID_CHARS",
    "RESERVED_NAMES",
    "RESERVED_PREFIX",
    "device_id_problem",
    "validate_device_id",
]

FLEET_MANAGER_USER = "fleet-manager"
"""The fleet manager's MQTT account (username and client id); the ACL gives it ``fl/v1/#``."""

RESERVED_NAMES = frozenset({FLEET_MANAGER_USER, "ca", "server", "admin", "root", "mosquitto"})
"""Names no device may take: the fleet manager's account (a device holding it would get full
access) and the names of files or accounts that live next to device entries."""

RESERVED_PREFIX = f"{FLEET_MANAGER_USER}-"
"""The fleet manager's further client ids are its account name plus a role
(``fleet-manager-coordinator``); no device id may start with it."""

MAX_DEVICE_ID_CHARS = 64

DEVICE_ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_DEVICE_ID_CHARS - 1}}}")
"""A whole device id (use ``fullmatch``); ASCII only, so characters and bytes coincide."""


def device_id_problem(device_id: object) -> str | None:
    """Why ``device_id`` may not be a device id, as a phrase that follows the id in a message
    (``"is reserved; ..."``), or ``None`` when it may."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        return (
            f"is not allowed: use 1 to {MAX_DEVICE_ID_CHARS} characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    if device_id in RESERVED_NAMES:
        return f"is reserved; reserved: {', '.join(sorted(RESERVED_NAMES))}"
    if device_id.startswith(RESERVED_PREFIX):
        return f"is reserved: ids starting with {RESERVED_PREFIX!r} are the fleet manager's"
    return None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it may be a device id; raise ``ConfigError`` saying why not."""
    problem = device_id_problem(device_id)
    if problem is not None:
        raise ConfigError(f"device id {device_id!r} {problem}")
    return device_id

"""Which devices a deployment addresses (``--to all|DEVICE|tag=K=V``) and which of them are its
canaries (``--canary N%``).

``all`` addresses every device the registry knows *and* every device that connects later (the
notice says ``all_devices``); a tag addresses the registry's devices with that tag now (tags
are the operator's and the device's, as ``fleet devices list`` shows them); a device id
addresses that device, known or not yet (it finds the retained notice when it connects).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from device.errors import ConfigError, NotFoundError
from device.identity import device_id_problem
from fleet.ops.registry import DeviceInfo

__all__ = ["Targets", "pick_canaries", "resolve_targets"]


@dataclass(frozen=True)
class Targets:
    """``devices``: addressed by name, sorted; ``all_devices``: also any device seen later;
    ``label``: the ``--to`` text, stored with the deployment."""

    devices: tuple[str, ...]
    all_devices: bool
    label: str


def resolve_targets(to: str, devices: Iterable[DeviceInfo]) -> Targets:
    """The devices ``to`` names among ``devices`` (the registry's). ``NotFoundError`` when a
    tag matches none; ``ConfigError`` for a malformed ``to``."""
    known = sorted(devices, key=lambda d: d.device_id)
    if to == "all":
        return Targets(tuple(d.device_id for d in known), True, to)
    if to.startswith("tag="):
        condition = to[len("tag=") :]
        if not condition or condition.startswith("="):
            raise ConfigError(f"--to {to!r}: expected tag=KEY=VALUE or tag=KEY")
        chosen = tuple(d.device_id for d in known if d.matches(condition))
        if not chosen:
            raise NotFoundError(
                f"no device has tag {condition!r}; see the tags with `fleet devices list`"
            )
        return Targets(chosen, False, to)
    problem = device_id_problem(to)
    if problem is not None:
        raise ConfigError(f"--to {to!r}: {problem} (give all, a device id or tag=KEY=VALUE)")
    return Targets((to,), False, to)


def pick_canaries(targets: Targets, online: Iterable[str], percent: float) -> tuple[str, ...]:
    """``ceil(percent% of the addressed devices)`` canaries (at least one when ``percent`` > 0;
    none when 0), online devices first, then by id; ``ConfigError`` outside 0..100."""
    if not 0.0 <= percent <= 100.0:
        raise ConfigError(f"--canary must be between 0% and 100%, got {percent}%")
    if percent == 0.0 or not targets.devices:
        return ()
    count = max(1, math.ceil(len(targets.devices) * percent / 100.0))
    up = set(online)
    ordered = sorted(targets.devices, key=lambda d: (d not in up, d))
    return tuple(sorted(ordered[:count]))

"""The device registry: who is in the fleet, who is online, and who may be given work.

Built from the devices' retained status messages (births) and last wills, and persisted through
``fleet.state.store.Store`` so that ``fleet devices list`` in another process sees the same state
as the runner. Nothing is cached in memory: every read goes to SQLite, so an operator's cordon
from the CLI takes effect at the runner's next selection.

Ordering of status messages. Each agent session has a ``session_epoch`` that grows from one
session to the next. A status message is applied only if its key ``(epoch, offline)`` is at least
the stored one, offline ranking above online within an epoch. Hence: a newer session's birth
replaces everything; an older epoch's will never marks a newer session offline; a stale birth
(older epoch, or the same epoch after its will) is ignored; repeating the current birth refreshes
it (the retained status is delivered again after every fleet-manager reconnect).

Tags. A device reports tags in its birth (``"site=lab"`` or a bare label ``"arm64"``, which
becomes ``{"arm64": ""}``); the operator adds or overrides tags with ``tag``. ``DeviceInfo.tags``
is the merge, the operator's value winning. Selectors are a mapping (key equals value) or a
sequence of ``"key"`` (key present) / ``"key=value"`` (key equals value) strings; all must match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from device.errors import NotFoundError
from device.model_ref import ModelOffer
from device.wire.messages import DeviceProfile, DeviceStatus, Hardware, LayerProfile, ProfilePoint
from fleet.state.store import DeviceRecord, Store

__all__ = [
    "DeviceCounters",
    "DeviceInfo",
    "DeviceRegistry",
    "TagSelector",
    "info_from_record",
    "parse_tag_selector",
    "parse_tags",
    "profile_from_json",
    "profile_to_json",
    "status_supersedes",
]

TagSelector = tuple[tuple[str, str | None], ...]
"""Parsed selector: (key, required value or None for "key present")."""


@dataclass(frozen=True)
class DeviceCounters:
    """Per-device totals since the device was first seen (exact after a crash: each moves in the
    same transaction as the fact it counts).

    ``rounds_joined``: rounds it was selected into. ``updates_accepted``: updates stored (late
    ones included). ``failures``: jobs it reported failed. ``rejections``: rejected messages by
    reason. Bytes are payload bytes, ``up`` = device to fleet.
    """

    rounds_joined: int = 0
    updates_accepted: int = 0
    failures: int = 0
    rejections: Mapping[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def total_rejections(self) -> int:
        return sum(self.rejections.values())


@dataclass(frozen=True)
class DeviceInfo:
    """What the runner and strategies know about a device.

    ``last_seen`` is Unix seconds of the last message applied from it (None if never).
    ``session_epoch`` is None until a status message arrived. ``dataset_size`` is its number of
    local training examples. ``profile`` is its measured speed (PruneFL's cost model) if sent.
    ``models`` are the models it announced it can build, with their architecture digests (none
    from an older agent: the runner assumes the built-ins).
    ``cordoned``: take no new work; ``drained``: take no new work and cancel the current job.
    """

    device_id: str
    online: bool
    last_seen: float | None
    session_epoch: int | None
    agent_version: str
    dataset_size: int
    profile: DeviceProfile | None
    tags: Mapping[str, str]
    cordoned: bool
    drained: bool
    counters: DeviceCounters
    hardware: Hardware = field(default_factory=Hardware)
    last_failure: str = ""
    eval_examples: int = 0  # examples it evaluates on (0: not reported, an older agent)
    models: tuple[ModelOffer, ...] = ()  # what it can build (its status); () = not announced

    @property
    def schedulable(self) -> bool:
        """Online and neither cordoned nor drained."""
        return self.online and not self.cordoned and not self.drained

    def matches(self, selector: Mapping[str, str] | Sequence[str] | str) -> bool:
        """True if every condition of the tag selector holds for this device."""
        return _matches(self.tags, parse_tag_selector(selector))


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def status_supersedes(
    current_epoch: int | None, current_online: bool, new_epoch: int, new_online: bool
) -> bool:
    """Whether a status message of ``new_epoch`` replaces the stored state.

    Order key is ``(epoch, offline)``: newer sessions win, and within one session the will
    (offline) is final, so a redelivered birth cannot resurrect a device that went offline.
    Equal keys apply (a repeated birth refreshes the status). No stored epoch: always applies.
    """
    if current_epoch is None:
        return True
    return (new_epoch, not new_online) >= (current_epoch, not current_online)


def parse_tags(tags: Iterable[str]) -> dict[str, str]:
    """``("site=lab", "arm64")`` -> ``{"site": "lab", "arm64": ""}``; ValueError on an empty key."""
    out: dict[str, str] = {}
    for tag in tags:
        key, _, value = tag.partition("=")
        if not key:
            raise ValueError(f"tag {tag!r} has an empty key; use 'key' or 'key=value'")
        out[key] = value
    return out


def parse_tag_selector(selector: Mapping[str, str] | Sequence[str] | str) -> TagSelector:
    """Normalise a selector: a mapping means key == value; strings are "key" or "key=value".

    A single string is one condition (not a sequence of characters).
    """
    if isinstance(selector, Mapping):
        items: list[tuple[str, str | None]] = [(str(k), str(v)) for k, v in selector.items()]
    else:
        conditions = [selector] if isinstance(selector, str) else list(selector)
        items = []
        for cond in conditions:
            if not isinstance(cond, str):
                raise ValueError(f"tag selector entry {cond!r} is not a string")
            key, sep, value = cond.partition("=")
            items.append((key, value if sep else None))
    for key, _ in items:
        if not key:
            raise ValueError(f"tag selector {selector!r} has an empty key")
    return tuple(items)


def _matches(tags: Mapping[str, str], selector: TagSelector) -> bool:
    return all(key in tags and (value is None or tags[key] == value) for key, value in selector)


def profile_to_json(profile: DeviceProfile) -> dict[str, Any]:
    """A DeviceProfile as plain JSON-able data (inverse: ``profile_from_json``)."""
    return asdict(profile)


def profile_from_json(data: Mapping[str, Any]) -> DeviceProfile:
    """Rebuild a DeviceProfile stored by ``profile_to_json``; ValueError if malformed."""
    try:
        layers = tuple(
            LayerProfile(
                name=str(layer["name"]),
                numel=int(layer["numel"]),
                points=tuple(
                    ProfilePoint(
                        density=float(p["density"]),
                        dense_s=float(p["dense_s"]),
                        sparse_s=float(p.get("sparse_s", 0.0)),
                    )
                    for p in layer["points"]
                ),
            )
            for layer in data["layers"]
        )
        return DeviceProfile(
            model_name=str(data["model_name"]),
            batch_size=int(data["batch_size"]),
            step_overhead_s=float(data["step_overhead_s"]),
            layers=layers,
            uplink_bytes_per_s=float(data.get("uplink_bytes_per_s", 0.0)),
            downlink_bytes_per_s=float(data.get("downlink_bytes_per_s", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"stored device profile is malformed: {exc!r}") from exc


def _status_json(status: DeviceStatus) -> dict[str, Any]:
    return {
        "hardware": asdict(status.hardware),
        "dataset_size": status.dataset_size,
        "eval_examples": status.eval_examples,
        "profile": None if status.profile is None else profile_to_json(status.profile),
        "reported_tags": list(status.tags),
        "timestamp_unix_s": status.timestamp_unix_s,
        "models": [offer.to_json() for offer in status.models],
    }


def _hardware_from_json(data: Mapping[str, Any]) -> Hardware:
    # Only known fields: a row written by another agent version may have more or fewer.
    known = {f.name for f in fields(Hardware)}
    return Hardware(**{k: v for k, v in data.items() if k in known})


def _info_from_record(record: DeviceRecord) -> DeviceInfo:
    status = record.status
    reported = parse_tags(status.get("reported_tags", ()))
    profile_data = status.get("profile")
    hardware_data = status.get("hardware") or {}
    return DeviceInfo(
        device_id=record.device_id,
        online=record.online,
        last_seen=record.last_seen,
        session_epoch=record.session_epoch,
        agent_version=record.agent_version,
        dataset_size=int(status.get("dataset_size", 0)),
        profile=None if profile_data is None else profile_from_json(profile_data),
        tags={**reported, **record.tags},
        cordoned=record.cordoned,
        drained=record.drained,
        counters=DeviceCounters(
            rounds_joined=record.rounds_joined,
            updates_accepted=record.updates_accepted,
            failures=record.failures,
            rejections=dict(record.rejections),
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
        ),
        hardware=_hardware_from_json(hardware_data),
        last_failure=record.last_failure,
        eval_examples=int(status.get("eval_examples", 0)),
        models=_models_from_json(status.get("models") or ()),
    )


def info_from_record(record: DeviceRecord) -> DeviceInfo:
    """The registry's view of one stored device row (what ``DeviceRegistry.devices`` gives per
    row), for readers that list the rows themselves and keep the views of unchanged ones."""
    return _info_from_record(record)


def _models_from_json(data: Iterable[Mapping[str, Any]]) -> tuple[ModelOffer, ...]:
    # A row another version wrote may hold an offer this version cannot read: skip it, the
    # device announces again at its next birth.
    offers = []
    for item in data:
        try:
            offers.append(ModelOffer.from_json(item))
        except (ValueError, TypeError, AttributeError):
            continue
    return tuple(offers)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class DeviceRegistry:
    """Devices as the fleet manager sees them, persisted in ``store``.

    ``clock`` gives Unix seconds. ``stale_after_s``: when set, ``eligible`` also skips devices
    not heard from for longer than that (a guard against a lost will); None trusts the broker's
    will entirely, which is right for MQTT keep-alive.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        stale_after_s: float | None = None,
    ) -> None:
        if stale_after_s is not None and stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0 seconds, got {stale_after_s}")
        self.store = store
        self._clock = clock
        self._stale_after_s = stale_after_s

    def apply_status(
        self, device_id: str, status: DeviceStatus, *, received_at: float | None = None
    ) -> bool:
        """Apply a birth (``status.online``) or will; True if it changed the registry.

        Ignored (False) when older than the stored state by ``status_supersedes``.
        ``received_at`` (default: now) becomes ``last_seen``; the device's own clock is kept
        only for display.
        """
        parse_tags(status.tags)  # refuse malformed tags before anything is stored

        def accept(current: DeviceRecord | None) -> bool:
            if current is None:
                return True
            return status_supersedes(
                current.session_epoch, current.online, status.session_epoch, status.online
            )

        return self.store.update_device_status(
            device_id,
            online=status.online,
            session_epoch=status.session_epoch,
            agent_version=status.agent_version,
            status=_status_json(status),
            seen_at=self._clock() if received_at is None else received_at,
            accept=accept,
        )

    def touch(self, device_id: str, at: float | None = None) -> bool:
        """Note any message from the device (event, update); False if the device is unknown."""
        return self.store.touch_device(device_id, self._clock() if at is None else at)

    def find(self, device_id: str) -> DeviceInfo | None:
        record = self.store.get_device(device_id)
        return None if record is None else _info_from_record(record)

    def get(self, device_id: str) -> DeviceInfo:
        """NotFoundError if the device was never seen."""
        info = self.find(device_id)
        if info is None:
            raise NotFoundError(f"no device {device_id!r} in the registry")
        return info

    def devices(self, *, online: bool | None = None) -> list[DeviceInfo]:
        """Every known device ordered by id, optionally only the online (or offline) ones."""
        infos = [_info_from_record(r) for r in self.store.list_devices()]
        return infos if online is None else [d for d in infos if d.online == online]

    def eligible(
        self,
        tags: Mapping[str, str] | Sequence[str] | str = (),
        now: float | None = None,
    ) -> list[DeviceInfo]:
        """Devices that may be selected now, ordered by id: online, not cordoned, not drained,
        matching every tag condition, and (with ``stale_after_s``) heard from recently."""
        selector = parse_tag_selector(tags)
        when = self._clock() if now is None else now
        out = []
        for info in self.devices(online=True):
            if not info.schedulable or not _matches(info.tags, selector):
                continue
            if self._stale_after_s is not None and (
                info.last_seen is None or when - info.last_seen > self._stale_after_s
            ):
                continue
            out.append(info)
        return out

    def cordon(self, device_id: str) -> DeviceInfo:
        """No new rounds for this device; a job it is running finishes normally."""
        return _info_from_record(self.store.set_device_flags(device_id, cordoned=True))

    def drain(self, device_id: str) -> DeviceInfo:
        """No new rounds, and the runner cancels the device's current job."""
        return _info_from_record(self.store.set_device_flags(device_id, drained=True))

    def uncordon(self, device_id: str) -> DeviceInfo:
        """Make the device schedulable again (clears both cordon and drain)."""
        return _info_from_record(
            self.store.set_device_flags(device_id, cordoned=False, drained=False)
        )

    def tag(self, device_id: str, tags: Mapping[str, str] | Sequence[str] | str) -> DeviceInfo:
        """Add or override operator tags ("key=value", bare "label", or a mapping)."""
        if isinstance(tags, Mapping):
            new = {str(k): str(v) for k, v in tags.items()}
        else:
            new = parse_tags([tags] if isinstance(tags, str) else tags)
        for key in new:
            if not key:
                raise ValueError(f"tag of device {device_id!r} has an empty key")
        return _info_from_record(self.store.update_device_tags(device_id, set_tags=new))

    def untag(self, device_id: str, keys: Iterable[str] | str) -> DeviceInfo:
        """Remove operator tags by key (tags the device reports itself stay)."""
        remove = [keys] if isinstance(keys, str) else list(keys)
        return _info_from_record(self.store.update_device_tags(device_id, remove=remove))

    def record_failure(self, device_id: str, reason: str, *, at: float | None = None) -> None:
        """Count a job the device reported as failed (``reason`` as it reported it)."""
        self.store.record_device_failure(device_id, reason, at=self._clock() if at is None else at)

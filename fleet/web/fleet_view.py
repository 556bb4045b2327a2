"""The fleet as the dashboard shows it: one row per device, filtered and sorted, and one device's
page (its state, the rounds it joined and what came of each, its rejected messages).

Plain data in, JSON-able dicts out; the reads go through ``FleetReader``. Times are Unix seconds,
sizes bytes, densities the kept fraction in [0, 1].

A device's "model version" is the version of the global model it was last sent (the input of
the last round that selected it) and its "density" that model's density: the density stored
with the round that produced that version, or the run's configured density for the initial
model. Both are None for a device never selected.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.ops.registry import DeviceInfo
from fleet.state.store import RoundRecord, RoundStatus, RunRecord
from fleet.web.query import DeviceQuery
from fleet.web.reader import FleetReader

HISTORY_LIMIT = 200  # newest rounds shown on a device's page
REJECTIONS_LIMIT = 100  # newest rejected messages shown on a device's page


@dataclass(frozen=True)
class LastRound:
    """The newest round that selected a device."""

    run_id: str
    round: int
    model_name: str
    model_version: int
    density: float | None
    opened_at: float


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def model_densities(run: RunRecord, rounds: Iterable[RoundRecord]) -> dict[int, float]:
    """Density of each model version of a run: from the closed round that produced it, and the
    configured ``strategy_options.density`` (if any) for versions no round produced."""
    out: dict[int, float] = {}
    options = run.config.get("strategy_options")
    configured = _number(options.get("density")) if isinstance(options, Mapping) else None
    for r in rounds:
        if configured is not None:
            out.setdefault(r.model_version_in, configured)
        density = _number(r.metrics.get("density"))
        if (
            r.status is RoundStatus.CLOSED
            and r.model_version_out is not None
            and density is not None
        ):
            out[r.model_version_out] = density
    return out


def last_rounds(
    runs: Mapping[str, tuple[RunRecord, tuple[RoundRecord, ...]]],
) -> dict[str, LastRound]:
    """For each device ever selected, the newest round (by opening time) that selected it."""
    out: dict[str, LastRound] = {}
    for run, rounds in runs.values():
        densities = model_densities(run, rounds)
        for r in rounds:
            for device_id in r.selected:
                seen = out.get(device_id)
                if seen is None or r.opened_at >= seen.opened_at:
                    out[device_id] = LastRound(
                        run.run_id,
                        r.round,
                        run.model_name,
                        r.model_version_in,
                        densities.get(r.model_version_in),
                        r.opened_at,
                    )
    return out


def device_row(info: DeviceInfo, last: LastRound | None) -> dict[str, Any]:
    """One row of the fleet table."""
    return {
        "device_id": info.device_id,
        "online": info.online,
        "last_seen": info.last_seen,
        "tags": dict(info.tags),
        "cordoned": info.cordoned,
        "drained": info.drained,
        "schedulable": info.schedulable,
        "agent_version": info.agent_version,
        "model": None if last is None else last.model_name,
        "model_version": None if last is None else last.model_version,
        "density": None if last is None else last.density,
        "last_run": None if last is None else last.run_id,
        "last_error": info.last_failure,
        "rounds_joined": info.counters.rounds_joined,
        "updates_accepted": info.counters.updates_accepted,
        "failures": info.counters.failures,
        "rejections": info.counters.total_rejections,
        "bytes_up": info.counters.bytes_up,
        "bytes_down": info.counters.bytes_down,
        "dataset_size": info.dataset_size,
        "machine": info.hardware.machine,
    }


def _state_matches(row: Mapping[str, Any], state: str) -> bool:
    if state == "all":
        return True
    if state == "offline":
        return not row["online"]
    if state in ("online", "cordoned", "drained", "schedulable"):
        return bool(row[state])
    raise ValueError(f"unknown device state filter {state!r}")


def _text_matches(row: Mapping[str, Any], text: str) -> bool:
    if not text:
        return True
    needle = text.lower()
    tags = [f"{k}={v}" if v else k for k, v in row["tags"].items()]
    haystack = [row["device_id"], row["agent_version"], row["machine"], *tags]
    return any(needle in str(h).lower() for h in haystack)


def _tags_match(row: Mapping[str, Any], query: DeviceQuery) -> bool:
    tags = row["tags"]
    return all(k in tags and (v is None or tags[k] == v) for k, v in query.tags)


def select_rows(rows: Iterable[dict[str, Any]], query: DeviceQuery) -> list[dict[str, Any]]:
    """Rows matching ``query``, sorted by ``query.sort`` (ties by device id; missing values
    last in either order), at most ``query.limit`` of them."""
    kept = [
        r
        for r in rows
        if _state_matches(r, query.state) and _text_matches(r, query.text) and _tags_match(r, query)
    ]
    kept.sort(key=lambda r: r["device_id"])
    present = [r for r in kept if r[query.sort] is not None]
    missing = [r for r in kept if r[query.sort] is None]
    present.sort(key=lambda r: r[query.sort], reverse=query.descending)  # stable: ids stay sorted
    ordered = present + missing
    return ordered if query.limit is None else ordered[: query.limit]


def fleet_data(reader: FleetReader, query: DeviceQuery) -> dict[str, Any]:
    """The fleet page's data: counts over every device and the rows ``query`` selects."""
    infos = reader.devices()
    last = last_rounds(reader.all_rounds())
    rows = [device_row(info, last.get(info.device_id)) for info in infos]
    return fleet_payload(rows, query, has_store=reader.store() is not None)


def fleet_payload(
    rows: Sequence[dict[str, Any]], query: DeviceQuery, *, has_store: bool
) -> dict[str, Any]:
    """``fleet_data`` from every device's row (``device_row``)."""
    return {
        "has_store": has_store,
        "counts": {
            "total": len(rows),
            "online": sum(1 for r in rows if r["online"]),
            "offline": sum(1 for r in rows if not r["online"]),
            "cordoned": sum(1 for r in rows if r["cordoned"]),
            "drained": sum(1 for r in rows if r["drained"]),
        },
        "devices": select_rows(rows, query),
    }


def encode_json(data: Any) -> bytes:
    """``data`` as the dashboard's JSON responses encode it (Starlette's ``JSONResponse``)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
    return text.encode("utf-8")


class FleetTable:
    """The fleet page's data for one dashboard, rebuilt only where the store changed.

    ``body(query)`` is ``fleet_data(reader, query)`` as JSON bytes. A device's row is kept while
    the reader gives the same ``DeviceInfo`` object for it (its stored row did not change) and
    its newest round is the same; each run's "newest round per device" is kept while the reader
    gives the same rounds tuple (a run that is not running); the encoded answer to each of the
    ``max_queries`` most recent queries is kept while every row is the same object. So a fleet
    of 1,000 devices with nothing changed costs the device query and a comparison, and a few
    changed devices cost their rows and one encoding. Safe from any thread.
    """

    def __init__(self, reader: FleetReader, *, max_queries: int = 8) -> None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.reader = reader
        self.max_queries = max_queries
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[DeviceInfo, LastRound | None, dict[str, Any]]] = {}
        self._last: dict[str, tuple[tuple[RoundRecord, ...], dict[str, LastRound]]] = {}
        self._bodies: OrderedDict[DeviceQuery, tuple[list[dict[str, Any]], bool, bytes]] = (
            OrderedDict()
        )

    def last_rounds(self) -> dict[str, LastRound]:
        """``last_rounds(reader.all_rounds())``, each run's part kept while its rounds are."""
        previous = self._last
        kept: dict[str, tuple[tuple[RoundRecord, ...], dict[str, LastRound]]] = {}
        out: dict[str, LastRound] = {}
        for run_id, (run, rounds) in self.reader.all_rounds().items():
            seen = previous.get(run_id)
            part = seen[1] if seen is not None and seen[0] is rounds else None
            if part is None:
                part = last_rounds({run_id: (run, rounds)})
            kept[run_id] = (rounds, part)
            for device_id, last in part.items():
                mine = out.get(device_id)
                if mine is None or last.opened_at >= mine.opened_at:
                    out[device_id] = last
        self._last = kept
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Every device's row, in id order (the kept dict where nothing changed; never mutate)."""
        infos = self.reader.devices()
        last = self.last_rounds()
        previous = self._rows
        kept: dict[str, tuple[DeviceInfo, LastRound | None, dict[str, Any]]] = {}
        out: list[dict[str, Any]] = []
        for info in infos:
            mine = last.get(info.device_id)
            seen = previous.get(info.device_id)
            if seen is not None and seen[0] is info and (seen[1] is mine or seen[1] == mine):
                row = seen[2]
            else:
                row = device_row(info, mine)
            kept[info.device_id] = (info, mine, row)
            out.append(row)
        self._rows = kept
        return out

    def body(self, query: DeviceQuery) -> bytes:
        """The JSON of ``fleet_data(reader, query)``."""
        rows = self.rows()
        has_store = self.reader.store() is not None
        with self._lock:
            cached = self._bodies.get(query)
            if cached is not None and _same(cached[0], rows) and cached[1] == has_store:
                self._bodies.move_to_end(query)
                return cached[2]
        body = encode_json(fleet_payload(rows, query, has_store=has_store))
        with self._lock:
            self._bodies[query] = (rows, has_store, body)
            self._bodies.move_to_end(query)
            while len(self._bodies) > self.max_queries:
                self._bodies.popitem(last=False)
        return body


def _same(kept: Sequence[object], now: Sequence[object]) -> bool:
    return len(kept) == len(now) and all(a is b for a, b in zip(kept, now, strict=True))


def _outcome(
    round_: RoundRecord, device_id: str, reader: FleetReader, rejected: Mapping[Any, str]
) -> dict[str, Any]:
    update = reader.update(round_.run_id, round_.round, device_id)
    reason = rejected.get((round_.run_id, round_.round))
    if update is None:
        if reason is not None:
            outcome = "rejected"
        else:
            outcome = "waiting" if round_.status is RoundStatus.OPEN else "missed"
    elif round_.closed_at is not None and update.received_at > round_.closed_at:
        outcome = "late"
    else:
        outcome = "answered"
    return {
        "run_id": round_.run_id,
        "round": round_.round,
        "opened_at": round_.opened_at,
        "closed_at": round_.closed_at,
        "model_version": round_.model_version_in,
        "outcome": outcome,
        "update_status": None if update is None else str(update.status),
        "bytes_up": None if update is None else update.payload_bytes,
        "num_examples": None if update is None else update.num_examples,
        "train_s": None if update is None else _number(update.meta.get("train_s")),
        "rejection": reason,
    }


def device_detail(reader: FleetReader, device_id: str) -> dict[str, Any] | None:
    """One device's page data; None if the store has never seen it."""
    info = reader.device(device_id)
    if info is None:
        return None
    runs = reader.all_rounds()
    joined = sorted(
        (r for _, rounds in runs.values() for r in rounds if device_id in r.selected),
        key=lambda r: r.opened_at,
        reverse=True,
    )[:HISTORY_LIMIT]
    rejections = reader.rejections(device_id=device_id, limit=REJECTIONS_LIMIT)
    rejected: dict[Any, str] = {}
    for rej in reversed(rejections):  # oldest first, so the newest reason of a round wins
        rejected[(rej.run_id, rej.round)] = rej.reason
    row = device_row(info, last_rounds(runs).get(device_id))
    return {
        "device": {
            **row,
            "session_epoch": info.session_epoch,
            "hardware": {
                "machine": info.hardware.machine,
                "cpu_count": info.hardware.cpu_count,
                "memory_bytes": info.hardware.memory_bytes,
                "python_version": info.hardware.python_version,
                "torch_version": info.hardware.torch_version,
            },
            "rejections_by_reason": dict(info.counters.rejections),
            "has_profile": info.profile is not None,
        },
        "history": [_outcome(r, device_id, reader, rejected) for r in joined],
        "rejections": [
            {
                "run_id": r.run_id,
                "round": r.round,
                "reason": r.reason,
                "detail": r.detail,
                "at": r.at,
            }
            for r in rejections
        ],
    }

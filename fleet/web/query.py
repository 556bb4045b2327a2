"""Query parameters of the dashboard's pages and JSON endpoints, parsed strictly.

A parameter the dashboard does not know, a value it cannot parse or a choice outside the listed
ones raises ``QueryError``, which the app turns into a 400 response naming the parameter: a typo
in a bookmarked URL must say so, not silently show the unfiltered fleet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet.ops.registry import TagSelector, parse_tag_selector
from fleet.state.store import RunStatus

DEVICE_SORT_KEYS = (
    "device_id",
    "online",
    "last_seen",
    "agent_version",
    "model_version",
    "density",
    "rounds_joined",
    "updates_accepted",
    "failures",
    "rejections",
    "bytes_up",
    "bytes_down",
)
"""Columns the fleet table sorts by (``DeviceQuery.sort``)."""

DEVICE_STATES = ("all", "online", "offline", "cordoned", "drained", "schedulable")
"""Values of the fleet filter ``state``: ``schedulable`` is online, not cordoned, not drained."""

MAX_QUERY_TEXT = 200  # characters of a free-text or tag filter; longer is refused


class QueryError(ValueError):
    """A malformed query parameter; the message names it and says what is accepted."""


@dataclass(frozen=True)
class DeviceQuery:
    """Filter and order of the fleet table.

    ``text``: case-insensitive substring of the id, a tag (``key`` or ``key=value``) or the agent
    version; empty matches all. ``tags``: a tag selector (every condition must hold).
    ``limit``: at most that many rows after sorting (None: all).
    """

    text: str = ""
    state: str = "all"
    tags: TagSelector = ()
    sort: str = "device_id"
    descending: bool = False
    limit: int | None = None


def _single(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(f"query parameter {name!r} is given {len(values)} times; give it once")
    return values[0]


def _unknown(params: Mapping[str, list[str]], known: tuple[str, ...]) -> None:
    extra = sorted(set(params) - set(known))
    if extra:
        raise QueryError(
            f"unknown query parameter {extra[0]!r}; known: {', '.join(known) or 'none'}"
        )


def _choice(value: str | None, name: str, choices: tuple[str, ...], default: str) -> str:
    if value is None or value == "":
        return default
    if value not in choices:
        raise QueryError(f"{name}={value!r} is not one of: {', '.join(choices)}")
    return value


def _text(value: str | None, name: str) -> str:
    text = (value or "").strip()
    if len(text) > MAX_QUERY_TEXT:
        raise QueryError(f"{name} is longer than {MAX_QUERY_TEXT} characters")
    return text


def parse_int(value: str | None, name: str, *, minimum: int, maximum: int) -> int | None:
    """An integer query parameter in [minimum, maximum], or None when absent/empty."""
    if value is None or value == "":
        return None
    try:
        number = int(value, 10)
    except ValueError:
        raise QueryError(f"{name}={value!r} is not an integer") from None
    if not minimum <= number <= maximum:
        raise QueryError(f"{name}={number} is outside {minimum}..{maximum}")
    return number


def parse_device_query(params: Mapping[str, list[str]]) -> DeviceQuery:
    """``?q=&state=&tag=&sort=&order=asc|desc&limit=`` of the fleet page and ``/api/devices``."""
    _unknown(params, ("q", "state", "tag", "sort", "order", "limit"))
    tag_text = _text(_single(params, "tag"), "tag")
    try:
        tags = parse_tag_selector([t.strip() for t in tag_text.split(",") if t.strip()])
    except ValueError as exc:
        raise QueryError(f"tag={tag_text!r}: {exc}") from None
    return DeviceQuery(
        text=_text(_single(params, "q"), "q"),
        state=_choice(_single(params, "state"), "state", DEVICE_STATES, "all"),
        tags=tags,
        sort=_choice(_single(params, "sort"), "sort", DEVICE_SORT_KEYS, "device_id"),
        descending=_choice(_single(params, "order"), "order", ("asc", "desc"), "asc") == "desc",
        limit=parse_int(_single(params, "limit"), "limit", minimum=1, maximum=100_000),
    )


def parse_run_status(params: Mapping[str, list[str]]) -> str | None:
    """``?status=`` of the runs list: one of the run statuses, or None for every run."""
    _unknown(params, ("status",))
    value = _single(params, "status")
    if value is None or value == "":
        return None
    return _choice(value, "status", tuple(s.value for s in RunStatus), "")


def parse_no_params(params: Mapping[str, list[str]]) -> None:
    """Pages and endpoints that take no query parameters refuse any."""
    _unknown(params, ())


@dataclass(frozen=True)
class EventsQuery:
    """What one event stream follows: ``runs`` (any run's change: the runs list), ``fleet``
    (the devices' changes, which cost a read of every device row per poll, so only pages showing
    devices ask for them), ``run`` (one run's markers)."""

    runs: bool = False
    fleet: bool = False
    run: str | None = None


def parse_events(params: Mapping[str, list[str]]) -> EventsQuery:
    """``/api/events?runs=1&fleet=1&run=ID``; every stream gets ``hello``."""
    _unknown(params, ("runs", "fleet", "run"))
    return EventsQuery(
        runs=_choice(_single(params, "runs"), "runs", ("0", "1"), "0") == "1",
        fleet=_choice(_single(params, "fleet"), "fleet", ("0", "1"), "0") == "1",
        run=_text(_single(params, "run"), "run") or None,
    )

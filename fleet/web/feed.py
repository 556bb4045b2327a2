"""Live updates: one poller of the store's change markers, fanned out as server-sent events.

While at least one browser is subscribed, a single task reads every ``interval_s`` seconds
(0.3 by default) the markers that move when something worth redrawing happens:

- per run: ``(status, current_round, updated_at)`` (``open_round`` and ``close_round`` move
  ``updated_at``), plus the open round's number, its selected devices and how many updates it
  has stored, so a round closing reaches the page within ``interval_s``;
- for the fleet, on every ``fleet_every``-th poll and only while a subscriber shows devices:
  each device's online/cordoned/drained state, agent version, last failure and tags (not
  ``last_seen`` or the counters, which move with every message or round and would redraw a
  1,000-row table constantly; the page ages "last seen" itself and refetches the counters every
  half minute).

Events (``event: NAME`` / ``data: JSON``): ``hello`` on connecting (the page refetches, so a
change between its first fetch and the subscription is not lost), ``runs`` when any run's
marker changed (the list of changed runs; to subscribers of ``runs``), ``run`` for a run a
subscriber watches (its marker, so the page moves its counters before it refetches), ``fleet``
with the device counts. A comment line every ``keepalive_s`` keeps proxies from closing an idle
stream. A slow subscriber's queue keeps only the newest events: each one means "refetch", so
dropping older ones loses nothing. Reads run in worker threads (short autocommit reads; see
``fleet.web.reader``), never on the event loop: in the dashboard's own read pool when it passes
one (``executor``), else in the event loop's default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fleet.state.store import RunStatus
from fleet.web.reader import FleetReader

QUEUE_SIZE = 8


@dataclass(frozen=True)
class RunMarker:
    status: str
    current_round: int
    updated_at: float
    open_round: int | None
    selected: int
    answered: int

    def as_json(self, run_id: str) -> dict[str, Any]:
        """The ``run`` event's data. ``rounds_closed`` assumes rounds 1..current_round, as the
        runner numbers them; the page's next fetch corrects it if a store numbers otherwise."""
        return {
            "run_id": run_id,
            "status": self.status,
            "current_round": self.current_round,
            "rounds_closed": self.current_round - (self.open_round is not None),
            "updated_at": self.updated_at,
            "open_round": self.open_round,
            "selected": self.selected,
            "answered": self.answered,
        }


@dataclass(frozen=True)
class Markers:
    runs: dict[str, RunMarker]
    fleet: tuple[Any, ...] | None = None  # None: not read this time
    fleet_counts: dict[str, int] = field(default_factory=dict)


def read_markers(reader: FleetReader, *, fleet: bool) -> Markers:
    """The store's change markers now (a few indexed reads; the device rows only if ``fleet``)."""
    runs: dict[str, RunMarker] = {}
    for run in reader.runs():
        open_no: int | None = None
        selected = answered = 0
        if run.status is RunStatus.RUNNING:
            open_round = reader.open_round(run.run_id)
            if open_round is not None:
                open_no = open_round.round
                selected = len(open_round.selected)
                answered = len(reader.updates(run.run_id, open_round.round))
        runs[run.run_id] = RunMarker(
            str(run.status), run.current_round, run.updated_at, open_no, selected, answered
        )
    if not fleet:
        return Markers(runs)
    records = reader.device_records()
    marker = tuple(
        (
            d.device_id,
            d.online,
            d.cordoned,
            d.drained,
            d.agent_version,
            d.last_failure,
            tuple(sorted(d.tags.items())),
        )
        for d in records
    )
    counts = {"total": len(records), "online": sum(1 for d in records if d.online)}
    return Markers(runs, marker, counts)


def sse(event: str, data: Any) -> str:
    """One server-sent event (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Subscriber:
    """One open event stream: what it watches and its queue of pending events."""

    def __init__(self, *, runs: bool, fleet: bool, run: str | None) -> None:
        self.runs = runs
        self.fleet = fleet
        self.run = run
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=QUEUE_SIZE)

    def push(self, message: str | None) -> None:
        """Queue ``message`` (None ends the stream), dropping the oldest when full."""
        while True:
            try:
                self.queue.put_nowait(message)
                return
            except asyncio.QueueFull:
                self.queue.get_nowait()


class ChangeFeed:
    """Polls ``reader`` while anyone listens and pushes events to the subscribers.

    Use from the event loop only. ``interval_s``: seconds between polls (> 0);
    ``fleet_every``: read the device rows on every n-th poll; ``keepalive_s``: idle seconds
    before a comment line is sent; ``executor``: the threads that read the store (None: the
    event loop's default executor).
    """

    def __init__(
        self,
        reader: FleetReader,
        *,
        interval_s: float = 0.3,
        fleet_every: int = 3,
        keepalive_s: float = 15.0,
        executor: Executor | None = None,
    ) -> None:
        if interval_s <= 0 or fleet_every < 1 or keepalive_s <= 0:
            raise ValueError(
                f"need interval_s > 0, fleet_every >= 1, keepalive_s > 0; got {interval_s}, "
                f"{fleet_every}, {keepalive_s}"
            )
        self.reader = reader
        self.interval_s = interval_s
        self.fleet_every = fleet_every
        self.keepalive_s = keepalive_s
        self.executor = executor
        self.polls = 0  # completed polls, for tests and the benchmark
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._last: Markers | None = None
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def stream(
        self, *, runs: bool = False, fleet: bool = False, run: str | None = None
    ) -> AsyncIterator[str]:
        """The text of one event stream (``runs``: any run's change; ``fleet``: the devices';
        ``run``: that run's markers); ends when the feed closes or the client leaves."""
        subscriber = Subscriber(runs=runs, fleet=fleet, run=run)
        self._subscribers.add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="dashboard-change-feed")
        try:
            yield "retry: 2000\n\n"
            yield sse("hello", {"interval_s": self.interval_s})
            while not self._closed:
                try:
                    message = await asyncio.wait_for(subscriber.queue.get(), self.keepalive_s)
                except TimeoutError:
                    message = ": keepalive\n\n"
                if message is None:
                    return
                yield message
        finally:
            self._subscribers.discard(subscriber)

    async def close(self) -> None:
        """End every stream and the poller."""
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.push(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        tick = 0
        while self._subscribers and not self._closed:
            want_fleet = tick % self.fleet_every == 0 and any(s.fleet for s in self._subscribers)
            read = partial(read_markers, self.reader, fleet=want_fleet)
            markers = await asyncio.get_running_loop().run_in_executor(self.executor, read)
            self._publish(markers)
            self.polls += 1
            tick += 1
            await asyncio.sleep(self.interval_s)
        self._last = None  # the next subscriber starts from a fresh read

    def _publish(self, now: Markers) -> None:
        last = self._last
        fleet = now.fleet if now.fleet is not None else (last.fleet if last else None)
        counts = now.fleet_counts or (last.fleet_counts if last else {})
        self._last = Markers(now.runs, fleet, counts)
        if last is None:
            return  # the first read is the baseline; subscribers fetched on "hello"
        changed = [run_id for run_id, marker in now.runs.items() if last.runs.get(run_id) != marker]
        removed = [run_id for run_id in last.runs if run_id not in now.runs]
        if changed or removed:
            message = sse("runs", {"changed": changed + removed})
            for subscriber in self._subscribers:
                if subscriber.runs:
                    subscriber.push(message)
        for run_id in changed:
            message = sse("run", now.runs[run_id].as_json(run_id))
            for subscriber in self._subscribers:
                if subscriber.run == run_id:
                    subscriber.push(message)
        if now.fleet is not None and last.fleet is not None and now.fleet != last.fleet:
            message = sse("fleet", now.fleet_counts)
            for subscriber in self._subscribers:
                if subscriber.fleet:
                    subscriber.push(message)

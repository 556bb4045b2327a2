"""Live updates: a round closing reaches the page within a second, and only where it matters.

The feed polls the store's change markers; these tests write through the store (another
connection, as the runner would) and read the event stream the browser would get.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fleet.state.store import Store
from fleet.web.feed import ChangeFeed, read_markers
from fleet.web.reader import FleetReader


def close_open_round(root: Path, run_id: str) -> None:
    """Close the run's open round as a runner with no aggregation would (drop its updates)."""
    with Store(root, create=False) as store:
        open_round = store.find_open_round(run_id)
        assert open_round is not None
        keys = [
            (open_round.round, u.device_id)
            for u in store.updates_for_round(run_id, open_round.round)
        ]
        store.close_round(run_id, open_round.round, dropped=keys, metrics={"accuracy": 0.9})


async def _until(stream: AsyncIterator[str], event: str, timeout_s: float) -> tuple[str, float]:
    """The first message of ``event`` and the seconds it took; TimeoutError otherwise."""
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        message = await asyncio.wait_for(anext(stream), max(left, 0.001))
        if message.startswith(f"event: {event}\n"):
            return message, time.monotonic() - start


def test_markers_move_when_a_round_closes(filled: Path) -> None:
    reader = FleetReader(filled)
    before = read_markers(reader, fleet=False).runs["live"]
    close_open_round(filled, "live")
    after = read_markers(reader, fleet=False).runs["live"]
    assert (before.open_round, before.answered) == (3, 4)
    assert after.open_round is None and after.updated_at > before.updated_at
    reader.close()


def test_a_closed_round_reaches_the_runs_watcher_within_a_second(filled: Path) -> None:
    async def main() -> tuple[str, float, list[str]]:
        feed = ChangeFeed(FleetReader(filled), interval_s=0.25)
        watcher = feed.stream(run="live")
        other = feed.stream(runs=True, run="done")
        assert (await anext(watcher)).startswith("retry:")
        assert (await anext(watcher)).startswith("event: hello")
        await anext(other)
        await anext(other)
        while feed.polls < 1:  # the baseline read
            await asyncio.sleep(0.02)
        await asyncio.to_thread(close_open_round, filled, "live")
        message, seconds = await _until(watcher, "run", 1.0)
        seen_by_other = [await asyncio.wait_for(anext(other), 1.0)]
        await feed.close()
        return message, seconds, seen_by_other

    message, seconds, other = asyncio.run(main())
    assert '"run_id":"live"' in message and '"open_round":null' in message
    assert seconds < 1.0
    assert other[0].startswith("event: runs") and '"live"' in other[0]  # the list, not the run


def test_a_device_going_offline_reaches_fleet_watchers_only(filled: Path) -> None:
    async def main() -> tuple[str, list[str]]:
        feed = ChangeFeed(FleetReader(filled), interval_s=0.1, fleet_every=1)
        fleet = feed.stream(fleet=True)
        runs_only = feed.stream(runs=True)
        for stream in (fleet, runs_only):
            await anext(stream)
            await anext(stream)
        while feed.polls < 1:
            await asyncio.sleep(0.02)
        with Store(filled, create=False) as store:
            store.set_device_flags("dev-0000", cordoned=True)
        message, _ = await _until(fleet, "fleet", 2.0)
        pending = []
        with contextlib.suppress(TimeoutError):
            pending.append(await asyncio.wait_for(anext(runs_only), 0.5))
        await feed.close()
        return message, pending

    message, pending = asyncio.run(main())
    assert '"total":12' in message
    assert pending == []


def test_the_poller_stops_when_the_last_page_leaves(filled: Path) -> None:
    async def main() -> int:
        feed = ChangeFeed(FleetReader(filled), interval_s=0.05)
        stream = feed.stream(runs=True)
        await anext(stream)
        await anext(stream)
        while feed.polls < 2:
            await asyncio.sleep(0.02)
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        polls = feed.polls
        await asyncio.sleep(0.3)
        assert feed.subscribers == 0
        return feed.polls - polls

    assert asyncio.run(main()) == 0

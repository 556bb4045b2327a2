"""The dashboard's reader re-reads only what can have changed.

A live run page is refetched every second while rounds close; if each fetch re-counted every
round's updates and re-loaded every checkpoint, the dashboard would cost a long run more and
more. These tests pin down what is read again and that the figures stay right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.state.store import Checkpoint, Store, UpdateRecord
from fleet.web.reader import RECENT_ROUNDS, FleetReader
from tests.web.storefill import Clock, add_devices, add_run


class CountingStore(Store):
    """Counts the reads the reader makes: ``updates_for_round`` per round, checkpoint loads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.update_reads: list[int] = []
        self.checkpoint_loads = 0

    def updates_for_round(self, run_id: str, round: int, **kwargs: Any) -> list[UpdateRecord]:
        self.update_reads.append(round)
        return super().updates_for_round(run_id, round, **kwargs)

    def load_checkpoint(self, run_id: str, version: int | None = None) -> Checkpoint:
        self.checkpoint_loads += 1
        return super().load_checkpoint(run_id, version)


def _live(tmp_path: Path) -> tuple[Path, Clock]:
    root = tmp_path / "state"
    clock = Clock()
    with Store(root, clock=clock) as store:
        devices = add_devices(store, 6)
        add_run(store, clock, "live", devices, rounds=12, per_round=3, leave_open=True)
    return root, clock


def test_a_running_runs_settled_rounds_are_counted_once(tmp_path: Path) -> None:
    root, _ = _live(tmp_path)
    store = CountingStore(root, create=False)
    reader = FleetReader(root, open_store=lambda _: store)
    run = reader.run("live")
    assert run is not None and run.current_round == 13
    first = reader.answers(run)
    assert sorted(store.update_reads) == list(range(1, 14))
    store.update_reads.clear()
    assert reader.answers(run) == first
    # the open round 13 and the RECENT_ROUNDS closed rounds before it are counted afresh
    assert sorted(store.update_reads) == list(range(13 - RECENT_ROUNDS, 14))
    store.close()


def test_a_late_update_to_a_recent_round_is_counted(tmp_path: Path) -> None:
    root, clock = _live(tmp_path)
    reader = FleetReader(root)
    run = reader.run("live")
    assert run is not None
    before = reader.answers(run)[12]
    with Store(root, clock=clock) as store:  # round 12 closed; an update for it arrives now
        clock.advance(1.0)
        store.record_update("live", 12, "dev-late", b"late".ljust(100, b"."), 1, status="late")
    after = reader.answers(run)[12]
    assert after == (before[0], before[1] + 1)
    reader.close()


def test_each_checkpoint_file_is_read_once_per_server(tmp_path: Path) -> None:
    root, _ = _live(tmp_path)
    store = CountingStore(root, create=False)
    reader = FleetReader(root, open_store=lambda _: store)
    layers = reader.layer_density("live")
    assert store.checkpoint_loads == 13  # the initial model and rounds 1..12
    assert reader.layer_density("live") == layers
    assert store.checkpoint_loads == 13
    store.close()

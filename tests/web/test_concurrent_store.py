"""The dashboard reads a store that a run is writing: it must neither block the run nor show a
round half written.

SQLite in WAL mode gives readers a snapshot of committed data while a writer works; these tests
prove the dashboard stays on that path (short autocommit reads, no write locks), which a
rollback-journal store or a long read transaction would break.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from fleet.state.store import Store
from tests.web.conftest import ClientFactory


def test_a_round_being_closed_is_shown_open_until_the_close_commits(
    client: ClientFactory, filled: Path
) -> None:
    c = client()
    assert c.get("/api/runs/live").json()["open_round"]["round"] == 3
    writer = sqlite3.connect(filled / "fleet.db", isolation_level=None)
    try:
        digest = writer.execute(
            "SELECT digest FROM checkpoints WHERE run_id = 'live' AND version = 2"
        ).fetchone()[0]
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "UPDATE rounds SET status = 'closed', closed_at = opened_at + 1,"
            " model_version_out = 2, checkpoint_digest = ? WHERE run_id = 'live' AND round = 3",
            (digest,),
        )
        start = time.monotonic()
        during = c.get("/api/runs/live").json()
        metrics = c.get("/metrics").text
        waited = time.monotonic() - start
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert waited < 1.0, "the dashboard waited for the writer's transaction"
    assert during["open_round"]["round"] == 3 and during["rounds"][-1]["status"] == "open"
    assert 'sparsefleet_rounds_completed_total{run="live"} 2.0' in metrics
    after = c.get("/api/runs/live").json()
    assert after["open_round"] is None and after["rounds"][-1]["status"] == "closed"


def test_a_busy_dashboard_never_makes_the_runs_writes_wait(
    client: ClientFactory, filled: Path
) -> None:
    """A writer that gives up after 0.25 s would fail if any dashboard read held a lock."""
    c = client()
    stop = threading.Event()
    reads = 0
    failed: list[str] = []

    def hammer() -> None:
        nonlocal reads
        while not stop.is_set() and not failed:
            for path in ("/api/runs/live", "/metrics", "/api/devices", "/api/devices/dev-0001"):
                response = c.get(path)
                if response.status_code != 200:
                    failed.append(f"{path}: {response.status_code} {response.text[:200]}")
                reads += 1

    reader = threading.Thread(target=hammer)
    reader.start()
    try:
        with Store(filled, busy_timeout_s=0.25) as store:
            store.set_run_status("done", "finished")  # no-op transition, still a write
            i = 0
            while i < 30 or (reads < 20 and i < 3000 and not failed):  # reads overlap writes
                i += 1
                store.update_device_status(
                    f"w-{i}", online=True, session_epoch=1, agent_version="x", status={}
                )
                store.set_device_flags(f"w-{i}", cordoned=True)
                store.record_rejection("live", 3, f"w-{i}", "too_large")
    finally:
        stop.set()
        reader.join(30)
    assert failed == []
    assert reads >= 20
    counts = c.get("/api/devices?state=cordoned").json()["counts"]
    assert counts["cordoned"] == i

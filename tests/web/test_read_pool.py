"""Store reads run on the dashboard's own threads, so its SQLite connections stay few.

The store opens one connection per thread. Run on anyio's worker threads (Starlette's default
for plain ``def`` endpoints), which retire after 10 s idle, every retired thread left its
connection open: a dashboard scraped every 15 s gained a connection (two file descriptors) per
scrape until it ran out. The dashboard now reads on a fixed pool that lives as long as it does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fleet.state.store import Store
from fleet.web import DashboardSettings, create_app
from fleet.web.reader import FleetReader

PATHS = [
    "/runs",
    "/runs/done",
    "/fleet",
    "/devices/dev-0001",
    "/api/runs",
    "/api/runs/live",
    "/api/runs/done/layers",
    "/api/devices",
    "/api/devices/dev-0001",
    "/metrics",
]


class ThreadRecordingReader(FleetReader):
    """Notes the name of every thread that asks for the store."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.threads: set[str] = set()

    def store(self) -> Store | None:
        self.threads.add(threading.current_thread().name)
        return super().store()


def test_every_read_runs_on_the_pool_and_connections_stay_bounded(filled: Path) -> None:
    reader = ThreadRecordingReader(filled)
    app, dashboard = create_app(DashboardSettings(filled, read_threads=2), reader)
    with TestClient(app) as client:
        for _ in range(3):
            for path in PATHS:
                assert client.get(path).status_code == 200, path
        store = reader.store()
        assert store is not None
        connections = len(store._db._conns)  # what the pool bounds
    assert reader.threads - {threading.current_thread().name} <= {
        f"dashboard-read_{i}" for i in range(2)
    }
    assert reader.threads - {threading.current_thread().name}, "no read ran on the pool"
    assert connections <= 3  # the pool's two threads (and this test's thread, above)
    assert dashboard.pool._shutdown  # closed with the app


def test_read_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="read_threads"):
        DashboardSettings(tmp_path, read_threads=0)

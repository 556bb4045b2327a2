"""Fixtures for the dashboard tests: a state directory with known content, and a client.

``filled``: 12 devices (every 4th offline), a finished run ``done`` of 6 rounds (late updates in
rounds 2, 4, 6, a rejected one in rounds 3 and 6) and a running run ``live`` with 2 closed
rounds and round 3 open, all with times from a fixed clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fleet.state.store import Store
from fleet.web import DashboardSettings, create_app
from tests.web.storefill import Clock, add_devices, add_run

ClientFactory = Callable[..., TestClient]


def fill(root: Path) -> Clock:
    clock = Clock()
    with Store(root, clock=clock) as store:
        devices = add_devices(store, 12)
        add_run(store, clock, "done", devices, rounds=6, per_round=4, late_every=2, reject_every=3)
        add_run(store, clock, "live", devices, rounds=2, per_round=4, leave_open=True, planned=5)
    return clock


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    fill(root)
    return root


@pytest.fixture
def client(filled: Path) -> Iterator[ClientFactory]:
    """``client(token=None, root=filled)`` -> a TestClient of a dashboard (closed afterwards)."""
    clients: list[TestClient] = []

    def make(*, token: str | None = None, root: Path | None = None) -> TestClient:
        app, _ = create_app(DashboardSettings(root or filled, token=token))
        c = TestClient(app, raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)

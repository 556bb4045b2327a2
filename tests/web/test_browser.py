"""The dashboard in a real browser over a real run: headless Chromium (Debian's ``chromium``,
driven by Playwright) watches a simulated run over a real mosquitto.

What an operator sees must be live: the round counter advances without a reload, the accuracy
chart has points, the fleet table lists the devices. The screenshots land in the test's
temporary directory; with ``SPARSEFLEET_SCREENSHOT_DIR`` set, the run page's is also written there
as ``dashboard.png`` (``make docs-screenshot`` sets it to docs/, which is how docs/dashboard.png is
made).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from device.errors import BrokerUnavailableError, NotFoundError
from device.wire.broker import MosquittoBroker, find_mosquitto
from fleet.runtime.runner import RunSpec
from fleet.sim import Faults, SimSpec, simulate
from fleet.state.store import Store
from fleet.web import DashboardSettings, ServerThread

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
DEVICES = 6
ROUNDS = 12
PER_ROUND = 3  # answers that close a round; ceil(3 * 1.5) = 5 are selected, so some come late
PICTURE_ROUND = 8  # rounds closed before the screenshot, for a chart with a shape
SCREENSHOT_DIR_ENV = "SPARSEFLEET_SCREENSHOT_DIR"
IN_STEP = (  # the rounds table (refetched at most once a second) shows the counter's round
    "document.querySelector('#rounds-table tbody td')?.textContent"
    " === document.querySelector('#round-counter').textContent"
)


def _browser() -> Any:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: apt-get install chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
    return playwright


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs a mosquitto broker: {exc}")
    b = MosquittoBroker()
    b.start()
    yield b
    b.cleanup()


def _spec() -> RunSpec:
    return RunSpec(
        run_id="live",
        model_name="mlp",
        strategy="feddst",
        rounds=ROUNDS,
        clients_per_round=PER_ROUND,
        over_select=1.5,
        strategy_options={
            "clients_per_round": PER_ROUND,
            "density": 0.3,
            "readjust_every": 2,
            "total_rounds": ROUNDS,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        },
        round_timeout_s=30.0,
    )


def _wait_for_round(state: Path, round_: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with Store(state, create=False) as store:
                if store.get_run("live").current_round >= round_:
                    return
        except NotFoundError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the simulated run did not reach round {round_} in {timeout_s} s")


def _wait_js(page: Any, expression: str, timeout_s: float) -> None:
    """Poll ``expression`` in the page until it is truthy. (Playwright's wait_for_function
    evaluates strings with eval, which the dashboard's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression} still false after {timeout_s} s")
        time.sleep(0.1)


def _screenshot_dir() -> Path | None:
    """Where ``make docs-screenshot`` wants the run page's picture, or None (unset)."""
    value = os.environ.get(SCREENSHOT_DIR_ENV)
    if not value:
        return None
    target = Path(value)
    if not target.is_dir():
        raise FileNotFoundError(f"{SCREENSHOT_DIR_ENV}={value}: no such directory")
    return target


def test_live_run_in_headless_chromium(broker: MosquittoBroker, tmp_path: Path) -> None:
    sync_api = _browser()
    publish = _screenshot_dir()
    state = tmp_path / "state"
    torch.set_num_threads(1)
    errors: list[BaseException] = []
    sim = SimSpec(devices=DEVICES, dataset="digits", processes=1, faults=Faults(latency_s=0.8))

    def run() -> None:
        try:
            simulate(
                _spec(),
                sim,
                state,
                transport="mqtt",
                broker_url=f"mqtt://{broker.host}:{broker.port}",
            )
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    runner = threading.Thread(target=run, name="simulated-run")
    runner.start()
    try:
        _wait_for_round(state, 1, 120.0)
        settings = DashboardSettings(state, poll_interval_s=0.25)
        with ServerThread(settings) as server, sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on(
                "console",
                lambda m: page_errors.append(m.text) if m.type == "error" else None,
            )
            page.goto(f"{server.url}/runs/live")
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            page.evaluate("window.__sameDocument = true")
            first = int(page.inner_text("#round-counter"))
            _wait_js(
                page,
                f"Number(document.querySelector('#round-counter').textContent) > {first}",
                20,
            )
            assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
            assert page.evaluate("window.SFDashboard.events") > 0  # pushed, not polled
            _wait_js(
                page,
                "document.querySelectorAll('#chart-accuracy-round circle.point').length >= 2",
                20,
            )
            assert page.locator("#chart-accuracy-mb circle.point").count() >= 2
            _wait_js(  # more rounds for the picture (bounded: the run may end first)
                page,
                f"Number(document.querySelector('#rounds-closed').textContent) >= {PICTURE_ROUND}"
                f" || document.querySelector('#run-status').textContent !== 'running'",
                30,
            )
            with contextlib.suppress(TimeoutError):  # the charts caught up with the counter
                _wait_js(page, IN_STEP, 5)
            page.screenshot(path=str(tmp_path / "dashboard-run.png"), full_page=True)

            page.goto(f"{server.url}/fleet")
            page.wait_for_selector("body[data-ready='1']", timeout=10_000)
            listed = page.locator("#fleet-table tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.device)"
            )
            page.screenshot(path=str(tmp_path / "dashboard-fleet.png"), full_page=True)
            browser.close()
        assert listed == [f"sim-{i:04d}" for i in range(DEVICES)]
        assert page_errors == []
    finally:
        runner.join(180)
    assert errors == []
    assert (tmp_path / "dashboard-run.png").stat().st_size > 10_000
    if publish is not None:
        shutil.copyfile(tmp_path / "dashboard-run.png", publish / "dashboard.png")

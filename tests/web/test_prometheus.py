"""Prometheus itself reads the dashboard's /metrics: Debian's ``prometheus`` scrapes it with the
bearer token, and a query through its HTTP API returns the stored figure. ``promtool`` checks
the example scrape configuration and lints the exposition.

Skipped, with the install command, where the binaries are missing (CI installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device.wire.broker import free_port
from fleet.web import DashboardSettings, ServerThread
from fleet.web.metrics import exposition, make_registry
from fleet.web.reader import FleetReader

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prometheus.yml"
TOKEN = "prometheus-scrapes-with-this-token"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"needs Debian's {name}: apt-get install prometheus")
    return path


def test_the_example_scrape_config_is_valid() -> None:
    result = subprocess.run(
        [_binary("promtool"), "check", "config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_exposition_passes_promtools_lint(filled: Path) -> None:
    """Names, units and types as Prometheus expects them (counters end in _total, ...)."""
    text = exposition(make_registry(FleetReader(filled)))
    result = subprocess.run(
        [_binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture
def prometheus(tmp_path: Path, filled: Path) -> Iterator[int]:
    """A dashboard with a token, and Prometheus scraping it every second; yields the API port."""
    binary = _binary("prometheus")
    with ServerThread(DashboardSettings(filled, token=TOKEN)) as server:
        target = server.url.removeprefix("http://")
        config = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN, encoding="utf-8")
        job = config["scrape_configs"][0]
        job["scrape_interval"] = "1s"
        job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
        job["static_configs"][0]["targets"] = [target]
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        try:
            yield port
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_prometheus_scrapes_the_dashboard_and_answers_a_query(prometheus: int) -> None:
    deadline = time.monotonic() + 60
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            result = _query(prometheus, 'sparsefleet_rounds_completed_total{run="done"}')
        except OSError:  # Prometheus is still starting
            result = []
        if result:
            break
        time.sleep(0.5)
    assert result, "Prometheus never stored a scrape of the dashboard"
    assert result[0]["metric"]["job"] == "sparsefleet"
    assert float(result[0]["value"][1]) == 6.0
    (up,) = _query(prometheus, 'up{job="sparsefleet"}')
    assert up["value"][1] == "1"  # the scrape with the bearer token succeeded
    online = _query(prometheus, "sparsefleet_devices_online")
    assert float(online[0]["value"][1]) == 9.0
    rejected = _query(prometheus, "sum by (reason) (sparsefleet_updates_rejected_total)")
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in rejected} == {"non_finite": 2.0}

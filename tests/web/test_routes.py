"""The dashboard's pages and JSON endpoints against a store with known content.

What an operator relies on: the figures match what the runner stored (answered/late/rejected per
round, bytes, accuracy, per-layer density), unknown ids give a 404 page and not a traceback,
malformed query parameters a 400 that names them, and a dashboard started before the first run
picks the store up when it appears.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from fleet.state.store import Store
from fleet.web.app import STATIC_DIR
from fleet.web.reader import FleetReader
from tests.web.conftest import ClientFactory, fill
from tests.web.storefill import layer_densities


def test_root_redirects_to_the_runs_list(client: ClientFactory) -> None:
    response = client().get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/runs"


@pytest.mark.parametrize(
    "path",
    ["/runs", "/runs/done", "/fleet", "/fleet?state=online&sort=density", "/devices/dev-0001"],
)
def test_pages_render_with_their_scripts_from_the_package(client: ClientFactory, path: str) -> None:
    """No CDN: every script and style the page loads is served by the dashboard itself."""
    c = client()
    response = c.get(path)
    assert response.status_code == 200, response.text
    page = response.text
    assert "http://" not in page and "https://" not in page
    for asset in ("/static/dashboard.js", "/static/charts.js", "/static/dashboard.css"):
        assert asset in page
        assert c.get(asset.split("?")[0]).status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_runs_list_has_the_figures_of_fleet_run_list(client: ClientFactory) -> None:
    runs = {r["run_id"]: r for r in client().get("/api/runs").json()["runs"]}
    done = runs["done"]
    assert (done["status"], done["rounds_closed"], done["rounds"]) == ("finished", 6, 6)
    assert done["accuracy"] == pytest.approx(0.56)  # the last evaluated round's
    assert done["federated_accuracy"] == pytest.approx(0.46)
    # 1000 B per stored update: 4+3+3+3+4+2 in time plus the late ones of rounds 2, 4 and 6
    assert done["upload_bytes"] == (19 + 3) * 1000
    assert runs["live"]["status"] == "running" and runs["live"]["current_round"] == 3


def test_runs_list_filters_by_status_and_refuses_unknown_ones(client: ClientFactory) -> None:
    c = client()
    assert [r["run_id"] for r in c.get("/api/runs?status=running").json()["runs"]] == ["live"]
    response = c.get("/api/runs?status=sleeping")
    assert response.status_code == 400
    assert "status='sleeping'" in response.json()["error"]


def test_run_rounds_count_answered_late_and_rejected_with_reasons(client: ClientFactory) -> None:
    data = client().get("/api/runs/done").json()
    rows = {r["round"]: r for r in data["rounds"]}
    got = {n: (r["selected"], r["answered"], r["late"], r["rejected"]) for n, r in rows.items()}
    assert got == {
        1: (4, 4, 0, 0),
        2: (4, 3, 1, 0),
        3: (4, 3, 0, 1),
        4: (4, 3, 1, 0),
        5: (4, 4, 0, 0),
        6: (4, 2, 1, 1),
    }
    assert rows[3]["rejected_by_reason"] == {"non_finite": 1}
    assert data["rejected_by_reason"] == {"non_finite": 2}
    assert rows[1]["bytes_down"] == 4000 and rows[2]["bytes_up"] == 4000  # late bytes count too
    cumulative = [rows[n]["cumulative_upload_mb"] for n in sorted(rows)]
    assert cumulative == pytest.approx([0.004, 0.008, 0.011, 0.015, 0.019, 0.022])
    assert rows[4]["accuracy"] == pytest.approx(0.54)
    assert rows[4]["federated_accuracy"] == pytest.approx(0.44)
    assert rows[4]["duration_s"] == pytest.approx(2.0 * 4 / 5)  # 3 answers + the close, of 5 steps
    assert data["open_round"] is None


def test_updates_refused_for_arriving_late_count_as_late(
    client: ClientFactory, filled: Path
) -> None:
    """Under the "drop" late policy the runner refuses a late update (reason ``late``): the
    page counts it with the late ones, not with the refusals for bad content."""
    with Store(filled) as store:
        store.record_rejection("done", 5, "dev-0009", "late", "arrived after the round closed")
    row = next(r for r in client().get("/api/runs/done").json()["rounds"] if r["round"] == 5)
    assert (row["answered"], row["late"], row["rejected"]) == (4, 1, 0)
    assert row["rejected_by_reason"] == {}


def test_a_running_run_shows_its_open_round_progress(client: ClientFactory) -> None:
    data = client().get("/api/runs/live").json()
    assert data["open_round"]["round"] == 3
    assert (data["open_round"]["selected"], data["open_round"]["answered"]) == (4, 4)
    assert [r["status"] for r in data["rounds"]] == ["closed", "closed", "open"]
    assert data["rounds"][-1]["cumulative_upload_mb"] is None  # not on the accuracy-vs-MB axis


def test_run_layers_are_the_checkpoints_mask_densities(client: ClientFactory) -> None:
    layers = client().get("/api/runs/done/layers").json()["layers"]
    assert set(layers) == {"fc1.weight", "fc2.weight"}
    assert [r for r, _ in layers["fc1.weight"]] == [0, 1, 2, 3, 4, 5, 6]
    expected = layer_densities(0.25 * (1 - 3 / 24))["fc2.weight"]
    assert dict(map(tuple, layers["fc2.weight"]))[3] == pytest.approx(expected)


@pytest.mark.parametrize(
    "path",
    ["/runs/nope", "/devices/nobody", "/api/runs/nope", "/api/runs/nope/layers", "/api/devices/x"],
)
def test_unknown_ids_give_404_without_a_traceback(client: ClientFactory, path: str) -> None:
    response = client().get(path)
    assert response.status_code == 404
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert ("nope" in response.text) or ("nobody" in response.text) or ("'x'" in response.text)
    if path.startswith("/api/"):
        assert "error" in response.json()


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/fleet?sort=colour", "sort='colour'"),
        ("/api/devices?state=asleep", "state='asleep'"),
        ("/api/devices?order=sideways", "order='sideways'"),
        ("/api/devices?limit=many", "limit='many'"),
        ("/api/devices?limit=0", "limit=0"),
        ("/api/devices?tag==lab", "tag='=lab'"),
        ("/api/devices?q=a&q=b", "'q' is given 2 times"),
        ("/api/devices?colour=red", "'colour'"),
        ("/runs/done?x=1", "'x'"),
        ("/metrics?debug=1", "'debug'"),
        ("/api/events?fleet=yes", "fleet='yes'"),
    ],
)
def test_malformed_query_parameters_give_400_naming_them(
    client: ClientFactory, path: str, names: str
) -> None:
    response = client().get(path)
    assert response.status_code == 400
    assert names in html.unescape(response.text)


def test_fleet_counts_and_rows(client: ClientFactory) -> None:
    data = client().get("/api/devices").json()
    assert data["counts"] == {"total": 12, "online": 9, "offline": 3, "cordoned": 0, "drained": 0}
    ids = [d["device_id"] for d in data["devices"]]
    assert ids == sorted(ids) and len(ids) == 12
    row = next(d for d in data["devices"] if d["device_id"] == "dev-0000")
    assert row["tags"] == {"site": "lab", "arm64": ""}
    assert row["agent_version"] == "0.8.1"


def test_fleet_filters_by_state_tag_and_text(client: ClientFactory) -> None:
    c = client()

    def ids(query: str) -> list[str]:
        return [d["device_id"] for d in c.get(f"/api/devices?{query}").json()["devices"]]

    assert ids("state=offline") == ["dev-0003", "dev-0007", "dev-0011"]
    assert ids("tag=site%3Dfield&state=online") == ["dev-0001", "dev-0005", "dev-0009"]
    assert ids("q=0.8.1&limit=2") == ["dev-0000", "dev-0003"]
    assert ids("q=DEV-001") == ["dev-0010", "dev-0011"]


def test_fleet_sorts_with_missing_values_last(client: ClientFactory, filled: Path) -> None:
    with Store(filled) as store:
        store.update_device_status(
            "dev-9999", online=False, session_epoch=1, agent_version="", status={}
        )
    rows = client().get("/api/devices?sort=model_version&order=desc").json()["devices"]
    versions = [r["model_version"] for r in rows]
    assert versions[-1] is None and rows[-1]["device_id"] == "dev-9999"
    assert versions[:-1] == sorted(versions[:-1], reverse=True)


def test_device_model_version_is_the_last_model_it_was_sent(client: ClientFactory) -> None:
    """dev-0001 was last selected in round 3 of ``live`` (devices 0..3 of 12, from 3*4 % 12)."""
    row = client().get("/api/devices/dev-0001").json()["device"]
    assert (row["last_run"], row["model_version"]) == ("live", 2)
    assert row["density"] == pytest.approx(0.25 * (1 - 2 / 8))  # stored by round 2 of live


def test_device_history_tells_answered_late_and_rejected(client: ClientFactory) -> None:
    history = client().get("/api/devices/dev-0011").json()["history"]
    outcomes = {(h["run_id"], h["round"]): h["outcome"] for h in history}
    # done round 2 selects dev-0008..11: the last is late; round 3 (0..3) is not dev-0011's
    assert outcomes[("done", 2)] == "late"
    assert outcomes[("done", 5)] == "answered"
    history6 = client().get("/api/devices/dev-0002").json()
    # done round 6 selects 0..3: dev-0003 late, dev-0002 rejected
    assert {(h["run_id"], h["round"]): h["outcome"] for h in history6["history"]}[
        ("done", 6)
    ] == "rejected"
    assert history6["rejections"][0]["reason"] == "non_finite"
    assert history6["device"]["rejections_by_reason"] == {"non_finite": 1}


def test_a_dashboard_started_before_the_first_run_picks_up_the_store(
    client: ClientFactory, tmp_path: Path
) -> None:
    root = tmp_path / "later"
    c = client(root=root)
    assert c.get("/api/runs").json() == {"has_store": False, "runs": []}
    assert c.get("/api/devices").json()["counts"]["total"] == 0
    assert "sparsefleet_store_present 0.0" in c.get("/metrics").text
    assert not root.exists(), "the dashboard must not create a state directory"
    fill(root)
    assert [r["run_id"] for r in c.get("/api/runs").json()["runs"]] == ["live", "done"]


def test_a_server_error_is_a_page_without_a_traceback(
    client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: FleetReader) -> list[object]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(FleetReader, "devices", broken)
    response = client().get("/api/devices")
    assert response.status_code == 500
    assert "secret internals" not in response.text and "Traceback" not in response.text


def test_static_files_load_nothing_from_another_site() -> None:
    """Works with no internet: no CDN script, font or style anywhere in the package's files."""
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"dashboard.js", "charts.js", "dashboard.css"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        # The SVG namespace is an identifier, not a download.
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path

"""The fleet page's data is rebuilt only where the store changed, and is always what a fresh
read gives.

With 1,000 devices the page's JSON (400 kB) was rebuilt from scratch on every fetch: every
device row decoded, converted and encoded again. ``FleetTable`` keeps what did not change; these
tests pin down that what it answers equals ``fleet_data`` read afresh, before and after changes
of a device, a round and a rejection, and that an unchanged fleet costs no new encoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.ops.registry import DeviceRegistry
from fleet.state.store import Store
from fleet.web.fleet_view import FleetTable, encode_json, fleet_data
from fleet.web.query import DeviceQuery, parse_device_query
from fleet.web.reader import FleetReader
from tests.web.conftest import fill

QUERIES = [
    DeviceQuery(),
    parse_device_query({"state": ["online"], "sort": ["last_seen"], "order": ["desc"]}),
    parse_device_query({"tag": ["site=lab"], "q": ["dev-000"]}),
]


def _fresh(root: Path, query: DeviceQuery) -> bytes:
    reader = FleetReader(root)
    try:
        return encode_json(fleet_data(reader, query))
    finally:
        reader.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    fill(root)
    return root


def test_an_unchanged_fleet_is_answered_from_what_was_encoded(state: Path) -> None:
    reader = FleetReader(state)
    table = FleetTable(reader)
    for query in QUERIES:
        first = table.body(query)
        assert first == _fresh(state, query)
        assert table.body(query) is first  # not encoded again
    reader.close()


@pytest.mark.parametrize("change", ["cordon", "tags", "seen", "rejection", "round"])
def test_every_kind_of_change_reaches_the_answer(state: Path, change: str) -> None:
    reader = FleetReader(state)
    table = FleetTable(reader)
    before = {query: table.body(query) for query in QUERIES}
    with Store(state, create=False) as store:
        registry = DeviceRegistry(store)
        if change == "cordon":
            registry.cordon("dev-0003")
        elif change == "tags":
            store.update_device_tags("dev-0005", set_tags={"rack": "7"})
        elif change == "seen":
            store.touch_device("dev-0001", seen_at=store.now() + 3600)
        elif change == "rejection":
            store.record_rejection("live", 3, "dev-0002", "bad_signature")
        else:
            open_round = store.find_open_round("live")
            assert open_round is not None
            n = open_round.round
            dropped = [(n, u.device_id) for u in store.updates_for_round("live", n)]
            closed = store.close_round("live", n, dropped=dropped, metrics={"density": 0.125})
            store.open_round(  # two devices are sent the model that round made
                "live",
                n + 1,
                selected=["dev-0010", "dev-0011"],
                deadline=store.now() + 60,
                model_version_in=closed.model_version_out or open_round.model_version_in,
            )
    for query in QUERIES:
        now = table.body(query)
        assert now == _fresh(state, query), f"{change}: {query}"
    assert table.body(DeviceQuery()) != before[DeviceQuery()], change
    reader.close()


def test_only_the_changed_device_rows_are_rebuilt(state: Path) -> None:
    reader = FleetReader(state)
    table = FleetTable(reader)
    rows = table.rows()
    with Store(state, create=False) as store:
        DeviceRegistry(store).drain("dev-0007")
    again = table.rows()
    changed = [a["device_id"] for a, b in zip(rows, again, strict=True) if a is not b]
    assert changed == ["dev-0007"]
    assert again[7]["drained"] is True
    reader.close()


def test_the_number_of_kept_answers_is_bounded(state: Path) -> None:
    reader = FleetReader(state)
    table = FleetTable(reader, max_queries=2)
    bodies = [table.body(query) for query in QUERIES]
    assert table.body(QUERIES[0]) is not bodies[0]  # evicted, encoded again
    assert table.body(QUERIES[0]) == bodies[0]
    assert json.loads(table.body(QUERIES[2]))["devices"]
    with pytest.raises(ValueError, match="max_queries"):
        FleetTable(reader, max_queries=0)
    reader.close()


def test_a_directory_without_a_store_answers_an_empty_fleet(tmp_path: Path) -> None:
    table = FleetTable(FleetReader(tmp_path))
    data = json.loads(table.body(DeviceQuery()))
    assert data["has_store"] is False
    assert data["devices"] == []

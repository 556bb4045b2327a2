"""Listing devices re-decodes only the rows that changed, and the totals match the rows.

The dashboard lists 1,000 devices several times a second (fleet page, change feed); decoding
every row's JSON columns each time cost most of a request. A row whose stored values and
rejection counts are unchanged now gives the same frozen record as before.
"""

from __future__ import annotations

from pathlib import Path

from fleet.ops.registry import DeviceRegistry
from fleet.state.store import DeviceRecord, Store
from tests.web.storefill import add_devices


def _by_id(store: Store) -> dict[str, DeviceRecord]:
    return {d.device_id: d for d in store.list_devices()}


def test_unchanged_rows_give_the_same_records(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        add_devices(store, 8)
        first = _by_id(store)
        again = _by_id(store)
        assert all(again[k] is first[k] for k in first)


def test_each_kind_of_change_gives_a_new_record_for_that_device_only(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        add_devices(store, 8)
        registry = DeviceRegistry(store)
        changes = {
            "dev-0001": lambda: registry.cordon("dev-0001"),
            "dev-0002": lambda: store.update_device_tags("dev-0002", set_tags={"rack": "3"}),
            "dev-0003": lambda: store.touch_device("dev-0003", seen_at=store.now() + 99.0),
            "dev-0004": lambda: store.record_rejection(None, None, "dev-0004", "bad_signature"),
            "dev-0005": lambda: store.record_device_failure("dev-0005", "out of memory"),
        }
        for device_id, change in changes.items():
            before = _by_id(store)
            change()
            after = _by_id(store)
            renewed = sorted(k for k in before if after[k] is not before[k])
            assert renewed == [device_id]
            assert after[device_id] == store.get_device(device_id)  # what a fresh read gives
        assert _by_id(store)["dev-0004"].rejections == {"bad_signature": 1}


def test_device_totals_agree_with_the_rows(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as store:
        assert store.device_totals() == dict.fromkeys(
            ("devices", "online", "cordoned", "drained", "updates_accepted"), 0
        )
        add_devices(store, 10)  # every 4th offline
        registry = DeviceRegistry(store)
        registry.cordon("dev-0000")
        registry.drain("dev-0001")
        registry.drain("dev-0002")
        rows = store.list_devices()
        assert store.device_totals() == {
            "devices": len(rows),
            "online": sum(d.online for d in rows),
            "cordoned": 1,
            "drained": 2,
            "updates_accepted": sum(d.updates_accepted for d in rows),
        }
        assert store.device_totals()["online"] == 8

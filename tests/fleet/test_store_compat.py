"""A store written before the fleet/ redesign opens after it and reads back the same records.

The fixture under ``fixtures/store-pre-redesign/`` was written by the code of commit 30b9f83
(`fleet simulate` of ``store-pre-redesign.run.yaml``, then `fleet devices tag sim-0001 site=lab`
and `fleet devices cordon sim-0002`). ``store-pre-redesign.expected.json`` is what that code's
Store API read back from it; this test reads the same through today's API and compares. If it
fails, an operator's existing ``.sparsefleet/`` would no longer open as it did.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt

from fleet.state.store import SCHEMA_VERSION, Store

FIXTURES = Path(__file__).parent / "fixtures"


def _plain(value: Any) -> Any:
    """Records as JSON-able values: dataclass fields (private ones left out), enums by value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _arrays_digest(arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    """One SHA-256 over names, dtypes, shapes and bytes: equal only when bit-identical."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        for part in (name, str(a.dtype), str(a.shape)):
            h.update(part.encode())
        h.update(a.tobytes())  # C order whatever the layout; 0-d stays 0-d
    return h.hexdigest()


def _read_back(root: Path) -> dict[str, Any]:
    with Store(root) as store:
        out: dict[str, Any] = {
            "schema_version": store.schema_version(),
            "devices": [_plain(d) for d in store.list_devices()],
            "runs": [],
        }
        for run in store.list_runs():
            rounds = store.rounds(run.run_id)
            checkpoints = []
            for record in store.checkpoints(run.run_id):
                ck = store.load_checkpoint(run.run_id, record.version)
                checkpoints.append(
                    {
                        "record": _plain(record),
                        "weights": _arrays_digest(ck.weights),
                        "masks": _arrays_digest(ck.masks),
                        "extra": _arrays_digest(ck.extra_state),
                    }
                )
            updates = [
                dict(_plain(u), payload_sha=hashlib.sha256(u.load_payload()).hexdigest())
                for rd in rounds
                for u in store.updates_for_round(run.run_id, rd.round)
            ]
            out["runs"].append(
                {
                    "run": _plain(run),
                    "rounds": [_plain(r) for r in rounds],
                    "checkpoints": checkpoints,
                    "updates": updates,
                    "rejections": [_plain(r) for r in store.rejections(run_id=run.run_id)],
                }
            )
        return out


def test_a_store_written_before_the_redesign_reads_back_identically(tmp_path: Path) -> None:
    root = tmp_path / "state"
    shutil.copytree(FIXTURES / "store-pre-redesign", root)
    expected = json.loads((FIXTURES / "store-pre-redesign.expected.json").read_text())

    # Through JSON, as the expectation was written: tuples become lists, floats round-trip.
    got = json.loads(json.dumps(_read_back(root)))
    # Opening migrates the store (written at version 2) to the current schema; nothing else moves.
    assert (expected.pop("schema_version"), got.pop("schema_version")) == (2, SCHEMA_VERSION)
    assert got == expected


def test_the_old_store_still_accepts_writes_after_opening(tmp_path: Path) -> None:
    """Opening is not read-only compatibility: the operator's next run writes to the same store."""
    root = tmp_path / "state"
    shutil.copytree(FIXTURES / "store-pre-redesign", root)
    with Store(root) as store:
        store.set_device_flags("sim-0003", cordoned=True)
        digest = store.write_blob(b"new tensor bytes")
        assert store.read_blob(digest) == b"new tensor bytes"
        assert store.check_integrity() == []
    with Store(root) as store:
        assert store.get_device("sim-0003").cordoned
        assert store.get_device("sim-0002").cordoned  # the fixture's own flag survives

"""Durable state: idempotent updates, files before rows, checkpoints, WAL, migrations.

Everything runs against real files and a real SQLite database in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from device.errors import DataError, NotFoundError
from fleet.state.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    RoundStatus,
    RunStatus,
    Store,
    StoreConflictError,
    UpdateStatus,
    decode_checkpoint,
    encode_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = "run-a"


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state", clock=FakeClock()) as s:
        yield s


def start_run(store: Store, *, devices: tuple[str, ...] = ("d1", "d2", "d3")) -> None:
    """A running run with model version 0 saved and round 1 open for ``devices``."""
    store.create_run(RUN, config={"rounds": 3}, strategy="fedavg", model_name="mlp")
    store.set_run_status(RUN, RunStatus.RUNNING)
    store.save_checkpoint(RUN, 0, {"w": np.zeros(4, np.float32)}, {})
    store.open_round(RUN, 1, selected=devices, deadline=1e10, model_version_in=0)


def tensor_files(store: Store) -> list[Path]:
    return sorted(p for p in store.tensors_dir.rglob("*") if p.is_file())


def run_python(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )


# -- database settings -------------------------------------------------------------------------


def test_database_is_in_wal_mode_with_foreign_keys(store: Store) -> None:
    """WAL is what lets the CLI read while the runner writes; foreign keys keep rows linked."""
    raw = sqlite3.connect(store.db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    conn = store._db.conn()  # the store's own connection: its per-connection settings
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.schema_version() == SCHEMA_VERSION


def test_open_without_create_refuses_missing_state(tmp_path: Path) -> None:
    """A read-only caller (``fleet devices list``) must not create an empty state directory."""
    with pytest.raises(NotFoundError, match="no fleet state"):
        Store(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


# -- updates -----------------------------------------------------------------------------------


def test_redelivered_update_is_stored_once_and_first_payload_wins(store: Store) -> None:
    """A QoS 1 redelivery must change nothing: not the payload, not a single counter."""
    start_run(store)
    assert store.record_update(RUN, 1, "d1", b"first", 10, {"train_s": 1.5}) is True
    before_round = store.get_round(RUN, 1)
    before_device = store.get_device("d1")
    files_before = tensor_files(store)

    assert store.record_update(RUN, 1, "d1", b"second, different", 99) is False

    updates = store.updates_for_round(RUN, 1)
    assert [(u.device_id, u.num_examples, u.meta) for u in updates] == [
        ("d1", 10, {"train_s": 1.5})
    ]
    assert updates[0].load_payload() == b"first"
    assert store.get_round(RUN, 1) == before_round
    assert store.get_device("d1") == before_device
    assert tensor_files(store) == files_before


def test_new_update_moves_counters_in_the_same_transaction(store: Store) -> None:
    """Uplink bytes and accepted counts are exact because they commit with the row."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"x" * 100, 5, received_at=1_800_000_000.0)
    store.record_update(RUN, 1, "d2", b"y" * 30, 5, bytes_up=0)
    assert store.get_round(RUN, 1).bytes_up == 100
    d1 = store.get_device("d1")
    assert d1 is not None
    assert (d1.updates_accepted, d1.bytes_up, d1.last_seen) == (1, 100, 1_800_000_000.0)


def test_identical_content_is_stored_once(store: Store) -> None:
    """Content addressing: two devices sending the same bytes use one file."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"same bytes", 1)
    store.record_update(RUN, 1, "d2", b"same bytes", 1)
    digest = hashlib.sha256(b"same bytes").hexdigest()
    assert tensor_files(store) == sorted(
        [store.blob_path(digest), store.blob_path(store.checkpoint_record(RUN, 0).digest)]
    )
    assert {u.payload_digest for u in store.updates_for_round(RUN, 1)} == {digest}


def test_updates_are_listed_by_device_id_not_arrival(store: Store) -> None:
    """Aggregation order fixes the float result; it must not depend on arrival order."""
    start_run(store, devices=("a", "b", "c"))
    for device in ("c", "a", "b"):
        store.record_update(RUN, 1, device, device.encode(), 1)
    assert [u.device_id for u in store.updates_for_round(RUN, 1)] == ["a", "b", "c"]


def test_update_for_a_round_never_opened_is_refused(store: Store) -> None:
    """A row must always belong to a round a restart can find."""
    start_run(store)
    with pytest.raises(NotFoundError, match="has no round 7"):
        store.record_update(RUN, 7, "d1", b"p", 1)
    assert store.get_update(RUN, 7, "d1") is None


def test_reader_detects_corrupt_or_missing_tensor_file(store: Store) -> None:
    """A payload that is not what was stored must never reach aggregation silently."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"payload", 1)
    (update,) = store.updates_for_round(RUN, 1)
    path = store.blob_path(update.payload_digest)
    path.write_bytes(b"tampered")
    with pytest.raises(DataError, match="corrupt"):
        update.load_payload()
    path.unlink()
    with pytest.raises(DataError, match="missing"):
        update.load_payload()
    assert any("missing" in p for p in store.check_integrity())


# -- files first, then rows --------------------------------------------------------------------


def test_crash_between_file_and_row_leaves_a_harmless_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dying after the file but before the commit: the update was never acknowledged, so it is
    absent, the store is consistent, and the redelivery is stored as new."""
    start_run(store)

    @contextlib.contextmanager
    def crash(*, durable: bool = True) -> Iterator[sqlite3.Connection]:
        raise KeyboardInterrupt("killed before the row was written")
        yield store._db.conn()  # pragma: no cover

    with monkeypatch.context() as m:
        m.setattr(store._db, "write", crash)  # every write transaction starts here
        with pytest.raises(KeyboardInterrupt):
            store.record_update(RUN, 1, "d1", b"orphan payload", 3)
    orphan = store.blob_path(hashlib.sha256(b"orphan payload").hexdigest())
    assert orphan.exists()
    assert store.get_update(RUN, 1, "d1") is None
    assert store.check_integrity() == []

    assert store.record_update(RUN, 1, "d1", b"orphan payload", 3) is True
    assert store.updates_for_round(RUN, 1)[0].load_payload() == b"orphan payload"


def test_row_is_not_written_when_the_file_write_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while writing the payload: no row may name a file that does not exist."""
    start_run(store)

    def disk_full(data: bytes) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store._files, "write", disk_full)  # every tensor file is written here
    with pytest.raises(OSError, match="No space"):
        store.record_update(RUN, 1, "d1", b"never stored", 3)
    assert store.get_update(RUN, 1, "d1") is None
    assert store.get_device("d1") is not None  # created by selection, counters untouched
    assert store.get_device("d1").updates_accepted == 0  # type: ignore[union-attr]


def test_temp_files_of_dead_writers_are_removed_on_open(tmp_path: Path) -> None:
    """A writer killed mid-file leaves a temp file; the next open cleans it, but never a live
    writer's."""
    root = tmp_path / "state"
    Store(root).close()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    dead_pid = int(dead.stdout)
    sub = root / "tensors" / "ab"
    sub.mkdir()
    stale = sub / f".abcdef0123456789.{dead_pid}.deadbeef.tmp"
    live = sub / f".abcdef0123456789.{os.getppid()}.deadbeef.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    Store(root).close()
    assert not stale.exists()
    assert live.exists()


# -- rounds and counting -----------------------------------------------------------------------


def test_close_round_counts_updates_exactly_once(store: Store) -> None:
    """Counting the same update into two aggregates is what resume must never do."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"1", 10)
    store.record_update(RUN, 1, "d2", b"2", 20)
    store.save_checkpoint(RUN, 1, {"w": np.ones(4, np.float32)}, {}, round=1)
    closed = store.close_round(
        RUN, 1, model_version_out=1, counted=[(1, "d1"), (1, "d2")], metrics={"loss": 0.5}
    )
    assert closed.status is RoundStatus.CLOSED
    assert closed.checkpoint_digest == store.checkpoint_record(RUN, 1).digest
    assert {u.status for u in store.updates_for_round(RUN, 1)} == {UpdateStatus.COUNTED}

    store.open_round(RUN, 2, selected=["d1"], deadline=1e10, model_version_in=1)
    with pytest.raises(StoreConflictError, match="already counted in round 1"):
        store.close_round(RUN, 2, counted=[(1, "d1")])
    assert store.get_round(RUN, 2).status is RoundStatus.OPEN  # rolled back as a whole


def test_close_round_refuses_to_forget_an_accepted_update(store: Store) -> None:
    """An acknowledged update must be counted or explicitly dropped, never silently lost."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"1", 10)
    store.record_update(RUN, 1, "d2", b"2", 20)
    store.save_checkpoint(RUN, 1, {"w": np.ones(4, np.float32)}, {}, round=1)
    with pytest.raises(StoreConflictError, match=r"\['d2'\] neither counted nor dropped"):
        store.close_round(RUN, 1, model_version_out=1, counted=[(1, "d1")])
    assert store.get_update(RUN, 1, "d1").status is UpdateStatus.ACCEPTED  # type: ignore[union-attr]
    store.close_round(RUN, 1, model_version_out=1, counted=[(1, "d1")], dropped=[(1, "d2")])
    assert store.get_update(RUN, 1, "d2").status is UpdateStatus.DROPPED  # type: ignore[union-attr]


def test_late_update_is_counted_into_the_next_round(store: Store) -> None:
    """The 'count into the next round' late policy: stored as late, decided at the next close."""
    start_run(store)
    store.close_round(RUN, 1, reason="deadline")  # nothing arrived: model unchanged
    assert store.get_round(RUN, 1).model_version_out == 0
    with pytest.raises(StoreConflictError, match="record the update from 'd1' as late"):
        store.record_update(RUN, 1, "d1", b"late", 4)
    assert store.record_update(RUN, 1, "d1", b"late", 4, status="late") is True
    assert [(u.round, u.device_id) for u in store.undecided_updates(RUN)] == [(1, "d1")]

    store.open_round(RUN, 2, selected=["d2"], deadline=1e10, model_version_in=0)
    store.record_update(RUN, 2, "d2", b"on time", 4)
    store.save_checkpoint(RUN, 1, {"w": np.ones(4, np.float32)}, {}, round=2)
    store.close_round(RUN, 2, model_version_out=1, counted=[(1, "d1"), (2, "d2")])
    late = store.get_update(RUN, 1, "d1")
    assert late is not None
    assert (late.status, late.counted_in_round) == (UpdateStatus.COUNTED, 2)
    assert store.undecided_updates(RUN) == []


def test_open_round_enforces_one_open_increasing_round_with_saved_input(store: Store) -> None:
    """A restart must find exactly one open round whose input model it can reload."""
    store.create_run(RUN, config={}, strategy="fedavg", model_name="mlp")
    with pytest.raises(StoreConflictError, match="is created, not running"):
        store.open_round(RUN, 1, selected=["d1"], deadline=0.0, model_version_in=0)
    store.set_run_status(RUN, "running")
    with pytest.raises(NotFoundError, match="no checkpoint of model version 0"):
        store.open_round(RUN, 1, selected=["d1"], deadline=0.0, model_version_in=0)
    store.save_checkpoint(RUN, 0, {"w": np.zeros(2, np.float32)}, {})
    store.open_round(RUN, 1, selected=["d1", "d2"], deadline=5.0, model_version_in=0)
    with pytest.raises(StoreConflictError, match="already has round 1 open"):
        store.open_round(RUN, 2, selected=["d1"], deadline=0.0, model_version_in=0)
    store.close_round(RUN, 1)
    with pytest.raises(StoreConflictError, match="must be larger"):
        store.open_round(RUN, 1, selected=["d1"], deadline=0.0, model_version_in=0)
    with pytest.raises(ValueError, match="selects a device twice"):
        store.open_round(RUN, 2, selected=["d1", "d1"], deadline=0.0, model_version_in=0)
    assert store.find_open_round(RUN) is None
    assert store.get_run(RUN).current_round == 1
    assert store.get_device("d2").rounds_joined == 1  # type: ignore[union-attr]


def test_run_status_transitions_are_checked(store: Store) -> None:
    """A finished run cannot be resumed by mistake; unknown statuses are named errors."""
    store.create_run(RUN, config={"a": 1}, strategy="feddst", model_name="cnn")
    with pytest.raises(StoreConflictError, match="already exists"):
        store.create_run(RUN, config={}, strategy="x", model_name="y")
    store.set_run_status(RUN, "running")
    store.set_run_status(RUN, "stopped")
    store.set_run_status(RUN, "running")
    store.set_run_status(RUN, "finished")
    with pytest.raises(StoreConflictError, match="from finished to running"):
        store.set_run_status(RUN, "running")
    with pytest.raises(ValueError, match="unknown run status 'paused'; known: created, running"):
        store.set_run_status(RUN, "paused")
    assert [r.run_id for r in store.list_runs(status="finished")] == [RUN]
    assert store.get_run(RUN).config == {"a": 1}


def test_round_metrics_survive_non_finite_values(store: Store) -> None:
    """A diverged evaluation (NaN loss) must not make closing the round fail."""
    start_run(store)
    store.close_round(RUN, 1, metrics={"loss": float("nan"), "accuracy": np.float32(0.25)})
    store.set_round_metrics(RUN, 1, {"density": 0.2})
    assert store.get_round(RUN, 1).metrics == {"loss": None, "accuracy": 0.25, "density": 0.2}


def test_rejections_and_traffic_are_counted(store: Store) -> None:
    """Per-device rejection reasons and byte counts feed `fleet devices show`."""
    start_run(store)
    store.record_rejection(RUN, 1, "d1", "non_finite", "values[3] is NaN")
    store.record_rejection(RUN, 1, "d1", "non_finite")
    store.record_rejection("no-such-run", 9, "d1", "unknown_run")
    store.add_traffic(RUN, 1, "d1", down=1000)
    store.add_traffic(RUN, 1, None, down=500)
    assert store.rejection_counts(device_id="d1") == {"non_finite": 2, "unknown_run": 1}
    assert store.rejection_counts(run_id=RUN) == {"non_finite": 2}
    assert store.rejections(device_id="d1", limit=1)[0].reason == "unknown_run"
    assert store.get_round(RUN, 1).bytes_down == 1500
    d1 = store.get_device("d1")
    assert d1 is not None
    assert (d1.bytes_down, d1.rejections) == (1000, {"non_finite": 2, "unknown_run": 1})
    with pytest.raises(NotFoundError):
        store.add_traffic(RUN, 42, None, up=1)


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trips_bit_identically(store: Store) -> None:
    """Resume must continue from exactly the saved model: same bits, dtypes, shapes, order."""
    rng = np.random.default_rng(0)
    weights: dict[str, npt.NDArray[Any]] = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.weight": np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float32)),
        "fc.bias": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
        "half": rng.standard_normal(3).astype(np.float16),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 2), np.float32),
    }
    masks = {
        "conv.weight": rng.random((4, 3, 3, 3)) < 0.2,
        "fc.weight": rng.random((5, 7)) < 0.5,
    }
    extra: dict[str, npt.NDArray[Any]] = {
        "momentum/fc.weight": rng.standard_normal((5, 7)),
        "step": np.array(7, np.int64),
    }
    store.create_run(RUN, config={}, strategy="feddst", model_name="cnn")
    digest = store.save_checkpoint(RUN, 3, weights, masks, extra, {"accuracy": 0.9}, round=2)

    loaded = store.load_checkpoint(RUN)  # latest
    assert loaded.record.digest == digest
    assert (loaded.record.version, loaded.record.round, loaded.record.meta) == (
        3,
        2,
        {"accuracy": 0.9},
    )
    pairs: list[tuple[Mapping[str, npt.NDArray[Any]], Mapping[str, npt.NDArray[Any]]]] = [
        (weights, loaded.weights),
        (masks, loaded.masks),
        (extra, loaded.extra_state),
    ]
    for saved, got in pairs:
        assert saved.keys() == got.keys()
        for name, array in saved.items():
            assert got[name].dtype == array.dtype, name
            assert got[name].shape == array.shape, name
            assert got[name].flags.f_contiguous == array.flags.f_contiguous, name
            assert got[name].tobytes("A") == array.tobytes("A"), name


def test_same_checkpoint_twice_has_one_digest_and_one_file(store: Store) -> None:
    """Re-aggregating after a restart re-saves the same model: it must be a no-op."""
    store.create_run(RUN, config={}, strategy="fedavg", model_name="mlp")
    w = {"w": np.arange(6, dtype=np.float32)}
    first = store.save_checkpoint(RUN, 0, w, {})
    files = tensor_files(store)
    assert store.save_checkpoint(RUN, 0, {"w": np.arange(6, dtype=np.float32)}, {}) == first
    assert tensor_files(store) == files
    assert encode_checkpoint(w, {}) == encode_checkpoint(dict(w), {})


def test_checkpoint_version_is_immutable_once_a_round_used_it(store: Store) -> None:
    """Devices were sent version 0: silently replacing it would corrupt every later round."""
    start_run(store)
    with pytest.raises(StoreConflictError, match="used by round 1"):
        store.save_checkpoint(RUN, 0, {"w": np.ones(4, np.float32)}, {})
    # An aggregate saved before a crash, with the round still open, may be replaced.
    store.save_checkpoint(RUN, 1, {"w": np.ones(4, np.float32)}, {}, round=1)
    store.save_checkpoint(RUN, 1, {"w": np.full(4, 2, np.float32)}, {}, round=1)
    assert store.load_checkpoint(RUN, 1).weights["w"].tolist() == [2.0] * 4


def test_checkpoint_rejects_inconsistent_masks() -> None:
    """A mask that does not fit its weight would break every later aggregation."""
    w = {"w": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"masks\['w'\] has dtype float32, not bool"):
        encode_checkpoint(w, {"w": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"masks\['w'\] has shape \(3, 2\)"):
        encode_checkpoint(w, {"w": np.zeros((3, 2), bool)})
    with pytest.raises(ValueError, match=r"masks\['v'\] has no weight"):
        encode_checkpoint(w, {"v": np.zeros((2, 3), bool)})
    with pytest.raises(ValueError, match="object dtype"):
        encode_checkpoint({"w": np.array([object()])}, {})
    with pytest.raises(DataError, match="not a readable"):
        decode_checkpoint(b"not a zip")


def test_missing_checkpoint_is_not_found(store: Store) -> None:
    store.create_run(RUN, config={}, strategy="fedavg", model_name="mlp")
    with pytest.raises(NotFoundError, match=r"has no checkpoint$"):
        store.load_checkpoint(RUN)
    with pytest.raises(NotFoundError, match="checkpoint version 4"):
        store.load_checkpoint(RUN, 4)


# -- schema migrations -------------------------------------------------------------------------


def test_migration_hook_applies_each_new_version_once(tmp_path: Path) -> None:
    """An upgraded sparsefleet migrates an existing fleet.db in place, exactly once."""
    root = tmp_path / "state"
    Store(root).close()

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")

    upgraded = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "run owner", add_column))
    with Store(root, migrations=upgraded) as s:
        assert s.schema_version() == SCHEMA_VERSION + 1
        columns = [r["name"] for r in s._db.conn().execute("PRAGMA table_info(runs)")]
        assert "owner" in columns
    with Store(root, migrations=upgraded) as s:  # would fail if the ALTER ran again
        assert s.schema_version() == SCHEMA_VERSION + 1
    with pytest.raises(DataError, match="newer than this sparsefleet"):
        Store(root)


# -- concurrency -------------------------------------------------------------------------------


def test_reader_in_another_process_sees_committed_rows_while_a_write_is_open(
    store: Store,
) -> None:
    """WAL: `fleet run status` in another process reads committed state without waiting for,
    or seeing, the runner's transaction in progress."""
    start_run(store)
    store.record_update(RUN, 1, "d1", b"committed", 7)
    writer = sqlite3.connect(store.db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "INSERT INTO runs (run_id, config, strategy, model_name, status, created_at,"
            " updated_at) VALUES ('uncommitted', '{}', 's', 'm', 'created', 0, 0)"
        )
        result = run_python(
            f"""
            import json
            from fleet.state.store import Store
            s = Store({str(store.root)!r}, create=False, busy_timeout_s=0.5)
            print(json.dumps({{
                "runs": [r.run_id for r in s.list_runs()],
                "updates": [[u.device_id, u.num_examples, u.load_payload().decode()]
                            for u in s.updates_for_round({RUN!r}, 1)],
            }}))
            """,
            timeout=20,
        )
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"runs": [RUN], "updates": [["d1", 7, "committed"]]}


def test_threads_can_write_concurrently(store: Store) -> None:
    """The runner's worker and the MQTT side may both write; nothing is lost or locked out."""
    devices = tuple(f"d{i}" for i in range(40))
    start_run(store, devices=devices)
    errors: list[BaseException] = []

    def worker(chunk: tuple[str, ...]) -> None:
        try:
            for device in chunk:
                assert store.record_update(RUN, 1, device, device.encode(), 1)
                store.record_rejection(RUN, 1, device, "noise")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(devices[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [u.device_id for u in store.updates_for_round(RUN, 1)] == sorted(devices)
    assert store.rejection_counts(run_id=RUN) == {"noise": 40}

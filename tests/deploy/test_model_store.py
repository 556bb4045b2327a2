"""A device's models directory: versions side by side, an atomic switch, a rollback target."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from device.model_store import ModelStore, ModelStoreError, Pending


def _put(store: ModelStore, version: str, data: bytes) -> str:
    store.write(version, data)
    return hashlib.sha256(data).hexdigest()


def test_activating_keeps_the_previous_version_for_a_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = _put(store, "v1", b"one")
    store.activate("v1", first, deployment_id="d1", sequence=1, now=10.0)
    second = _put(store, "v2", b"two")
    state = store.activate("v2", second, deployment_id="d2", sequence=2, now=20.0)
    assert state.active is not None and state.active.version == "v2"
    assert state.previous is not None and state.previous.version == "v1"
    assert state.last_sequence == 2
    assert store.rollback_target().version == "v1"
    assert store.read("v1") == b"one"


def test_a_rollback_with_no_earlier_version_is_a_clear_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="no earlier model version"):
        store.rollback_target()
    store.activate("v1", _put(store, "v1", b"one"))
    with pytest.raises(ModelStoreError, match=r"no earlier model version .*active: v1"):
        store.rollback_target()
    with pytest.raises(ModelStoreError, match="not kept"):
        store.rollback_target("v0")


def test_only_keep_versions_stay_on_disk(tmp_path: Path) -> None:
    """Old files go once they are neither active nor among the kept previous versions."""
    store = ModelStore(tmp_path, keep=2)
    for i in range(4):
        store.activate(f"v{i}", _put(store, f"v{i}", f"model {i}".encode()))
    assert store.versions() == ["v2", "v3"]


def test_a_pending_version_is_never_pruned(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=2)
    pending = _put(store, "next", b"next")
    store.update(pending=Pending("d9", 9, "next", pending))
    for i in range(3):
        store.activate(f"v{i}", _put(store, f"v{i}", f"model {i}".encode()))
    assert "next" in store.versions()


def test_a_label_names_one_artefact(tmp_path: Path) -> None:
    """Writing other bytes under an existing label is refused: a rollback must get back exactly
    what ran before."""
    store = ModelStore(tmp_path)
    _put(store, "v1", b"one")
    _put(store, "v1", b"one")  # the same bytes again: fine
    with pytest.raises(ModelStoreError, match="already exists"):
        store.write("v1", b"other")


def test_activating_a_version_that_is_not_on_disk_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="not on disk"):
        store.activate("v1", "0" * 64)
    assert store.state().active is None


def test_an_interrupted_write_leaves_the_old_state(tmp_path: Path) -> None:
    """The switch is the rename of state.json: a temporary file left by a crash is ignored."""
    store = ModelStore(tmp_path)
    store.activate("v1", _put(store, "v1", b"one"))
    (tmp_path / ".state.json.1234.tmp").write_text('{"active": {"version": "v2"')
    assert store.state().active is not None and store.state().active.version == "v1"


def test_usage_counts_sum_over_processes_per_activation(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    state = store.activate("v1", _put(store, "v1", b"one"), now=5.0)
    assert state.active is not None
    from device.model_store import usage_key

    store.record_usage("proc-a", {usage_key(state.active): (10, 1)})
    store.record_usage("proc-b", {usage_key(state.active): (5, 0), "v0@1.000000": (99, 9)})
    assert store.usage(state.active) == (15, 1)


def test_bad_version_labels_are_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for bad in ("", "../escape", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="version"):
            store.write(bad, b"data")

"""The store's chunk tables: how sharded workers reassemble a chunked update between them.

A chunk is acknowledged once stored, so the store must keep it durably, ignore duplicates
(first write wins), reassemble in any order exactly once all pieces are there, refuse a
payload whose SHA-256 does not match, bound what one device can make it hold, and purge
transfers that can no longer count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fleet.state.store import SCHEMA_VERSION, ChunkKey, Store

RUN = "r"
PAYLOAD = bytes(range(256)) * 9 + b"tail"  # 2308 B: 5 chunks of 500 B, the last 308 B
SIZE = 500
COUNT = 5


def _pieces() -> list[bytes]:
    return [PAYLOAD[i * SIZE : (i + 1) * SIZE] for i in range(COUNT)]


def _key(device: str = "d1", round_: int = 1, payload: bytes = PAYLOAD) -> ChunkKey:
    return ChunkKey(RUN, round_, device, hashlib.sha256(payload).digest())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def _manifest(store: Store, key: ChunkKey, limit: int = 10_000) -> str:
    out = store.store_chunk_manifest(key, len(PAYLOAD), COUNT, SIZE, max_payload_bytes=limit)
    assert out.payload is None
    return out.problem


def test_schema_has_the_chunk_tables(store: Store) -> None:
    """The migration to version 2 ran (the chunk tables exist in a fresh store)."""
    assert SCHEMA_VERSION >= 2 and store.schema_version() == SCHEMA_VERSION
    assert store.chunk_bytes_held(RUN) == 0


def test_out_of_order_pieces_with_duplicates_reassemble_once(store: Store) -> None:
    """Chunks before the manifest, in reverse order, some twice: the transfer completes on the
    last missing piece, and only then, with the exact payload."""
    key = _key()
    pieces = _pieces()
    for i in (4, 2, 2, 0, 3):
        out = store.store_chunk(key, i, pieces[i], max_device_bytes=10_000)
        assert out.payload is None and not out.problem
    assert not store.store_chunk(key, 2, pieces[2], max_device_bytes=10_000).new  # duplicate
    assert _manifest(store, key) == ""
    done = store.store_chunk(key, 1, pieces[1], max_device_bytes=10_000)
    assert done.new and done.payload == PAYLOAD
    # A redelivered piece before the caller deleted the set completes it again (the update
    # table's first-write-wins then makes it count once); after the delete nothing is left.
    again = store.store_chunk(key, 1, pieces[1], max_device_bytes=10_000)
    assert not again.new and again.payload == PAYLOAD
    store.delete_chunk_set(key)
    assert store.chunk_bytes_held(RUN) == 0


def test_manifest_last_completes_too(store: Store) -> None:
    key = _key()
    for i, piece in enumerate(_pieces()):
        assert store.store_chunk(key, i, piece, max_device_bytes=10_000).payload is None
    out = store.store_chunk_manifest(key, len(PAYLOAD), COUNT, SIZE, max_payload_bytes=10_000)
    assert out.payload == PAYLOAD


def test_corrupt_digest_gives_the_transfer_up(store: Store) -> None:
    """Pieces that do not hash to the manifest's SHA-256 are refused and deleted."""
    key = _key(payload=b"something else")
    assert _manifest(store, key) == ""
    outs = [store.store_chunk(key, i, p, max_device_bytes=10_000) for i, p in enumerate(_pieces())]
    assert outs[-1].payload is None and "SHA-256" in outs[-1].problem
    assert store.chunk_bytes_held(RUN) == 0


def test_conflicting_pieces_give_the_transfer_up(store: Store) -> None:
    """A second, different copy of a chunk or a chunk the manifest cannot hold is an attack or
    a bug; the transfer is dropped with the reason."""
    key = _key()
    store.store_chunk(key, 0, _pieces()[0], max_device_bytes=10_000)
    out = store.store_chunk(key, 0, b"x" * SIZE, max_device_bytes=10_000)
    assert "different data" in out.problem and store.chunk_bytes_held(RUN) == 0
    store.store_chunk(key, 7, b"x" * SIZE, max_device_bytes=10_000)
    assert (
        "beyond chunk_count"
        in store.store_chunk_manifest(
            key, len(PAYLOAD), COUNT, SIZE, max_payload_bytes=10_000
        ).problem
    )
    store.store_chunk(key, 1, b"x" * 10, max_device_bytes=10_000)
    assert "1 has 10 B" in _manifest(store, key)


def test_malicious_sizes_are_refused(store: Store) -> None:
    """A manifest over the payload limit, an inconsistent one, and a device piling up chunks
    beyond its allowance are refused with a reason, and nothing is kept."""
    key = _key()
    assert "exceeds the limit" in _manifest(store, key, limit=1000)
    bad = store.store_chunk_manifest(key, 10**12, 2, SIZE, max_payload_bytes=10**13)
    assert "does not fit" in bad.problem
    out = None
    for i in range(10):  # the same device, many transfers
        out = store.store_chunk(_key(payload=bytes([i])), 0, b"y" * 400, max_device_bytes=1500)
    assert out is not None and "over the limit of 1500 B" in out.problem
    assert store.chunk_bytes_held(RUN, "d1") <= 1500
    # Another device is not affected by d1's allowance.
    other = store.store_chunk(_key("d2"), 0, _pieces()[0], max_device_bytes=1500)
    assert other.new and not other.problem


def test_purge_by_round_and_by_age(tmp_path: Path) -> None:
    """Closed rounds' transfers go at the close; abandoned ones after a time limit."""
    now = [1000.0]
    store = Store(tmp_path / "s", clock=lambda: now[0])
    store.store_chunk(_key(round_=1), 0, b"a" * SIZE, max_device_bytes=10_000)
    _manifest(store, _key(round_=1))
    store.store_chunk(_key(round_=2), 0, b"b" * SIZE, max_device_bytes=10_000)
    now[0] = 2000.0
    store.store_chunk(_key("d2", round_=2), 0, b"c" * SIZE, max_device_bytes=10_000)
    assert store.purge_chunks(RUN, rounds_up_to=1) == 2  # round 1's chunk and manifest
    assert store.chunk_bytes_held(RUN) == 2 * SIZE
    assert store.purge_chunks(RUN, received_before=1500.0) == 1
    assert store.chunk_bytes_held(RUN) == SIZE and store.chunk_bytes_held(RUN, "d2") == SIZE
    with pytest.raises(ValueError, match="needs rounds_up_to"):
        store.purge_chunks(RUN)


def test_chunks_survive_reopening(tmp_path: Path) -> None:
    """Stored means durable: a worker that acknowledged a chunk and died leaves it for the
    worker that stores the last piece."""
    key = _key()
    with Store(tmp_path / "s") as first:
        for i, piece in enumerate(_pieces()[:-1]):
            first.store_chunk(key, i, piece, max_device_bytes=10_000)
        _manifest(first, key)
    with Store(tmp_path / "s") as second:
        out = second.store_chunk(key, COUNT - 1, _pieces()[-1], max_device_bytes=10_000)
        assert out.payload == PAYLOAD

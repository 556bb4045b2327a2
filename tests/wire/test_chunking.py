"""Chunking: packet sizes, splitting under the broker's limit, and idempotent reassembly."""

from __future__ import annotations

import hashlib
import random

import pytest

from device.errors import ChunkError
from device.wire import envelope
from device.wire.chunking import (
    SAFETY_MARGIN_BYTES,
    Packet,
    Reassembler,
    ReassemblyLimits,
    Receiver,
    chunk_data_bytes,
    peek_chunk_kind,
    plan_publish,
    publish_packet_size,
)
from device.wire.messages import Chunk, ChunkManifest, Envelope, FleetStatus

TOPIC = "fl/v1/dev/d1/up/run/3"
LIMIT = 4096


def _packets(payload: bytes, limit: int = LIMIT, **kw: int) -> list[Packet]:
    _, out = plan_publish(TOPIC, payload, qos=1, retain=False, max_packet_bytes=limit, **kw)
    return [Packet(p.topic, p.payload, 1, False, mid) for mid, p in enumerate(out, start=1)]


def _feed_all(r: Reassembler, packets: list[Packet]) -> list[bytes]:
    return [f.message.payload for p in packets if (f := r.feed(p)).message is not None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "qos", "expected"),
    [
        ("a", 0, 0, 1 + 1 + 2 + 1 + 1),  # header, rem-len, topic len+name, empty props
        ("a", 0, 1, 1 + 1 + 2 + 1 + 2 + 1),  # plus the packet id
        ("a", 121, 1, 1 + 1 + 127),  # remaining length 127: one byte
        ("a", 122, 1, 1 + 2 + 128),  # remaining length 128: two bytes
        ("é", 10, 0, 1 + 1 + 2 + 2 + 1 + 10),  # the topic counts in UTF-8 bytes
    ],
)
def test_publish_packet_size_is_exact(topic: str, payload: int, qos: int, expected: int) -> None:
    """The broker counts whole packets; an error of one byte at a varint boundary is enough to
    get a client disconnected, so the formula is checked at those boundaries."""
    assert publish_packet_size(topic, payload, qos) == expected


def test_a_payload_that_fits_is_sent_unchanged() -> None:
    """Small messages must not pay for chunking, and receivers see exactly the caller's bytes."""
    payload = b"x" * 100
    count, packets = plan_publish(TOPIC, payload, qos=1, retain=True, max_packet_bytes=LIMIT)
    out = list(packets)
    assert count == 0
    assert [(p.topic, p.payload, p.retain) for p in out] == [(TOPIC, payload, True)]


def test_every_chunk_packet_fits_under_the_limit() -> None:
    """The whole point: no packet, manifest or chunk, exceeds the broker's maximum."""
    payload = random.Random(1).randbytes(50_000)
    count, packets = plan_publish(TOPIC, payload, qos=1, retain=False, max_packet_bytes=LIMIT)
    out = list(packets)
    assert count == len(out) - 1 > 1
    sizes = [publish_packet_size(p.topic, len(p.payload), 1) for p in out]
    assert max(sizes) <= LIMIT - SAFETY_MARGIN_BYTES
    # ... and the chunks are not needlessly small: within 64 bytes of the limit.
    assert max(sizes) > LIMIT - SAFETY_MARGIN_BYTES - 64
    assert [p.topic for p in out] == [TOPIC] + [f"{TOPIC}/{i}" for i in range(count)]


def test_chunk_size_is_capped_by_max_chunk_bytes() -> None:
    """With a generous broker, chunks stay at the configured size (4 MiB by default), which
    bounds the memory a device needs per packet."""
    assert chunk_data_bytes(TOPIC, 1, 10**8, 1000) == 1000
    count, packets = plan_publish(
        TOPIC, b"y" * 2500, qos=1, retain=False, max_packet_bytes=2000, max_chunk_bytes=1000
    )
    chunks = [envelope.decode(p.payload).body for p in list(packets)[1:]]
    assert count == 3
    assert [len(c.data) for c in chunks if isinstance(c, Chunk)] == [1000, 1000, 500]


def test_a_limit_too_small_for_any_chunk_is_an_error() -> None:
    with pytest.raises(ValueError, match="no room for chunk data"):
        plan_publish(TOPIC, b"z" * 1000, qos=1, retain=False, max_packet_bytes=100)


def test_manifest_describes_the_payload() -> None:
    payload = random.Random(2).randbytes(10_000)
    count, packets = plan_publish(TOPIC, payload, qos=1, retain=False, max_packet_bytes=LIMIT)
    manifest = envelope.decode(next(packets).payload).body
    assert isinstance(manifest, ChunkManifest)
    assert manifest.sha256 == hashlib.sha256(payload).digest()
    assert (manifest.total_bytes, manifest.chunk_count) == (10_000, count)


def test_peek_tells_chunk_envelopes_from_other_payloads() -> None:
    """Receivers route on this for every message, so it must be right and must not decode."""
    manifest, chunk, *_ = _packets(b"q" * 10_000)
    assert peek_chunk_kind(manifest.payload) == "manifest"
    assert peek_chunk_kind(chunk.payload) == "chunk"
    other = envelope.encode(Envelope(body=FleetStatus(online=True)))
    assert peek_chunk_kind(other) is None
    assert peek_chunk_kind(b"\xff\xfe not protobuf") is None
    assert peek_chunk_kind(b"") is None


# -- reassembly -------------------------------------------------------------------------------


def test_chunks_reassemble_in_any_order_with_all_packet_ids() -> None:
    """MQTT orders messages per topic only, and chunks travel on different topics: any
    arrival order must work, and one ack of the result must cover every packet."""
    payload = random.Random(3).randbytes(30_000)
    packets = _packets(payload)
    random.Random(4).shuffle(packets)
    r = Reassembler()
    results = [f.message for p in packets if (f := r.feed(p)).message is not None]
    assert len(results) == 1
    message = results[0]
    assert (message.topic, message.payload, message.qos) == (TOPIC, payload, 1)
    assert sorted(message.ack_ids) == list(range(1, len(packets) + 1))
    assert r.pending_bytes == 0 and r.pending_sets == 0


def test_duplicate_chunks_are_ignored_but_their_packet_ids_kept() -> None:
    """QoS 1 redelivers; a duplicate must not corrupt the payload or yield it twice, and its
    (new) packet id must be acknowledged with the message."""
    payload = random.Random(5).randbytes(12_000)
    packets = _packets(payload)
    dup = Packet(packets[1].topic, packets[1].payload, 1, False, 99)
    r = Reassembler()
    out = _feed_all(r, [packets[0], packets[1], dup, *packets[2:]])
    assert out == [payload]
    late = r.feed(Packet(packets[2].topic, packets[2].payload, 1, False, 100))
    assert late.message is None
    assert [d.ack_ids for d in late.dropped] == [(100,)]  # acked now, nothing delivered


def test_redelivered_packet_of_a_delivered_message_is_not_acked_twice() -> None:
    """After a reconnect the broker redelivers unacked packets with their ids; the owner's ack
    of the message covers them, so the reassembler must not acknowledge them itself."""
    packets = _packets(b"w" * 9000)
    r = Reassembler()
    assert len(_feed_all(r, packets)) == 1
    again = r.feed(packets[1])
    assert again.message is None and again.dropped[0].ack_ids == ()


def test_a_corrupted_chunk_fails_the_sha256_and_is_dropped_and_acked() -> None:
    """A bad chunk set must never reach the application, and its packets must be acked, or
    the broker would redeliver them forever."""
    payload = b"a" * 9000
    packets = _packets(payload)
    body = envelope.decode(packets[2].payload).body
    assert isinstance(body, Chunk)
    flipped = bytes([body.data[0] ^ 1]) + body.data[1:]
    bad = envelope.encode(Envelope(body=Chunk(body.sha256, body.index, flipped)))
    packets[2] = Packet(packets[2].topic, bad, 1, False, packets[2].mid)
    r = Reassembler()
    feeds = [r.feed(p) for p in packets]
    assert all(f.message is None for f in feeds)
    dropped = [d for f in feeds for d in f.dropped]
    assert len(dropped) == 1
    assert isinstance(dropped[0].error, ChunkError) and "SHA-256" in str(dropped[0].error)
    assert sorted(dropped[0].ack_ids) == [p.mid for p in packets]


def test_a_chunk_of_the_wrong_size_is_rejected() -> None:
    packets = _packets(b"b" * 9000)
    body = envelope.decode(packets[1].payload).body
    assert isinstance(body, Chunk)
    short = envelope.encode(Envelope(body=Chunk(body.sha256, body.index, body.data[:-1])))
    r = Reassembler()
    r.feed(packets[0])
    feed = r.feed(Packet(packets[1].topic, short, 1, False, 7))
    assert feed.dropped and "expected" in str(feed.dropped[0].error)
    assert sorted(feed.dropped[0].ack_ids) == [packets[0].mid, 7]


def test_a_chunk_whose_index_disagrees_with_its_topic_is_rejected() -> None:
    """A chunk claiming another position than its topic says is forged or broken."""
    packets = _packets(b"c" * 9000)
    moved = Packet(f"{TOPIC}/5", packets[1].payload, 1, False, 8)
    feed = Reassembler().feed(moved)
    assert feed.dropped and feed.dropped[0].ack_ids == (8,)


@pytest.mark.parametrize(
    "manifest",
    [
        ChunkManifest(b"\x00" * 32, total_bytes=10, chunk_count=1, chunk_bytes=5),
        ChunkManifest(b"\x00" * 32, total_bytes=10, chunk_count=4, chunk_bytes=5),
        ChunkManifest(b"\x00" * 32, total_bytes=0, chunk_count=0, chunk_bytes=5),
        ChunkManifest(b"\x00" * 32, total_bytes=10**9, chunk_count=1000, chunk_bytes=10**6),
    ],
)
def test_inconsistent_or_oversized_manifests_are_rejected(manifest: ChunkManifest) -> None:
    """A manifest is a promise about memory to come; a lying or huge one is refused up front."""
    packet = Packet(TOPIC, envelope.encode(Envelope(body=manifest)), 1, False, 3)
    r = Reassembler(ReassemblyLimits(max_pending_bytes=10**6))
    feed = r.feed(packet)
    assert feed.message is None
    assert isinstance(feed.dropped[0].error, ChunkError) and feed.dropped[0].ack_ids == (3,)
    assert r.pending_sets == 0


def test_memory_is_bounded_by_evicting_the_oldest_set() -> None:
    """Devices that send half an update and vanish must not exhaust the fleet manager's memory;
    the oldest incomplete set goes first and its packets are acked."""
    a = _packets(b"1" * 9000)
    b = [
        Packet(p.topic.replace("/d1/", "/d2/"), p.payload, 1, False, p.mid + 50)
        for p in _packets(b"2" * 9000)
    ]
    r = Reassembler(ReassemblyLimits(max_pending_bytes=10_000))
    r.feed(a[1])
    r.feed(a[2])  # ~8 KB of a pending
    feed = r.feed(b[1])  # pushes the total over 10 KB
    assert [d.reason for d in feed.dropped] == ["evicted"]
    assert feed.dropped[0].ack_ids == (a[1].mid, a[2].mid)
    assert r.pending_bytes <= 10_000
    assert _feed_all(r, [b[0], *b[2:]]) == [b"2" * 9000]


def test_incomplete_sets_expire_after_max_age() -> None:
    clock = FakeClock()
    packets = _packets(b"e" * 9000)
    r = Reassembler(ReassemblyLimits(max_age_s=60), clock=clock)
    r.feed(packets[0])
    clock.now += 30
    assert r.expire() == ()
    clock.now += 31
    dropped = r.expire()
    assert [d.reason for d in dropped] == ["expired"]
    assert "0 of 3 chunks" in str(dropped[0].error)
    assert r.pending_sets == 0


def test_receiver_acknowledges_dropped_packets_and_returns_whole_messages() -> None:
    """The shared receive path: callbacks only put, ``get`` reassembles and acks drops."""
    acked: list[tuple[int, ...]] = []
    rx = Receiver(acked.append)
    rx.watch(TOPIC)
    for p in _packets(b"r" * 9000):
        rx.put(p)
    rx.put(Packet(f"{TOPIC}/0", b"", 1, True, 42))  # a stale retained chunk being cleared
    rx.put(Packet("x/y", b"plain", 1, False, 43))
    message = rx.get(timeout_s=1)
    assert message is not None and message.payload == b"r" * 9000
    plain = rx.get(timeout_s=1)
    assert plain is not None and plain.payload == b"plain" and plain.ack_ids == (43,)
    assert acked == [(42,)]
    assert rx.get(timeout_s=0) is None

"""Payloads larger than the broker's maximum packet size: splitting and reassembly.

paho-mqtt does not honour the Maximum-Packet-Size a broker announces in its CONNACK: an oversized
PUBLISH gets the client disconnected ("Packet too large"), and paho reconnects and re-sends it,
forever (DESIGN section 11). So the sender computes the size of every PUBLISH packet itself and,
when a payload would not fit, publishes

- ``Envelope(ChunkManifest(sha256, total_bytes, chunk_count, chunk_bytes))`` on the topic, then
- ``Envelope(Chunk(sha256, i, data_i))`` on ``{topic}/{i}`` for ``i`` in ``0..chunk_count-1``,

every chunk but the last carrying exactly ``chunk_bytes`` bytes. The receiver's ``Reassembler``
collects them per ``(topic, sha256)`` in any order, ignores duplicates, verifies sizes and the
SHA-256, and yields one ``Message`` whose ``ack_ids`` are every underlying packet's id, so a
manual acknowledgement covers the whole payload. Payloads that fit are sent unchanged.

Memory is bounded: at most ``max_pending_bytes`` of chunk data is held; beyond that, and for sets
older than ``max_age_s``, the oldest incomplete set is dropped (logged, its packets acknowledged,
since the broker would otherwise redeliver them forever).

Sizes are bytes; times are seconds.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from device.errors import ChunkError, DecodeError
from device.wire import envelope
from device.wire.messages import Chunk, ChunkManifest, Envelope
from device.wire.topics import (
    MAX_CHUNK_INDEX,
    chunk_filter,
    chunk_topic,
    split_chunk_topic,
    split_shared,
    topic_matches,
)
from device.wire.transport import Message

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_CHUNK_BYTES = 4 * MIB
"""Largest chunk payload the sender makes, whatever the broker allows."""

MQTT_MAX_REMAINING_LENGTH = 268_435_455
PROTOCOL_MAX_PACKET_BYTES = 1 + 4 + MQTT_MAX_REMAINING_LENGTH
"""The largest PUBLISH packet MQTT can express (fixed header plus 4-byte remaining length)."""

SAFETY_MARGIN_BYTES = 32
"""Slack kept under the broker's limit on every packet, against off-by-a-few mistakes."""

SHA256_BYTES = 32

ChunkKind = Literal["manifest", "chunk"]


# -- sizes ------------------------------------------------------------------------------------


def varint_size(value: int) -> int:
    """Bytes of ``value`` as an MQTT variable byte integer / protobuf varint (7 bits a byte)."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload_bytes: int, qos: int, properties_bytes: int = 0) -> int:
    """Exact size in bytes of an MQTT 5 PUBLISH packet as paho builds it.

    Fixed header (1 byte plus the remaining length, 1..4 bytes), topic (2-byte length plus UTF-8),
    packet id (2 bytes when ``qos`` > 0), properties (length varint plus ``properties_bytes``;
    paho sends an empty property list as one zero byte), payload.
    """
    remaining = (
        2
        + len(topic.encode("utf-8"))
        + (2 if qos > 0 else 0)
        + varint_size(properties_bytes)
        + properties_bytes
        + payload_bytes
    )
    return 1 + varint_size(remaining) + remaining


def fits(topic: str, payload_bytes: int, qos: int, max_packet_bytes: int) -> bool:
    """Whether a PUBLISH of ``payload_bytes`` on ``topic`` stays under the limit with margin."""
    return publish_packet_size(topic, payload_bytes, qos) + SAFETY_MARGIN_BYTES <= max_packet_bytes


def chunk_data_bytes(topic: str, qos: int, max_packet_bytes: int, max_chunk_bytes: int) -> int:
    """The chunk size for payloads published on ``topic``: the most data per chunk such that
    every chunk packet (longest possible chunk topic, envelope overhead, margin) fits, capped at
    ``max_chunk_bytes``. Raises ``ValueError`` when the limit leaves no room for data."""
    longest_topic = chunk_topic(topic, MAX_CHUNK_INDEX)
    probe = envelope.encode(
        Envelope(body=Chunk(sha256=b"\xff" * SHA256_BYTES, index=MAX_CHUNK_INDEX, data=b""))
    )
    # proto3 omits empty ``data``: add its tag (1) and length (<= 5), plus the growth (<= 4) of
    # the envelope's length prefix of the Chunk field once data is present.
    envelope_overhead = len(probe) + 1 + 5 + 4
    header = publish_packet_size(longest_topic, 0, qos) + 4  # remaining length may grow to 4
    room = max_packet_bytes - header - envelope_overhead - SAFETY_MARGIN_BYTES
    size = min(max_chunk_bytes, room)
    if size < 1:
        raise ValueError(
            f"broker maximum packet size {max_packet_bytes} B leaves no room for chunk data on "
            f"{topic!r} (needs more than {max_packet_bytes - room} B of headers)"
        )
    return size


# -- sending ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutPacket:
    """One PUBLISH the sender makes."""

    topic: str
    payload: bytes
    retain: bool


def plan_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    max_packet_bytes: int,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, Iterator[OutPacket]]:
    """``(chunk_count, packets)`` for publishing ``payload`` on ``topic`` under the limit.

    ``chunk_count`` is 0 when the payload fits in one packet and is sent as-is. Otherwise the
    packets are the manifest (on ``topic``) and then the chunks in index order; they are built
    lazily so that at most one chunk copy exists at a time. Chunks are retained only when the
    caller asked for ``retain`` (the model topic; never update topics).
    """
    limit = min(max_packet_bytes, PROTOCOL_MAX_PACKET_BYTES)
    if fits(topic, len(payload), qos, limit):
        return 0, iter([OutPacket(topic, payload, retain)])
    size = chunk_data_bytes(topic, qos, limit, max_chunk_bytes)
    count = -(-len(payload) // size)
    if count - 1 > MAX_CHUNK_INDEX:
        raise ValueError(f"payload of {len(payload)} B needs {count} chunks; too many")
    digest = hashlib.sha256(payload).digest()
    manifest = envelope.encode(
        Envelope(
            body=ChunkManifest(
                sha256=digest, total_bytes=len(payload), chunk_count=count, chunk_bytes=size
            )
        )
    )
    if not fits(topic, len(manifest), qos, limit):
        raise ValueError(
            f"broker maximum packet size {limit} B cannot carry a manifest on {topic!r}"
        )

    def packets() -> Iterator[OutPacket]:
        yield OutPacket(topic, manifest, retain)
        view = memoryview(payload)
        for i in range(count):
            data = bytes(view[i * size : (i + 1) * size])
            body = envelope.encode(Envelope(body=Chunk(sha256=digest, index=i, data=data)))
            yield OutPacket(chunk_topic(topic, i), body, retain)

    return count, packets()


# -- recognising chunk envelopes cheaply ------------------------------------------------------


def peek_chunk_kind(payload: bytes) -> ChunkKind | None:
    """``"manifest"`` or ``"chunk"`` when ``payload`` is an Envelope of that kind, else ``None``.

    Uses ``envelope.peek``, which skips over every top-level field's contents, so a 100 MB
    update costs a handful of varint reads, not a decode. A payload that is not a well-formed
    envelope is ``None``: it is passed on whole and the application's decoder reports it.
    """
    try:
        kind = envelope.peek(payload).kind
    except DecodeError:
        return None
    if kind == "chunk_manifest":
        return "manifest"
    if kind == "chunk":
        return "chunk"
    return None


# -- reassembly -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """One received PUBLISH, detached from the client library. ``mid`` is its packet id (0 for
    QoS 0, which needs no acknowledgement)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0


@dataclass(frozen=True)
class Dropped:
    """Packets the reassembler gave up on; they must still be acknowledged (``ack_ids``).

    ``reason``: ``"bad_chunk"``, ``"evicted"``, ``"expired"`` or ``"duplicate"`` (a packet of a
    payload already delivered). ``error`` says what was wrong (``None`` for duplicates).
    """

    topic: str
    reason: str
    ack_ids: tuple[int, ...]
    error: ChunkError | None = None


@dataclass(frozen=True)
class Feed:
    """What one packet produced: at most one whole message, and any sets dropped."""

    message: Message | None = None
    dropped: tuple[Dropped, ...] = ()


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds of the reassembler. ``max_pending_bytes`` caps chunk data held for incomplete
    payloads (and so the largest payload accepted); ``max_age_s`` is how long an incomplete set
    may wait for its last chunk; payloads delivered within ``completed_ttl_s`` are remembered
    (at most ``max_completed``) so that late duplicates of their packets are ignored."""

    max_pending_bytes: int = 512 * MIB
    max_age_s: float = 600.0
    completed_ttl_s: float = 600.0
    max_completed: int = 4096
    deliver_shared_chunks: bool = False
    """Hand chunk and manifest packets that match a shared subscription (``$share/...``) on
    unassembled, one ``Message`` each with its own packet id: the broker spreads one payload's
    packets over the group's members, so a member cannot reassemble alone. For a consumer that
    reassembles elsewhere (the sharded aggregator does it through its store)."""


@dataclass
class _Set:
    topic: str
    sha256: bytes
    started_s: float
    manifest: ChunkManifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    mids: dict[int, None] = field(default_factory=dict)  # ordered set of packet ids
    nbytes: int = 0
    qos: int = 0
    retain: bool = False

    def add_mid(self, packet: Packet) -> None:
        if packet.qos > 0:
            self.mids[packet.mid] = None


class Reassembler:
    """Collects chunk sets keyed by ``(base topic, sha256)``; not thread-safe (one consumer)."""

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        self._pending: OrderedDict[tuple[str, bytes], _Set] = OrderedDict()  # oldest first
        self._completed: OrderedDict[tuple[str, bytes], tuple[float, frozenset[int]]] = (
            OrderedDict()
        )
        self.pending_bytes = 0
        self.completed_count = 0
        self.dropped_count = 0

    @property
    def pending_sets(self) -> int:
        return len(self._pending)

    def feed(self, packet: Packet) -> Feed:
        """Take one packet. Non-chunk packets come back at once as a ``Message``; chunk packets
        are held until their set is complete."""
        kind = peek_chunk_kind(packet.payload)
        if kind is None:
            return Feed(message=_whole(packet))
        try:
            env = envelope.decode(packet.payload)
        except DecodeError as exc:
            return Feed(dropped=(self._drop_packet(packet, f"undecodable {kind}: {exc}"),))
        body = env.body
        if isinstance(body, ChunkManifest):
            return self._feed_manifest(packet, body)
        if isinstance(body, Chunk):
            return self._feed_chunk(packet, body)
        return Feed(message=_whole(packet))  # the peek was fooled; let the application decide

    def expire(self) -> tuple[Dropped, ...]:
        """Drop incomplete sets older than ``max_age_s``; forget old completed payloads."""
        now = self._clock()
        dropped = []
        for key, s in list(self._pending.items()):
            if now - s.started_s > self.limits.max_age_s:
                have = len(s.chunks)
                want = s.manifest.chunk_count if s.manifest else "?"
                dropped.append(
                    self._drop_set(
                        key,
                        "expired",
                        f"incomplete chunked payload on {s.topic!r}: {have} of {want} chunks "
                        f"after {now - s.started_s:.0f} s",
                    )
                )
        while self._completed:
            key, (expires_s, _) = next(iter(self._completed.items()))
            if expires_s > now and len(self._completed) <= self.limits.max_completed:
                break
            self._completed.popitem(last=False)
        return tuple(dropped)

    # -- internals ----------------------------------------------------------------------------

    def _feed_manifest(self, packet: Packet, manifest: ChunkManifest) -> Feed:
        topic = packet.topic
        problem = _manifest_problem(manifest, self.limits.max_pending_bytes)
        if problem is not None:
            key = (topic, bytes(manifest.sha256))
            dropped = [self._drop_packet(packet, f"bad manifest on {topic!r}: {problem}")]
            if key in self._pending:
                dropped.append(self._drop_set(key, "bad_chunk", f"bad manifest: {problem}"))
            return Feed(dropped=tuple(dropped))
        key = (topic, bytes(manifest.sha256))
        duplicate = self._duplicate(key, packet)
        if duplicate is not None:
            return Feed(dropped=(duplicate,))
        s = self._set(key)
        s.add_mid(packet)
        if s.manifest is not None and s.manifest != manifest:
            return Feed(dropped=(self._drop_set(key, "bad_chunk", "two different manifests"),))
        s.manifest = manifest
        s.qos, s.retain = packet.qos, packet.retain
        for index, data in s.chunks.items():
            problem = _chunk_problem(manifest, index, len(data))
            if problem is not None:
                return Feed(dropped=(self._drop_set(key, "bad_chunk", problem),))
        return self._maybe_complete(key, s)

    def _feed_chunk(self, packet: Packet, chunk: Chunk) -> Feed:
        split = split_chunk_topic(packet.topic)
        if split is None:
            reason = f"chunk on {packet.topic!r}, which is not a chunk topic"
            return Feed(dropped=(self._drop_packet(packet, reason),))
        base, index = split
        if len(chunk.sha256) != SHA256_BYTES:
            return Feed(dropped=(self._drop_packet(packet, f"chunk sha256 on {packet.topic!r}"),))
        key = (base, bytes(chunk.sha256))
        if chunk.index != index:
            dropped = [self._drop_packet(packet, f"chunk {chunk.index} on {packet.topic!r}")]
            if key in self._pending:
                dropped.append(self._drop_set(key, "bad_chunk", "chunk index differs from topic"))
            return Feed(dropped=tuple(dropped))
        duplicate = self._duplicate(key, packet)
        if duplicate is not None:
            return Feed(dropped=(duplicate,))
        s = self._set(key)
        s.add_mid(packet)
        data = bytes(chunk.data)
        if s.manifest is not None:
            problem = _chunk_problem(s.manifest, index, len(data))
            if problem is not None:
                return Feed(dropped=(self._drop_set(key, "bad_chunk", problem),))
        elif len(data) > self.limits.max_pending_bytes:
            return Feed(dropped=(self._drop_set(key, "bad_chunk", "chunk larger than limit"),))
        held = s.chunks.get(index)
        if held is not None:
            if held != data:
                reason = f"chunk {index} arrived twice with different data"
                return Feed(dropped=(self._drop_set(key, "bad_chunk", reason),))
            return Feed()  # a duplicate: its packet id is acknowledged with the message
        s.chunks[index] = data
        s.nbytes += len(data)
        self.pending_bytes += len(data)
        evicted = self._enforce_budget()
        if key not in self._pending:  # this set itself was evicted
            return Feed(dropped=evicted)
        result = self._maybe_complete(key, s)
        return Feed(result.message, evicted + result.dropped)

    def _set(self, key: tuple[str, bytes]) -> _Set:
        s = self._pending.get(key)
        if s is None:
            s = _Set(topic=key[0], sha256=key[1], started_s=self._clock())
            self._pending[key] = s
        return s

    def _duplicate(self, key: tuple[str, bytes], packet: Packet) -> Dropped | None:
        """A packet of a payload delivered recently: acknowledge it now unless it is a
        redelivery of a packet the delivered message's own acknowledgement will cover."""
        done = self._completed.get(key)
        if done is None:
            return None
        _, delivered_mids = done
        covered = packet.qos == 0 or packet.mid in delivered_mids
        return Dropped(packet.topic, "duplicate", () if covered else (packet.mid,))

    def _maybe_complete(self, key: tuple[str, bytes], s: _Set) -> Feed:
        manifest = s.manifest
        if manifest is None or len(s.chunks) < manifest.chunk_count:
            return Feed()
        payload = b"".join(s.chunks[i] for i in range(manifest.chunk_count))
        if len(payload) != manifest.total_bytes:  # sizes are checked per chunk; belt and braces
            return Feed(dropped=(self._drop_set(key, "bad_chunk", "total size mismatch"),))
        if hashlib.sha256(payload).digest() != s.sha256:
            reason = "SHA-256 of the reassembled payload does not match"
            return Feed(dropped=(self._drop_set(key, "bad_chunk", reason),))
        del self._pending[key]
        self.pending_bytes -= s.nbytes
        mids = tuple(s.mids)
        self._completed[key] = (self._clock() + self.limits.completed_ttl_s, frozenset(mids))
        self._completed.move_to_end(key)
        while len(self._completed) > self.limits.max_completed:
            self._completed.popitem(last=False)
        self.completed_count += 1
        return Feed(message=Message(s.topic, payload, s.qos, s.retain, mids))

    def _enforce_budget(self) -> tuple[Dropped, ...]:
        dropped = []
        while self.pending_bytes > self.limits.max_pending_bytes and self._pending:
            key = next(iter(self._pending))
            why = f"chunk buffer over {self.limits.max_pending_bytes} B; oldest set dropped"
            dropped.append(self._drop_set(key, "evicted", why))
        return tuple(dropped)

    def _drop_set(self, key: tuple[str, bytes], reason: str, why: str) -> Dropped:
        s = self._pending.pop(key)
        self.pending_bytes -= s.nbytes
        self.dropped_count += 1
        error = ChunkError(
            f"chunked payload {s.sha256.hex()[:16]} on {s.topic!r} dropped: {why}",
            reason="bad_chunk" if reason == "bad_chunk" else "chunk_" + reason,
        )
        return Dropped(s.topic, reason, tuple(s.mids), error)

    def _drop_packet(self, packet: Packet, why: str) -> Dropped:
        self.dropped_count += 1
        ids = (packet.mid,) if packet.qos > 0 else ()
        return Dropped(packet.topic, "bad_chunk", ids, ChunkError(why, reason="bad_chunk"))


def _whole(packet: Packet) -> Message:
    ids = (packet.mid,) if packet.qos > 0 else ()
    return Message(packet.topic, packet.payload, packet.qos, packet.retain, ids)


def _manifest_problem(m: ChunkManifest, max_bytes: int) -> str | None:
    if len(m.sha256) != SHA256_BYTES:
        return f"sha256 has {len(m.sha256)} bytes, expected {SHA256_BYTES}"
    if m.chunk_count < 1 or m.chunk_bytes < 1:
        return f"chunk_count {m.chunk_count} and chunk_bytes {m.chunk_bytes} must be >= 1"
    if not (m.chunk_count - 1) * m.chunk_bytes < m.total_bytes <= m.chunk_count * m.chunk_bytes:
        return (
            f"total_bytes {m.total_bytes} does not fit {m.chunk_count} chunks of {m.chunk_bytes} B"
        )
    if m.total_bytes > max_bytes:
        return f"payload of {m.total_bytes} B exceeds the reassembly limit of {max_bytes} B"
    return None


def _chunk_problem(m: ChunkManifest, index: int, size: int) -> str | None:
    if index >= m.chunk_count:
        return f"chunk index {index} beyond chunk_count {m.chunk_count}"
    last = index == m.chunk_count - 1
    expected = m.total_bytes - (m.chunk_count - 1) * m.chunk_bytes if last else m.chunk_bytes
    if size != expected:
        return f"chunk {index} has {size} B, expected {expected} B"
    return None


# -- the receiving side shared by both transports ---------------------------------------------


AckFn = Callable[[tuple[int, ...]], None]


class Receiver:
    """Raw packets in (from a network callback), whole messages out (to the owner's worker).

    ``put`` only enqueues, so it is safe in a client callback. ``get`` runs reassembly on the
    caller's thread, acknowledges (through ``ack``) the packets of dropped chunk sets, and
    logs why they were dropped.
    """

    def __init__(self, ack: AckFn, limits: ReassemblyLimits | None = None, name: str = "") -> None:
        self._ack = ack
        self._name = name
        self._raw: queue.Queue[Packet] = queue.Queue()
        self._lock = threading.Lock()
        self.reassembler = Reassembler(limits)
        self._chunk_filters: dict[str, str] = {}  # chunk filter -> the pattern it serves
        self._shared_filters: set[str] = set()  # filters of $share subscriptions, when passed on

    def put(self, packet: Packet) -> None:
        self._raw.put(packet)

    def watch(self, pattern: str) -> str | None:
        """Note a subscription; return the chunk filter to subscribe to as well (or ``None``)."""
        group, plain = split_shared(pattern)
        if group is not None and self.reassembler.limits.deliver_shared_chunks:
            with self._lock:
                self._shared_filters.add(plain)
        extra = chunk_filter(pattern)
        if extra is not None:
            with self._lock:
                self._chunk_filters[extra] = pattern
        return extra

    @property
    def backlog(self) -> int:
        """Raw packets received and not yet processed."""
        return self._raw.qsize()

    def get(self, timeout_s: float | None = None) -> Message | None:
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                packet = (
                    self._raw.get_nowait() if remaining == 0.0 else self._raw.get(timeout=remaining)
                )
            except queue.Empty:
                with self._lock:
                    self._report(self.reassembler.expire())
                return None
            with self._lock:
                if self._is_cleared_chunk(packet):
                    self._ack((packet.mid,) if packet.qos > 0 else ())
                    continue
                if self._is_shared_chunk(packet):
                    return _whole(packet)
                feed = self.reassembler.feed(packet)
                self._report(feed.dropped + self.reassembler.expire())
            if feed.message is not None:
                return feed.message

    def _is_shared_chunk(self, packet: Packet) -> bool:
        """A chunk or manifest to pass on unassembled (``deliver_shared_chunks``)."""
        if not self._shared_filters:
            return False
        topics = (packet.topic, _chunk_base(packet.topic))
        if not any(topic_matches(f, t) for f in self._shared_filters for t in topics if t):
            return False
        return peek_chunk_kind(packet.payload) is not None

    def _is_cleared_chunk(self, packet: Packet) -> bool:
        """An empty payload on a chunk topic that reached us only through an added chunk
        filter: the sender clearing a stale retained chunk, not a message for the owner."""
        if packet.payload:
            return False
        split = split_chunk_topic(packet.topic)
        if split is None:
            return False
        return any(
            topic_matches(extra, packet.topic) and not topic_matches(pattern, packet.topic)
            for extra, pattern in self._chunk_filters.items()
        )

    def _report(self, dropped: tuple[Dropped, ...]) -> None:
        for d in dropped:
            if d.error is not None:
                log.warning("%s: %s", self._name, d.error)
            else:
                log.debug("%s: duplicate chunk packet on %s ignored", self._name, d.topic)
            if d.ack_ids:
                self._ack(d.ack_ids)


def _chunk_base(topic: str) -> str | None:
    """The base topic of a chunk topic ``{base}/{i}`` (``None`` for other topics)."""
    split = split_chunk_topic(topic)
    return None if split is None else split[0]

"""The in-memory twin of the MQTT transport (DESIGN section 10, rule 2).

``MemoryBroker`` models the parts of an MQTT 5 broker the protocol relies on, deterministically
and without a network:

- topic filters with ``+`` and ``#``, and ``$share/group/filter`` (each message to one member
  of the group, round-robin over the connected members in subscription order);
- retained messages (a retained empty payload clears the topic), sent to a new, non-shared
  subscription with ``retain`` set, only when the subscription is new (retain handling 1);
- persistent sessions: a client that connects with a session expiry keeps its subscriptions,
  and QoS 1 messages for it are queued while it is offline; unacknowledged messages of a
  manual-ack client are redelivered, with their packet ids, when it reconnects;
- the last will, published when a client disappears (``kill``), not on ``close``, and not
  when a new connection with its client id takes over and resumes its session (as mosquitto
  2.0.11 does);
- a maximum packet size: a client that publishes a larger packet is disconnected as mosquitto
  does, so a test proves that chunking keeps every packet under it.

``MemoryTransport`` implements ``Transport`` on top of it with the same chunking and reassembly
code as ``MqttTransport``. Delivery is synchronous under one broker lock, so the order of
messages is the order of ``publish`` calls. Session expiry is not timed: a persistent session
lives as long as the broker object.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from device.errors import BrokerUnavailableError
from device.wire.chunking import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_MAX_PACKET_BYTES,
    Packet,
    ReassemblyLimits,
    Receiver,
    plan_publish,
    publish_packet_size,
)
from device.wire.topics import (
    chunk_topic,
    split_shared,
    topic_matches,
    validate_filter,
    validate_topic_name,
)
from device.wire.transport import Message, Will

log = logging.getLogger(__name__)

_MAX_MID = 65535


@dataclass(frozen=True)
class _Delivery:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Session:
    client_id: str
    persistent: bool
    manual_ack: bool
    subs: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS, in order
    transport: MemoryTransport | None = None
    will: Will | None = None
    queued: deque[_Delivery] = field(default_factory=deque)
    inflight: OrderedDict[int, _Delivery] = field(default_factory=OrderedDict)
    last_mid: int = 0

    def next_mid(self) -> int:
        for _ in range(_MAX_MID):
            self.last_mid = self.last_mid % _MAX_MID + 1
            if self.last_mid not in self.inflight:
                return self.last_mid
        raise BrokerUnavailableError(f"client {self.client_id!r} has 65535 unacked messages")


class MemoryBroker:
    """An in-process MQTT 5 broker model; thread-safe.

    ``max_packet_size`` (bytes, whole PUBLISH packet) is announced to clients as mosquitto's
    ``max_packet_size`` is; ``None`` means MQTT's maximum. Set ``available`` to ``False`` to make
    new connections fail as if the broker were down.
    """

    def __init__(self, *, max_packet_size: int | None = None) -> None:
        self.max_packet_size = max_packet_size or PROTOCOL_MAX_PACKET_BYTES
        self.available = True
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Delivery] = {}
        self._share_cursor: dict[tuple[str, str], int] = {}
        self.packets_published = 0
        self.bytes_published = 0

    # -- inspection ---------------------------------------------------------------------------

    def retained(self, topic: str) -> bytes | None:
        """The retained payload of ``topic``, or ``None``."""
        with self._lock:
            held = self._retained.get(topic)
            return held.payload if held is not None else None

    def connected_clients(self) -> list[str]:
        with self._lock:
            return [cid for cid, s in self._sessions.items() if s.transport is not None]

    def queued(self, client_id: str) -> int:
        """Messages waiting in the offline session of ``client_id``."""
        with self._lock:
            session = self._sessions.get(client_id)
            return len(session.queued) if session else 0

    def unacked(self, client_id: str) -> int:
        """Messages delivered to a manual-ack client and not yet acknowledged."""
        with self._lock:
            session = self._sessions.get(client_id)
            return len(session.inflight) if session else 0

    def has_session(self, client_id: str) -> bool:
        with self._lock:
            return client_id in self._sessions

    def kick(self, client_id: str) -> None:
        """Drop a client's connection as a network failure would (its will is published)."""
        with self._lock:
            session = self._sessions.get(client_id)
            if session is not None and session.transport is not None:
                session.transport._lost()
                self._drop(session, abnormal=True)

    # -- the client side (MemoryTransport) ----------------------------------------------------

    def _connect(self, transport: MemoryTransport) -> bool:
        """Attach ``transport``; returns "session present". Redelivers the session's
        unacknowledged messages and then its queue."""
        with self._lock:
            if not self.available:
                raise BrokerUnavailableError(
                    f"in-memory broker unavailable: client {transport.client_id!r} not connected"
                )
            cid = transport.client_id
            old = self._sessions.get(cid)
            persistent = transport.session_expiry_s > 0
            if old is not None and old.transport is not None:  # session takeover
                old.transport._lost()
                # As measured on mosquitto 2.0.11: the will fires only if the session ends
                # (a clean start), not when the new connection resumes it.
                self._drop(old, abnormal=not persistent)
                old = self._sessions.get(cid)
            present = old is not None and persistent
            if old is None or not persistent:
                session = _Session(cid, persistent, transport.manual_ack)
                self._sessions[cid] = session
            else:
                session = old
                session.persistent = True
                session.manual_ack = transport.manual_ack
            session.transport = transport
            session.will = transport.will
            for mid, d in list(session.inflight.items()):
                transport._receive(Packet(d.topic, d.payload, d.qos, d.retain, mid))
                if not session.manual_ack:
                    del session.inflight[mid]
            while session.queued:
                self._deliver(session, session.queued.popleft())
            return present

    def _disconnect(self, transport: MemoryTransport, *, abnormal: bool) -> None:
        with self._lock:
            session = self._sessions.get(transport.client_id)
            if session is not None and session.transport is transport:
                self._drop(session, abnormal=abnormal)

    def _subscribe(self, transport: MemoryTransport, pattern: str, qos: int) -> None:
        with self._lock:
            session = self._attached(transport)
            is_new = pattern not in session.subs
            session.subs[pattern] = qos
            group, filt = split_shared(pattern)
            if not is_new or group is not None:
                return  # MQTT 5: no retained messages for shared subscriptions
            for topic, held in list(self._retained.items()):
                if topic_matches(filt, topic):
                    self._deliver(session, _Delivery(topic, held.payload, min(qos, held.qos), True))

    def _unsubscribe(self, transport: MemoryTransport, pattern: str) -> None:
        with self._lock:
            self._attached(transport).subs.pop(pattern, None)

    def _publish(
        self, transport: MemoryTransport, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        with self._lock:
            session = self._attached(transport)
            size = publish_packet_size(topic, len(payload), qos)
            if size > self.max_packet_size:
                transport._lost()
                self._drop(session, abnormal=True)
                raise BrokerUnavailableError(
                    f"in-memory broker disconnected {transport.client_id!r}: packet of {size} B "
                    f"on {topic!r} exceeds the maximum packet size of {self.max_packet_size} B"
                )
            self._route(topic, payload, qos, retain)

    def _ack(self, transport: MemoryTransport, mid: int) -> None:
        with self._lock:
            session = self._sessions.get(transport.client_id)
            # As over a network: an acknowledgement sent while disconnected is lost.
            if session is not None and session.transport is transport:
                session.inflight.pop(mid, None)

    # -- internals ----------------------------------------------------------------------------

    def _attached(self, transport: MemoryTransport) -> _Session:
        session = self._sessions.get(transport.client_id)
        if session is None or session.transport is not transport:
            raise BrokerUnavailableError(f"client {transport.client_id!r} is not connected")
        return session

    def _drop(self, session: _Session, *, abnormal: bool) -> None:
        will = session.will
        session.transport = None
        if not session.persistent:
            del self._sessions[session.client_id]
        if abnormal and will is not None:
            self._route(will.topic, will.payload, will.qos, will.retain)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.packets_published += 1
        self.bytes_published += len(payload)
        if retain:
            if payload:
                self._retained[topic] = _Delivery(topic, payload, qos, True)
            else:
                self._retained.pop(topic, None)
        groups: dict[tuple[str, str], list[tuple[_Session, int]]] = {}
        for session in list(self._sessions.values()):
            best = -1
            for pattern, sub_qos in session.subs.items():
                group, filt = split_shared(pattern)
                if not topic_matches(filt, topic):
                    continue
                if group is None:
                    best = max(best, sub_qos)
                else:
                    groups.setdefault((group, filt), []).append((session, sub_qos))
            if best >= 0:
                self._deliver(session, _Delivery(topic, payload, min(qos, best), False))
        for key, members in groups.items():
            online = [m for m in members if m[0].transport is not None]
            pool = online or [m for m in members if m[0].persistent]
            if not pool:
                continue
            cursor = self._share_cursor.get(key, 0)
            session, sub_qos = pool[cursor % len(pool)]
            self._share_cursor[key] = cursor + 1
            self._deliver(session, _Delivery(topic, payload, min(qos, sub_qos), False))

    def _deliver(self, session: _Session, d: _Delivery) -> None:
        transport = session.transport
        if transport is None:
            if session.persistent and d.qos > 0:
                session.queued.append(d)  # like mosquitto, QoS 0 is not queued offline
            return
        mid = 0
        if d.qos > 0:
            mid = session.next_mid()
            if session.manual_ack:
                session.inflight[mid] = d
        transport._receive(Packet(d.topic, d.payload, d.qos, d.retain, mid))


class MemoryTransport:
    """A ``Transport`` connected to a ``MemoryBroker``.

    ``max_packet_bytes`` lowers the packet limit below the broker's (to exercise chunking in
    tests); the effective limit is the smaller of the two, read at ``connect`` as a CONNACK
    would be. ``session_expiry_s`` 0 means a clean session.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        max_packet_bytes: int | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        session_expiry_s: int = 3600,
        will: Will | None = None,
        manual_ack: bool = False,
        reassembly: ReassemblyLimits | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.broker = broker
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self.manual_ack = manual_ack
        self.max_chunk_bytes = max_chunk_bytes
        self.will = will
        self._on_connect_hook: Callable[[], None] | None = None
        self._limit = max_packet_bytes
        self.max_packet_bytes = min(
            max_packet_bytes or PROTOCOL_MAX_PACKET_BYTES, broker.max_packet_size
        )
        self.session_present = False
        self.connect_count = 0
        self.bytes_sent = 0
        self.packets_sent = 0
        self.acked = 0
        self._connected = False
        self._lock = threading.Lock()
        self._subs: dict[str, int] = {}
        self._retained_chunks: dict[str, int] = {}
        self._receiver = Receiver(self._ack_ids, reassembly, name=client_id)

    @property
    def connected(self) -> bool:
        return self._connected

    def set_will(self, will: Will | None) -> None:
        self.will = will  # as in MQTT, the current connection keeps the will it connected with

    def set_on_connect(self, callback: Callable[[], None] | None) -> None:
        self._on_connect_hook = callback

    def connect(self, timeout_s: float = 10.0) -> None:
        if self._connected:
            return
        self.max_packet_bytes = min(
            self._limit or PROTOCOL_MAX_PACKET_BYTES, self.broker.max_packet_size
        )
        self.session_present = self.broker._connect(self)
        self._connected = True
        self.connect_count += 1
        with self._lock:
            subs = list(self._subs.items())
        for pattern, qos in subs:  # as MqttTransport does in every on_connect
            self.broker._subscribe(self, pattern, qos)
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def close(self) -> None:
        """Disconnect cleanly: the will is discarded; a persistent session stays."""
        if self._connected:
            self.broker._disconnect(self, abnormal=False)
            self._connected = False

    def kill(self) -> None:
        """Disappear without DISCONNECT, as a crash would: the broker publishes the will."""
        if self._connected:
            self.broker._disconnect(self, abnormal=True)
            self._connected = False

    def subscribe(self, pattern: str, qos: int = 1) -> None:
        validate_filter(pattern)
        if qos not in (0, 1):
            raise ValueError(f"QoS must be 0 or 1, got {qos!r}")
        extra = self._receiver.watch(pattern)
        filters = [pattern] + ([extra] if extra else [])
        with self._lock:
            for f in filters:
                self._subs[f] = qos
        if self._connected:
            for f in filters:
                self.broker._subscribe(self, f, qos)

    def unsubscribe(self, pattern: str) -> None:
        validate_filter(pattern)
        extra = self._receiver.watch(pattern)
        filters = [pattern] + ([extra] if extra else [])
        with self._lock:
            for f in filters:
                self._subs.pop(f, None)
        if self._connected:
            for f in filters:
                self.broker._unsubscribe(self, f)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> int:
        """Publish through the broker, chunking as ``MqttTransport`` does; delivery is
        synchronous, so ``wait`` and ``timeout_s`` change nothing."""
        validate_topic_name(topic)
        if qos not in (0, 1):
            raise ValueError(f"QoS must be 0 or 1, got {qos!r}")
        if not self._connected:
            raise BrokerUnavailableError(
                f"client {self.client_id!r} cannot publish on {topic!r}: not connected"
            )
        count, packets = plan_publish(
            topic,
            bytes(payload),
            qos=qos,
            retain=retain,
            max_packet_bytes=self.max_packet_bytes,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        sent = 0
        for packet in packets:
            self.broker._publish(self, packet.topic, packet.payload, qos, packet.retain)
            sent += len(packet.payload)
            self.packets_sent += 1
        if retain:
            previous = self._retained_chunks.get(topic, 0)
            for i in range(count, previous):
                self.broker._publish(self, chunk_topic(topic, i), b"", qos, True)
            self._retained_chunks[topic] = count
        self.bytes_sent += sent
        return sent

    def get(self, timeout_s: float | None = None) -> Message | None:
        return self._receiver.get(timeout_s)

    def ack(self, message: Message) -> None:
        self._ack_ids(message.ack_ids)

    # -- called by the broker (under its lock) ------------------------------------------------

    def _receive(self, packet: Packet) -> None:
        self._receiver.put(packet)

    def _lost(self) -> None:
        self._connected = False

    def _ack_ids(self, ids: tuple[int, ...]) -> None:
        self.acked += len(ids)
        if self.manual_ack:
            for mid in ids:
                self.broker._ack(self, mid)

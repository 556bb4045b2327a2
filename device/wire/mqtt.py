"""The MQTT transport: paho-mqtt 2.x, callback API version 2, MQTT 5.

What it does beyond a bare paho client, and why (DESIGN sections 4 and 11):

- **Persistent session.** ``clean_start=False`` with a Session-Expiry-Interval, so commands
  published while a device is briefly offline, and updates the fleet manager has not yet
  acknowledged, wait in the broker. Subscriptions are stored here and re-sent in every
  ``on_connect`` anyway (a broker restarted without persistence has forgotten them); they use
  retain handling "send retained only if the subscription is new", so re-subscribing into a
  surviving session does not deliver retained messages twice.
- **Callbacks only record and enqueue.** ``on_message`` puts the raw packet on a queue; chunk
  reassembly and everything else happen in ``get()`` on the owner's thread. No callback blocks
  or waits for a publish.
- **Never too large.** paho ignores the broker's Maximum-Packet-Size; an oversized PUBLISH gets
  the client disconnected and paho re-sends it after every reconnect, forever. ``publish`` reads
  the limit from the last CONNACK, computes each packet's exact size and chunks payloads that do
  not fit (``device.wire.chunking``).
- **Reconnect with exponential back-off and jitter.** paho's own loop reconnects, doubling the
  delay from a minimum up to a maximum (``reconnect_delay_set``). paho has no jitter, so the
  minimum is redrawn uniformly from ``[reconnect_min_s, 2 * reconnect_min_s)`` at start and after
  every successful connection: clients dropped together (a broker restart) start their back-off
  sequences at different offsets instead of reconnecting in lockstep.
- **Manual acknowledgement.** With ``manual_ack=True`` a QoS 1 message is acknowledged only when
  the owner calls ``ack(message)`` (after storing it durably); until then the broker redelivers
  it after a reconnect.

Only QoS 0 and 1 are supported (the protocol uses 1 everywhere).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from device.errors import BrokerUnavailableError
from device.wire.chunking import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_MAX_PACKET_BYTES,
    Packet,
    ReassemblyLimits,
    Receiver,
    plan_publish,
)
from device.wire.topics import chunk_topic, validate_filter, validate_topic_name
from device.wire.transport import Message, Will

log = logging.getLogger(__name__)

PACKET_TOO_LARGE = 149  # MQTT 5 reason code the broker disconnects an oversized publisher with
MAX_RECEIVE_MAXIMUM = 65535


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the broker connection: ``ca_file`` verifies the broker, ``cert_file`` and
    ``key_file`` are the client certificate (its CN is the device id). ``insecure`` skips the
    host-name check (test certificates only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (default 1883) or ``mqtts://host[:port]`` (default 8883).

    A bare ``host[:port]`` means ``mqtt://``. Raises ``ValueError`` naming the URL otherwise.
    """
    text = url if "://" in url else f"mqtt://{url}"
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    return BrokerAddress(parts.hostname, port, tls)


class MqttTransport:
    """A ``Transport`` over a real MQTT 5 broker for one client id.

    ``session_expiry_s`` 0 means a clean, non-persistent session. ``receive_maximum`` is how many
    unacknowledged QoS 1 messages the broker may have in flight to this client: it must exceed
    the chunks of any payload that is acknowledged as a whole (manual ack), or delivery stalls.
    ``publish_timeout_s`` bounds ``publish(wait=True)`` and the flush in ``close``.
    """

    def __init__(
        self,
        client_id: str,
        *,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        session_expiry_s: int = 3600,
        keepalive_s: int = 30,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        will: Will | None = None,
        manual_ack: bool = False,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        receive_maximum: int = 1024,
        publish_timeout_s: float = 60.0,
        reassembly: ReassemblyLimits | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(
                f"need 0 < reconnect_min_s <= reconnect_max_s, got {reconnect_min_s}, "
                f"{reconnect_max_s}"
            )
        if not 1 <= receive_maximum <= MAX_RECEIVE_MAXIMUM:
            raise ValueError(f"receive_maximum must be in 1..{MAX_RECEIVE_MAXIMUM}")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.max_chunk_bytes = max_chunk_bytes
        self.manual_ack = manual_ack
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.receive_maximum = receive_maximum
        self.publish_timeout_s = publish_timeout_s
        self._will = will
        self._rng = random.Random()

        # Connection state, written by callbacks (plain assignments only).
        self.max_packet_bytes = PROTOCOL_MAX_PACKET_BYTES
        """The broker's Maximum-Packet-Size from the last CONNACK (MQTT's maximum if none)."""
        self.session_present = False
        self.connect_count = 0
        self._on_connect_hook: Callable[[], None] | None = None
        self.disconnect_reasons: list[int] = []
        """Reason code of every lost connection (for tests and diagnostics)."""
        self._connected = False
        self._ever_connected = False
        self._closed = False
        self._connack_event = threading.Event()
        self._connack: ReasonCode | None = None
        self._connect_failures = 0
        self._disconnected_event = threading.Event()

        # PUBACK/SUBACK bookkeeping; see _register and _on_publish.
        self._acks = threading.Condition()
        self._done: dict[int, int] = {}  # packet id -> reason code, waiting to be collected
        self._forget: set[int] = set()  # packet ids nobody waits for
        self._inflight: set[int] = set()  # QoS 1 publishes not yet acknowledged

        self._subs_lock = threading.Lock()
        self._subs: dict[str, int] = {}  # every filter to (re)subscribe, chunk filters included
        self._retained_chunks: dict[str, int] = {}  # retained topic -> chunks last published

        self.bytes_sent = 0
        self.packets_sent = 0
        self.acked = 0

        self._receiver = Receiver(self._ack_ids, reassembly, name=client_id)
        self._client = self._make_client(username, password, tls)

    @classmethod
    def from_url(cls, url: str, client_id: str, **kwargs: Any) -> MqttTransport:
        """Build from ``mqtt://host:port`` / ``mqtts://host:port``; ``mqtts`` without ``tls``
        uses the system's CA certificates."""
        address = parse_broker_url(url)
        if address.tls and kwargs.get("tls") is None:
            kwargs["tls"] = TlsSettings()
        return cls(client_id, host=address.host, port=address.port, **kwargs)

    # -- Transport ------------------------------------------------------------------------------

    def set_will(self, will: Will | None) -> None:
        self._will = will
        if self._ever_connected:  # takes effect at the next automatic reconnect
            if will is None:
                self._client.will_clear()
            else:
                self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def set_on_connect(self, callback: Callable[[], None] | None) -> None:
        self._on_connect_hook = callback

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and wait for the CONNACK; raise ``BrokerUnavailableError`` naming host:port
        and the reason when the broker refuses or does not answer within ``timeout_s``."""
        if self._connected:
            return
        client = self._client
        if self._will is None:
            client.will_clear()
        else:
            client.will_set(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.session_expiry_s > 0:
            props.SessionExpiryInterval = int(self.session_expiry_s)
        props.ReceiveMaximum = self.receive_maximum
        self._connack_event.clear()
        self._connack = None
        self._connect_failures = 0
        self._closed = False
        self._draw_reconnect_delay()
        client.connect_async(
            self.host,
            self.port,
            keepalive=self.keepalive_s,
            clean_start=self.session_expiry_s <= 0,
            properties=props,
        )
        client.loop_start()
        where = f"MQTT broker at {self.host}:{self.port}"
        if not self._connack_event.wait(timeout_s):
            self._stop_network()
            why = (
                "TCP connection failed"
                if self._connect_failures
                else "no CONNACK (is it an MQTT 5 broker?)"
            )
            raise BrokerUnavailableError(
                f"{where} not reachable within {timeout_s:.1f} s for client "
                f"{self.client_id!r}: {why}"
            )
        reason = self._connack
        if reason is not None and reason.is_failure:
            self._stop_network()
            raise BrokerUnavailableError(
                f"{where} refused client {self.client_id!r}: {reason.getName()} ({reason.value})"
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` until every QoS 1 publish is acknowledged (paho's
        ``loop_stop`` would drop them), then disconnect cleanly, so the broker discards the
        will. Safe to call twice."""
        if self._closed:
            return
        limit = timeout_s
        deadline = time.monotonic() + limit
        with self._acks:
            while self._inflight and self._ever_connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "%s: closing with %d publishes unacknowledged",
                        self.client_id,
                        len(self._inflight),
                    )
                    break
                self._acks.wait(min(remaining, 0.1))
        self._closed = True
        self._stop_network()

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT and stop, as a crash or power loss would:
        the broker publishes the will. For tests and fault injection."""
        self._closed = True
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                cast(socket.socket, sock).shutdown(socket.SHUT_RDWR)
        self._client.loop_stop()
        self._connected = False

    def subscribe(self, pattern: str, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe (and remember it for every reconnect). When connected, waits for the SUBACK
        and raises ``BrokerUnavailableError`` if the broker refused; never call it from a
        callback. Also subscribes to ``pattern/+`` so chunked payloads arrive whole."""
        validate_filter(pattern)
        _check_qos(qos)
        extra = self._receiver.watch(pattern)
        filters = [pattern] + ([extra] if extra else [])
        with self._subs_lock:
            for f in filters:
                self._subs[f] = qos
        if not self._connected:
            return
        rc, mid = self._client.subscribe([(f, _subscribe_options(qos)) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected after all: on_connect subscribes
        self._register(mid, waiting=True)
        code = self._wait_one(mid, time.monotonic() + timeout_s)
        if code is None:
            log.warning("%s: no SUBACK for %r within %.1f s", self.client_id, pattern, timeout_s)
        elif code >= 0x80:
            raise BrokerUnavailableError(
                f"MQTT broker at {self.host}:{self.port} refused subscription {pattern!r} of "
                f"client {self.client_id!r}: reason {code}"
            )

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
        """Publish, chunking above the broker's limit; returns the payload bytes handed over.

        With ``wait`` and QoS 1, blocks until every packet is acknowledged (at most
        ``timeout_s``, default ``publish_timeout_s``) and raises ``BrokerUnavailableError`` on a
        timeout (the packets stay queued and are re-sent after a reconnect) or when the broker
        refuses one (e.g. "Not authorized", 135).
        """
        validate_topic_name(topic)
        _check_qos(qos)
        if not self._ever_connected or self._closed:
            raise BrokerUnavailableError(
                f"client {self.client_id!r} cannot publish on {topic!r}: not connected "
                "(call connect() first)"
            )
        count, packets = plan_publish(
            topic,
            bytes(payload),
            qos=qos,
            retain=retain,
            max_packet_bytes=self.max_packet_bytes,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        mids: list[int] = []
        sent = 0
        for packet in packets:
            sent += len(packet.payload)
            mid = self._send(packet.topic, packet.payload, qos, packet.retain, wait)
            if mid is not None:
                mids.append(mid)
        if retain:
            self._clear_stale_chunks(topic, count, qos)
        self.bytes_sent += sent
        if wait and qos > 0:
            limit = self.publish_timeout_s if timeout_s is None else timeout_s
            self._wait_published(topic, mids, time.monotonic() + limit)
        return sent

    def get(self, timeout_s: float | None = None) -> Message | None:
        return self._receiver.get(timeout_s)

    def ack(self, message: Message) -> None:
        """Acknowledge every packet of ``message`` (no-op unless ``manual_ack``)."""
        self._ack_ids(message.ack_ids)

    # -- introspection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the client is connected again (after a broker restart, say)."""
        deadline = time.monotonic() + timeout_s
        while not self._connected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._connected

    # -- internals ----------------------------------------------------------------------------

    def _make_client(
        self, username: str | None, password: str | None, tls: TlsSettings | None
    ) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        client.manual_ack_set(self.manual_ack)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
            if tls.insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _draw_reconnect_delay(self) -> None:
        low = self.reconnect_min_s * (1.0 + self._rng.random())
        # paho annotates the delays as int but only sleeps on them: fractions work.
        set_delay = cast(Any, self._client.reconnect_delay_set)
        set_delay(min_delay=min(low, self.reconnect_max_s), max_delay=self.reconnect_max_s)

    def _stop_network(self) -> None:
        client = self._client
        self._disconnected_event.clear()
        if client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._disconnected_event.wait(2.0)
        client.loop_stop()
        self._connected = False

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, wait: bool) -> int | None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerUnavailableError(f"paho's outgoing queue is full; {topic!r} not sent")
        self.packets_sent += 1
        if qos == 0:
            # paho reports QoS 0 packets as published once written; nobody waits for them.
            self._register(info.mid, waiting=False, tracked=False)
            return None
        # MQTT_ERR_NO_CONN is fine: paho keeps QoS 1 messages and sends them after reconnecting.
        self._register(info.mid, waiting=wait)
        return info.mid

    def _clear_stale_chunks(self, topic: str, count: int, qos: int) -> None:
        """Retained chunks of an earlier, longer payload on ``topic`` would be served to every
        new subscriber; clear them (empty retained payloads). Only what this process published
        is known."""
        previous = self._retained_chunks.get(topic, 0)
        for i in range(count, previous):
            self._send(chunk_topic(topic, i), b"", qos, True, False)
        self._retained_chunks[topic] = count

    def _register(self, mid: int, *, waiting: bool, tracked: bool = True) -> None:
        """Note a packet id just handed to paho (every one is registered, so that no result is
        left behind for a later packet with the same id).

        Its acknowledgement may already have arrived (the network thread is fast); it then sits
        in ``_done`` and belongs to this packet, because paho reuses a packet id only after the
        previous packet with that id was acknowledged. ``tracked`` packets count as in flight
        until acknowledged (``close`` waits for them).
        """
        with self._acks:
            if mid in self._done:
                if not waiting:
                    code = self._done.pop(mid)
                    self._log_refusal(mid, code)
                return
            if tracked:
                self._inflight.add(mid)
            if waiting:
                self._forget.discard(mid)  # left over from a lost packet with the same id
            else:
                self._forget.add(mid)

    def _wait_one(self, mid: int, deadline: float) -> int | None:
        with self._acks:
            while mid not in self._done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._forget.add(mid)
                    return None
                self._acks.wait(remaining)
            return self._done.pop(mid)

    def _wait_published(self, topic: str, mids: list[int], deadline: float) -> None:
        refused: list[int] = []
        missing = 0
        for mid in mids:
            code = self._wait_one(mid, deadline)
            if code is None:
                missing += 1
            elif code >= 0x80:
                refused.append(code)
        where = f"MQTT broker at {self.host}:{self.port}"
        if refused:
            name = _reason_name(PacketTypes.PUBACK, refused[0])
            raise BrokerUnavailableError(
                f"{where} refused {len(refused)} of {len(mids)} packets published on {topic!r} "
                f"by {self.client_id!r}: {name} ({refused[0]})"
            )
        if missing:
            raise BrokerUnavailableError(
                f"{where} acknowledged only {len(mids) - missing} of {len(mids)} packets on "
                f"{topic!r} in time; the rest stay queued and are re-sent after a reconnect"
            )

    def _log_refusal(self, mid: int, code: int) -> None:
        if code >= 0x80:
            log.warning(
                "%s: broker refused publish (packet %d): %s (%d)",
                self.client_id,
                mid,
                _reason_name(PacketTypes.PUBACK, code),
                code,
            )

    def _ack_ids(self, ids: tuple[int, ...]) -> None:
        if not ids:
            return
        self.acked += len(ids)
        if not self.manual_ack:
            return
        for mid in ids:
            self._client.ack(mid, 1)

    # -- paho callbacks (network thread: record and enqueue only) -----------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._connack = reason
            self._connack_event.set()
            return
        limit = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet_bytes = (
            min(int(limit), PROTOCOL_MAX_PACKET_BYTES) if limit else (PROTOCOL_MAX_PACKET_BYTES)
        )
        self.session_present = flags.session_present
        self.connect_count += 1
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        if receive_max is not None and receive_max < client.max_inflight_messages:
            # paho does not honour it either; exceeding it gets us disconnected.
            log.warning(
                "%s: broker accepts %d unacknowledged publishes, paho sends up to %d; "
                "raise max_inflight_messages on the broker",
                self.client_id,
                receive_max,
                client.max_inflight_messages,
            )
        if self._ever_connected and not flags.session_present and self.session_expiry_s > 0:
            log.info("%s: the broker had lost this client's session", self.client_id)
        with self._subs_lock:
            subs = list(self._subs.items())
        if subs:
            rc, mid = client.subscribe([(f, _subscribe_options(q)) for f, q in subs])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._acks:  # nobody waits for this SUBACK
                    self._forget.add(mid)
        self._draw_reconnect_delay()
        self._connected = True
        self._ever_connected = True
        hook = self._on_connect_hook
        if hook is not None:
            try:
                hook()
            except Exception:  # a hook must never break the network thread
                log.exception("%s: on-connect hook failed", self.client_id)
        self._connack = reason
        self._connack_event.set()

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        self._connect_failures += 1

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected
        self._connected = False
        self._disconnected_event.set()
        if self._closed:
            return
        if was_connected:
            self.disconnect_reasons.append(int(reason.value))
        if reason.value == PACKET_TOO_LARGE:
            log.error(
                "%s: disconnected for sending a packet over the broker's limit of %d B; "
                "this is a bug in the size check",
                self.client_id,
                self.max_packet_bytes,
            )
        elif was_connected:
            log.warning(
                "%s: connection to %s:%d lost (%s); reconnecting",
                self.client_id,
                self.host,
                self.port,
                reason.getName(),
            )

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            if self.manual_ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        self._receiver.put(Packet(topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid))

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._record(mid, int(reason.value))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._record(mid, max((int(r.value) for r in reasons), default=0))

    def _record(self, mid: int, code: int) -> None:
        with self._acks:
            self._inflight.discard(mid)
            if mid in self._forget:
                self._forget.discard(mid)
                self._log_refusal(mid, code)
            else:
                self._done[mid] = code
            self._acks.notify_all()


def _subscribe_options(qos: int) -> SubscribeOptions:
    # Retained messages only for a new subscription: re-subscribing after a reconnect into a
    # session that kept its subscriptions must not deliver every retained message again.
    return SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ValueError(f"QoS must be 0 or 1, got {qos!r}")


def _reason_name(packet_type: int, code: int) -> str:
    try:
        return ReasonCode(packet_type, identifier=code).getName()
    except Exception:  # unknown code: the number says enough
        return "unknown reason"

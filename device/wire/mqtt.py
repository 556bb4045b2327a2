"""The MQTT transport: paho-mqtt 2.x, callback API version 2, MQTT 5.

``MqttTransport`` is a ``MqttConnection`` (``device.wire.connection``: persistent session,
reconnect with jittered back-off, never sharing a client id) plus what the ``Transport``
interface adds on top, and why (DESIGN sections 4 and 11):

- **Subscriptions survive reconnects.** They are stored here and re-sent after every CONNACK
  (``_restore_session``); they use retain handling "send retained only if the subscription is
  new", so re-subscribing into a surviving session does not deliver retained messages twice.
- **Callbacks only record and enqueue.** ``on_message`` puts the raw packet on a queue; chunk
  reassembly and everything else happen in ``get()`` on the owner's thread. No callback blocks
  or waits for a publish.
- **Never too large.** paho ignores the broker's Maximum-Packet-Size; an oversized PUBLISH gets
  the client disconnected and paho re-sends it after every reconnect, forever. ``publish`` reads
  the limit from the last CONNACK, computes each packet's exact size and chunks payloads that do
  not fit (``device.wire.chunking``).
- **Manual acknowledgement.** With ``manual_ack=True`` a QoS 1 message is acknowledged only when
  the owner calls ``ack(message)`` (after storing it durably); until then the broker redelivers
  it after a reconnect.
- **A lost session is final.** Once another client took over this client id (``failure``),
  ``get``, ``publish`` and ``subscribe`` raise that ``SessionTakenOverError``.

Only QoS 0 and 1 are supported (the protocol uses 1 everywhere).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from device.errors import BrokerUnavailableError
from device.wire.acks import REFUSED, AckBook, reason_name
from device.wire.chunking import (
    DEFAULT_CHUNK_BYTES,
    Packet,
    ReassemblyLimits,
    Receiver,
    plan_publish,
)
from device.wire.connection import (
    MAX_RECEIVE_MAXIMUM,
    PACKET_TOO_LARGE,
    SESSION_TAKEN_OVER,
    MqttConnection,
)
from device.wire.endpoint import BrokerAddress, TlsSettings, parse_broker_url
from device.wire.topics import chunk_topic, validate_filter, validate_topic_name
from device.wire.transport import Message, Will

__all__ = [
    "MAX_RECEIVE_MAXIMUM",
    "PACKET_TOO_LARGE",
    "SESSION_TAKEN_OVER",
    "BrokerAddress",
    "MqttTransport",
    "TlsSettings",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

# How long one wait inside ``get`` lasts at most: a failure is noticed this fast (seconds).
_GET_SLICE_S = 0.5


class MqttTransport(MqttConnection):
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
        connect_timeout_s: float = 10.0,
    ) -> None:
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        self.max_chunk_bytes = max_chunk_bytes
        self.publish_timeout_s = publish_timeout_s
        self._acks = AckBook(client_id, gave_up=lambda: self._failure is not None)
        self._subs_lock = threading.Lock()
        self._subs: dict[str, int] = {}  # every filter to (re)subscribe, chunk filters included
        self._retained_chunks: dict[str, int] = {}  # retained topic -> chunks last published
        self.bytes_sent = 0
        self.packets_sent = 0
        self.acked = 0
        self._receiver = Receiver(self._ack_ids, reassembly, name=client_id)
        super().__init__(
            client_id,
            host=host,
            port=port,
            username=username,
            password=password,
            tls=tls,
            session_expiry_s=session_expiry_s,
            keepalive_s=keepalive_s,
            will=will,
            manual_ack=manual_ack,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            receive_maximum=receive_maximum,
            connect_timeout_s=connect_timeout_s,
        )
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    @classmethod
    def from_url(cls, url: str, client_id: str, **kwargs: Any) -> MqttTransport:
        """Build from ``mqtt://host:port`` / ``mqtts://host:port``; ``mqtts`` without ``tls``
        uses the system's CA certificates."""
        address = parse_broker_url(url)
        if address.tls and kwargs.get("tls") is None:
            kwargs["tls"] = TlsSettings()
        return cls(client_id, host=address.host, port=address.port, **kwargs)

    # -- Transport ------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` until every QoS 1 publish is acknowledged (paho's
        ``loop_stop`` would drop them), then disconnect cleanly, so the broker discards the
        will. Safe to call twice."""
        if self._closed:
            return
        if self._ever_connected and self._failure is None:
            left = self._acks.wait_inflight(timeout_s)
            if left:
                log.warning("%s: closing with %d publishes unacknowledged", self.client_id, left)
        self._closed = True
        self._stop_network()

    def subscribe(self, pattern: str, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe (and remember it for every reconnect). When connected, waits for the SUBACK
        and raises ``BrokerUnavailableError`` if the broker refused; never call it from a
        callback. Also subscribes to ``pattern/+`` so chunked payloads arrive whole."""
        validate_filter(pattern)
        _check_qos(qos)
        self._check_usable()
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
        self._acks.register(mid, waiting=True)
        code = self._acks.wait_one(mid, time.monotonic() + timeout_s)
        if code is None:
            log.warning("%s: no SUBACK for %r within %.1f s", self.client_id, pattern, timeout_s)
        elif code >= REFUSED:
            raise BrokerUnavailableError(
                f"MQTT broker at {self.host}:{self.port} refused subscription {pattern!r} of "
                f"client {self.client_id!r}: reason {code}"
            )

    def unsubscribe(self, pattern: str) -> None:
        """Forget ``pattern`` (and its chunk filter) and, when connected, send UNSUBSCRIBE
        without waiting: the broker handles it before any later SUBSCRIBE of this client."""
        validate_filter(pattern)
        self._check_usable()
        filters = [pattern] + ([extra] if (extra := self._receiver.watch(pattern)) else [])
        with self._subs_lock:
            for f in filters:
                self._subs.pop(f, None)
        if self._connected:
            self._client.unsubscribe(filters)

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
        self._check_usable()
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
        """The next whole message, or ``None`` after ``timeout_s`` (``None``: no limit).

        Raises the ``failure`` (``SessionTakenOverError``) once the connection gave up, within
        half a second even while waiting."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        while True:
            self._check_usable()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = _GET_SLICE_S if remaining is None else min(remaining, _GET_SLICE_S)
            message = self._receiver.get(step)
            if message is not None or (remaining is not None and remaining <= _GET_SLICE_S):
                return message

    def ack(self, message: Message) -> None:
        """Acknowledge every packet of ``message`` (no-op unless ``manual_ack``)."""
        self._ack_ids(message.ack_ids)

    # -- internals ----------------------------------------------------------------------------

    def _restore_session(self, client: paho.Client) -> None:
        with self._subs_lock:
            subs = list(self._subs.items())
        if subs:
            rc, mid = client.subscribe([(f, _subscribe_options(q)) for f, q in subs])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._acks.forget(mid)  # nobody waits for this SUBACK

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool, wait: bool) -> int | None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerUnavailableError(f"paho's outgoing queue is full; {topic!r} not sent")
        self.packets_sent += 1
        if qos == 0:
            # paho reports QoS 0 packets as published once written; nobody waits for them.
            self._acks.register(info.mid, waiting=False, tracked=False)
            return None
        # MQTT_ERR_NO_CONN is fine: paho keeps QoS 1 messages and sends them after reconnecting.
        self._acks.register(info.mid, waiting=wait)
        return info.mid

    def _clear_stale_chunks(self, topic: str, count: int, qos: int) -> None:
        """Retained chunks of an earlier, longer payload on ``topic`` would be served to every
        new subscriber; clear them (empty retained payloads). Only what this process published
        is known."""
        previous = self._retained_chunks.get(topic, 0)
        for i in range(count, previous):
            self._send(chunk_topic(topic, i), b"", qos, True, False)
        self._retained_chunks[topic] = count

    def _wait_published(self, topic: str, mids: list[int], deadline: float) -> None:
        refused, missing = self._acks.wait_all(mids, deadline)
        where = f"MQTT broker at {self.host}:{self.port}"
        if refused:
            name = reason_name(PacketTypes.PUBACK, refused[0])
            raise BrokerUnavailableError(
                f"{where} refused {len(refused)} of {len(mids)} packets published on {topic!r} "
                f"by {self.client_id!r}: {name} ({refused[0]})"
            )
        if missing:
            self._check_usable()  # no acknowledgement ever comes after a takeover: say why
            raise BrokerUnavailableError(
                f"{where} acknowledged only {len(mids) - missing} of {len(mids)} packets on "
                f"{topic!r} in time; the rest stay queued and are re-sent after a reconnect"
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
        self._acks.record(mid, int(reason.value))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._acks.record(mid, max((int(r.value) for r in reasons), default=0))


def _subscribe_options(qos: int) -> SubscribeOptions:
    # Retained messages only for a new subscription: re-subscribing after a reconnect into a
    # session that kept its subscriptions must not deliver every retained message again.
    return SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)


def _check_qos(qos: int) -> None:
    if qos not in (0, 1):
        raise ValueError(f"QoS must be 0 or 1, got {qos!r}")

"""The lifecycle of one MQTT 5 connection: connect, reconnect, and stop when its id is taken.

``MqttConnection`` owns the paho client (paho-mqtt 2.x, callback API version 2) and everything
about being connected; ``device.wire.mqtt.MqttTransport`` builds publishing, subscriptions and
receiving on top of it. What it does beyond a bare paho client, and why (DESIGN sections 4, 11):

- **Persistent session.** ``clean_start=False`` with a Session-Expiry-Interval, so commands
  published while a device is briefly offline, and updates the fleet manager has not yet
  acknowledged, wait in the broker. After every CONNACK the subclass re-sends its subscriptions
  (``_restore_session``): a broker restarted without persistence has forgotten them.
- **Reconnect with exponential back-off and jitter.** paho's own loop reconnects, doubling the
  delay from a minimum up to a maximum (``reconnect_delay_set``). paho has no jitter, so the
  minimum is redrawn uniformly from ``[reconnect_min_s, 2 * reconnect_min_s)`` at start and after
  every successful connection: clients dropped together (a broker restart) start their back-off
  sequences at different offsets instead of reconnecting in lockstep.
- **A client id is never shared.** When the broker disconnects this client because another one
  connected with the same client id, reconnecting would take the session back, the other client
  would do the same, and the two would steal each other's queued messages forever. So the
  connection stops for good and ``failure`` holds a ``SessionTakenOverError`` naming the client
  id; the subclass raises it from every later call. A broker that says so (MQTT 5 reason 142,
  "Session taken over") is believed at once. mosquitto 2.0.11 (Debian 12) only closes the old
  connection, so a fight is also recognised by its pattern: ``TAKEOVER_STRIKES`` connections in
  a row that the broker accepted at once and then closed, without a DISCONNECT packet, within
  ``TAKEOVER_WINDOW_S`` of accepting them. A broker restart does not look like that (the
  reconnect attempts fail until it is back, which resets the count), and a single takeover (a
  device restarted before the broker noticed its old connection die) is tolerated.
- **Callbacks only record.** The network thread sets flags and events; nobody waits in it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device.errors import BrokerUnavailableError, ConfigError, SessionTakenOverError
from device.wire.chunking import PROTOCOL_MAX_PACKET_BYTES
from device.wire.endpoint import TlsSettings
from device.wire.transport import Will

log = logging.getLogger(__name__)

PACKET_TOO_LARGE = 149  # MQTT 5 reason code the broker disconnects an oversized publisher with
SESSION_TAKEN_OVER = 142  # ... and the one it disconnects a client with when its id is reused
MAX_RECEIVE_MAXIMUM = 65535

TAKEOVER_WINDOW_S = 5.0
"""A connection the broker closes sooner than this (seconds after its CONNACK) counts as cut
short. In a fight each connection lasts one reconnect delay of the other client (paho resets
the delay after every CONNACK: ``[reconnect_min_s, 2 * reconnect_min_s)``, 0.5-1 s by default)."""

TAKEOVER_STRIKES = 3
"""Connections in a row cut short (with no failed attempt between them) that end the fight."""


class MqttConnection:
    """One client id's connection to an MQTT 5 broker (see the module docstring).

    ``session_expiry_s`` 0 means a clean, non-persistent session. ``receive_maximum`` is how many
    unacknowledged QoS 1 messages the broker may have in flight to this client. Reconnect delays
    are in seconds, ``0 < reconnect_min_s <= reconnect_max_s``; ``connect_timeout_s`` is how long
    ``connect()`` waits by default.
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
        will: Will | None = None,
        manual_ack: bool = False,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        receive_maximum: int = 1024,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
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
        self.manual_ack = manual_ack
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.receive_maximum = receive_maximum
        self.connect_timeout_s = connect_timeout_s
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
        self._failure: BrokerUnavailableError | None = None
        self._connack_event = threading.Event()
        self._connack: ReasonCode | None = None
        self._connect_failures = 0
        self._connected_at = 0.0  # time.monotonic() of the last successful CONNACK
        self._cut_short = 0  # connections in a row the broker closed soon after accepting them
        self._disconnected_event = threading.Event()

        self._client = self._make_client(username, password, tls)

    # -- lifecycle ----------------------------------------------------------------------------

    def set_will(self, will: Will | None) -> None:
        self._will = will
        if self._ever_connected:  # takes effect at the next automatic reconnect
            if will is None:
                self._client.will_clear()
            else:
                self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def set_on_connect(self, callback: Callable[[], None] | None) -> None:
        self._on_connect_hook = callback

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect and wait for the CONNACK; raise ``BrokerUnavailableError`` naming host:port
        and the reason when the broker refuses or does not answer within ``timeout_s`` seconds
        (default ``connect_timeout_s``).

        Also the way back after a ``failure``: the owner decides to take the session again."""
        if self._connected:
            return
        if timeout_s is None:
            timeout_s = self.connect_timeout_s
        client = self._client
        if self._failure is not None:
            self._stop_network()  # let paho's ended loop go before starting a new one
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
        self._cut_short = 0
        self._closed = False
        self._failure = None
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

    # -- introspection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def failure(self) -> BrokerUnavailableError | None:
        """Why this connection gave up for good (``SessionTakenOverError``), else ``None``.
        Only ``connect`` clears it."""
        return self._failure

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the client is connected again (after a broker restart, say)."""
        deadline = time.monotonic() + timeout_s
        while not self._connected and self._failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._connected

    # -- for the subclass ---------------------------------------------------------------------

    def _restore_session(self, client: paho.Client) -> None:
        """Called on the network thread after every successful CONNACK, before the on-connect
        hook: re-send what the broker may have forgotten. Must not block."""

    def _check_usable(self) -> None:
        """Raise the ``failure`` if the connection gave up for good."""
        if self._failure is not None:
            raise self._failure.with_traceback(None)  # raised again and again: keep it short

    def _stop_network(self) -> None:
        client = self._client
        self._disconnected_event.clear()
        if client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._disconnected_event.wait(2.0)
        client.loop_stop()
        self._connected = False

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
            try:
                client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
            except OSError as exc:  # a missing, unreadable or malformed file (ssl.SSLError too)
                named = (("CA", tls.ca_file), ("cert", tls.cert_file), ("key", tls.key_file))
                files = ", ".join(f"{what} {path}" for what, path in named if path is not None)
                raise ConfigError(
                    f"TLS files of client {self.client_id!r} ({files or 'system CAs'}) cannot "
                    f"be used: {exc.strerror or exc}"
                ) from None
            if tls.insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        return client

    def _draw_reconnect_delay(self) -> None:
        low = self.reconnect_min_s * (1.0 + self._rng.random())
        # paho annotates the delays as int but only sleeps on them: fractions work.
        set_delay = cast(Any, self._client.reconnect_delay_set)
        set_delay(min_delay=min(low, self.reconnect_max_s), max_delay=self.reconnect_max_s)

    # -- paho callbacks (network thread: record only) -----------------------------------------

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
        _no_delay(client)
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
        self._restore_session(client)
        self._draw_reconnect_delay()
        self._connected_at = time.monotonic()
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
        self._cut_short = 0  # the broker itself was away (a restart): not a fight

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
        if self._closed or self._failure is not None:
            return
        if was_connected:
            self.disconnect_reasons.append(int(reason.value))
        if reason.value == SESSION_TAKEN_OVER:
            self._give_up_session(client, certain=True)
            return
        if was_connected and self._fighting(flags):
            self._give_up_session(client, certain=False)
            return
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

    def _fighting(self, flags: paho.DisconnectFlags) -> bool:
        """Count a connection that just ended; whether it was the last strike of a fight over
        the client id (see the module docstring)."""
        lived_s = time.monotonic() - self._connected_at
        if flags.is_disconnect_packet_from_server or lived_s >= TAKEOVER_WINDOW_S:
            self._cut_short = 0
            return False
        self._cut_short += 1
        return self._cut_short >= TAKEOVER_STRIKES

    def _give_up_session(self, client: paho.Client, *, certain: bool) -> None:
        """Another client connected with our client id: stop reconnecting (see the module)."""
        where = f"MQTT broker at {self.host}:{self.port}"
        why = (
            f"{where} disconnected client {self.client_id!r} because another client connected "
            f"with the same client id (Session taken over, {SESSION_TAKEN_OVER})"
            if certain
            else f"{where} closed the connection of client {self.client_id!r} "
            f"{TAKEOVER_STRIKES} times in a row within {TAKEOVER_WINDOW_S:.0f} s of accepting "
            "it: another client is most likely connected with the same client id"
        )
        self._failure = SessionTakenOverError(
            f"{why}; not reconnecting, so that the two do not take the session from each other "
            "forever. Give every client its own id, and stop the other one",
            client_id=self.client_id,
        )
        log.error("%s", self._failure)
        # From the network thread loop_stop only asks paho's loop to end (no join): it returns
        # instead of reconnecting. The owner's close() finishes the stop.
        client.loop_stop()


def _no_delay(client: paho.Client) -> None:
    """Turn Nagle's algorithm off on the connection (TCP_NODELAY). MQTT's small packets
    (PUBACK, SUBSCRIBE, a deployment notice after an artefact) otherwise wait for the
    receiver's delayed ACK: about 40 ms per hop on Linux, which made a deployment's notice,
    subscription and artefact take 110 ms instead of 6 ms on loopback (docs/benchmarks.md,
    "Deployment"). The broker needs ``set_tcp_nodelay true`` for its side."""
    sock = client.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    except (AttributeError, OSError) as exc:  # a WebSocket wrapper or a closed socket
        log.debug("TCP_NODELAY not set: %s", exc)

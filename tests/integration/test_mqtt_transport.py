"""MqttTransport against a real mosquitto: the broker behaviours the protocol depends on."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.errors import BrokerUnavailableError, SessionTakenOverError
from device.wire.broker import MosquittoBroker, free_port
from device.wire.chunking import SAFETY_MARGIN_BYTES, fits, plan_publish, publish_packet_size
from device.wire.connection import TAKEOVER_STRIKES
from device.wire.mqtt import MqttTransport
from device.wire.transport import Message, Will

BrokerFactory = Callable[..., MosquittoBroker]
ClientFactory = Callable[..., MqttTransport]
MODULE_BROKER_MAX_PACKET = 64 * 1024  # what the ``mosquitto`` fixture configures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _drain(client: MqttTransport, quiet_s: float = 0.3) -> list[Message]:
    """Everything that arrives until nothing has for ``quiet_s``."""
    out = []
    while (message := client.get(timeout_s=quiet_s)) is not None:
        out.append(message)
    return out


def _barrier(client: MqttTransport) -> None:
    """Return once the broker has processed everything ``client`` sent before (its PUBACKs
    included): a QoS 1 publish on the same connection is acknowledged only after them."""
    client.publish(f"barrier/{client.client_id}", b"", wait=True, timeout_s=5)


def _cut_off(broker: MosquittoBroker, client: MqttTransport) -> bool:
    """Whether the broker logged disconnecting ``client`` for an oversized packet."""
    return f"Client {client.client_id} disconnected due to oversize packet" in broker.log_text()


def test_qos1_round_trip_delivers_payload_and_packet_id(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """The basic contract: what one client publishes at QoS 1, a subscriber gets unchanged,
    with the packet id it needs for a manual acknowledgement."""
    sub = mqtt(mosquitto, manual_ack=True)
    sub.subscribe(f"{topic_root}/#", qos=1)
    pub = mqtt(mosquitto)
    sent = pub.publish(f"{topic_root}/a", b"\x00hello\xff", qos=1)
    message = sub.get(timeout_s=5)
    assert message is not None
    assert (message.topic, message.payload, message.qos) == (f"{topic_root}/a", b"\x00hello\xff", 1)
    assert len(message.ack_ids) == 1
    assert sent == len(b"\x00hello\xff")
    sub.ack(message)


def test_persistent_session_keeps_messages_published_while_offline(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """A device that is offline for a moment still gets its commands: the broker queues QoS 1
    messages for its session and delivers them, in order, when it reconnects."""
    device_id = f"dev-{topic_root[-6:]}"
    first = mqtt(mosquitto, device_id)
    first.subscribe(f"{topic_root}/cmd")
    first.close()
    pub = mqtt(mosquitto)
    for i in range(3):
        pub.publish(f"{topic_root}/cmd", f"command {i}".encode())
    again = mqtt(mosquitto, device_id)
    assert again.session_present
    got = [m.payload for m in _drain(again)]
    assert got == [b"command 0", b"command 1", b"command 2"]


def test_last_will_is_published_and_retained_on_abnormal_disconnect(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """A device that dies (no DISCONNECT) is marked offline by its will, and because the will
    is retained, a fleet manager that starts later still sees it offline."""
    status = f"{topic_root}/status"
    watcher = mqtt(mosquitto)
    watcher.subscribe(status)
    device = mqtt(mosquitto, connect=False, will=Will(status, b"offline", qos=1, retain=True))
    device.connect(timeout_s=5)
    device.publish(status, b"online", retain=True)
    assert (m := watcher.get(timeout_s=5)) is not None and m.payload == b"online"
    device.kill()
    will = watcher.get(timeout_s=5)
    assert will is not None and will.payload == b"offline"
    late = mqtt(mosquitto)
    late.subscribe(status)
    retained = late.get(timeout_s=5)
    assert retained is not None
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_clean_close_does_not_publish_the_will(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """A device that shuts down on purpose publishes its own offline status; the broker must
    not add a will message on top of it."""
    status = f"{topic_root}/status"
    watcher = mqtt(mosquitto)
    watcher.subscribe(status)
    device = mqtt(mosquitto, will=Will(status, b"died", qos=1, retain=False))
    device.close()
    assert watcher.get(timeout_s=0.5) is None


def test_takeover_that_resumes_the_session_does_not_publish_the_will(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """A device restarted before the broker noticed the old connection die takes over its
    session; mosquitto then drops the old connection without its will, so the registry sees
    no spurious offline (the in-memory twin mirrors this)."""
    status = f"{topic_root}/status"
    watcher = mqtt(mosquitto)
    watcher.subscribe(status)
    device_id = f"dev-{topic_root[-6:]}"
    old = mqtt(mosquitto, device_id, connect=False, will=Will(status, b"offline", retain=False))
    old.reconnect_min_s = old.reconnect_max_s = 30.0  # no fight over the client id
    old.connect(timeout_s=5)
    new = mqtt(mosquitto, device_id)
    assert new.session_present
    assert watcher.get(timeout_s=0.5) is None
    old.kill()


def test_resubscribing_after_reconnect_does_not_repeat_retained_messages(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Every reconnect re-subscribes; with retain handling 1 the broker sends retained
    messages only for a new subscription, so a device does not re-receive the model (and
    every status) each time its connection blips."""
    topic = f"{topic_root}/model"
    mqtt(mosquitto).publish(topic, b"model", retain=True)
    device = mqtt(mosquitto)
    device.subscribe(topic)
    assert [m.payload for m in _drain(device)] == [b"model"]
    device.kill()
    device.connect(timeout_s=5)
    assert device.session_present
    assert _drain(device) == []


def test_payload_over_broker_limit_arrives_whole_and_nobody_is_disconnected(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """paho ignores the broker's Maximum-Packet-Size and would loop forever re-sending an
    oversized packet; the transport reads the limit from the CONNACK and chunks instead."""
    sub = mqtt(mosquitto, manual_ack=True)
    sub.subscribe(f"{topic_root}/up")
    pub = mqtt(mosquitto)
    assert pub.max_packet_bytes == MODULE_BROKER_MAX_PACKET  # read from the CONNACK
    payload = os.urandom(300 * 1024)
    pub.publish(f"{topic_root}/up", payload)
    message = sub.get(timeout_s=10)
    assert message is not None
    assert message.topic == f"{topic_root}/up"
    assert hashlib.sha256(message.payload).digest() == hashlib.sha256(payload).digest()
    assert len(message.ack_ids) == pub.packets_sent > 5  # manifest + 5 chunks, one ack
    sub.ack(message)
    assert pub.disconnect_reasons == [] and sub.disconnect_reasons == []
    assert pub.connect_count == 1
    assert not _cut_off(mosquitto, pub)


def test_packets_at_the_size_boundary_never_exceed_the_limit(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Payloads just under and just over the single-packet limit both arrive, the larger one
    chunked, without a disconnect: the size computation has no off-by-one."""
    topic = f"{topic_root}/edge"
    sub = mqtt(mosquitto)
    sub.subscribe(topic)
    pub = mqtt(mosquitto)
    limit = MODULE_BROKER_MAX_PACKET
    largest_single = max(n for n in range(limit - 200, limit) if fits(topic, n, 1, limit))
    assert publish_packet_size(topic, largest_single, 1) == limit - SAFETY_MARGIN_BYTES
    sizes = [largest_single - 1, largest_single, largest_single + 1, MODULE_BROKER_MAX_PACKET]
    for size in sizes:
        pub.publish(topic, bytes([size % 251]) * size)
    got = _drain(sub)
    assert [len(m.payload) for m in got] == sizes
    assert pub.packets_sent == 1 + 1 + 3 + 3  # two fit, two need a manifest and two chunks
    assert pub.disconnect_reasons == []
    assert not _cut_off(mosquitto, pub)


def test_an_oversized_packet_gets_the_client_disconnected(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Control for the chunking tests: a client that believes the broker has no limit is cut
    off ("Packet too large") and its publish is never acknowledged. This is the failure the
    size check exists to prevent, and it shows that the assertions above can fail."""
    pub = mqtt(mosquitto)
    pub.max_packet_bytes = 10 * MODULE_BROKER_MAX_PACKET  # as plain paho behaves
    with pytest.raises(BrokerUnavailableError, match="acknowledged only 0 of 1"):
        pub.publish(f"{topic_root}/big", b"x" * (2 * MODULE_BROKER_MAX_PACKET), timeout_s=1.5)
    pub.kill()  # stop paho's reconnect-and-resend loop
    assert 149 in pub.disconnect_reasons  # Packet too large
    assert _cut_off(mosquitto, pub)


def test_unacked_message_is_redelivered_after_reconnect_and_acked_one_is_not(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Manual ack is what makes a fleet-manager crash lose nothing: an update acknowledged
    only after it was stored comes back if the process died before storing it."""
    client_id = f"fleet-{topic_root[-6:]}"
    sub = mqtt(mosquitto, client_id, manual_ack=True)
    sub.subscribe(f"{topic_root}/up/#")
    pub = mqtt(mosquitto)
    pub.publish(f"{topic_root}/up/1", b"stored")
    pub.publish(f"{topic_root}/up/2", b"not stored")
    first, second = sub.get(timeout_s=5), sub.get(timeout_s=5)
    assert first is not None and second is not None
    assert (first.payload, second.payload) == (b"stored", b"not stored")
    sub.ack(first)
    _barrier(sub)  # the PUBACK has reached the broker before the connection dies
    sub.kill()
    again = mqtt(mosquitto, client_id, manual_ack=True)
    redelivered = _drain(again)
    assert [m.payload for m in redelivered] == [b"not stored"]
    again.ack(redelivered[0])


def test_chunks_delivered_twice_are_reassembled_once_and_all_acknowledged(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """At-least-once delivery duplicates packets; a duplicated chunk or manifest must neither
    produce a second copy of the payload nor leave a packet unacknowledged in the session."""
    topic = f"{topic_root}/model"
    client_id = f"rx-{topic_root[-6:]}"
    sub = mqtt(mosquitto, client_id, manual_ack=True)
    sub.subscribe(topic)
    payload = os.urandom(20_000)
    count, packets = plan_publish(topic, payload, qos=1, retain=False, max_packet_bytes=6000)
    raw = list(packets)
    assert count == 4
    order = [raw[0], raw[1], raw[1], raw[2], raw[0], raw[3], raw[4], raw[2]]
    pub = mqtt(mosquitto)
    for packet in order:  # each is small enough to go out as it is
        pub.publish(packet.topic, packet.payload)
    got = _drain(sub)
    assert len(got) == 1
    assert got[0].payload == payload
    # Manifest, 4 chunks and the two duplicates that came before the set was complete; the
    # late duplicate of chunk 1 was acknowledged (and dropped) on arrival.
    assert len(set(got[0].ack_ids)) == 7
    sub.ack(got[0])
    _barrier(sub)
    sub.close()
    # Every packet was acknowledged: nothing comes back for the persistent session.
    again = mqtt(mosquitto, client_id, manual_ack=True)
    assert _drain(again) == []


def test_retained_chunked_payload_reaches_a_later_subscriber_whole(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """The global model is retained and may exceed the limit: a device that subscribes after
    it was published must still get it, reassembled from the retained manifest and chunks."""
    topic = f"{topic_root}/runs/r1/model"
    pub = mqtt(mosquitto)
    model = os.urandom(150_000)
    pub.publish(topic, model, retain=True)
    device = mqtt(mosquitto)
    device.subscribe(topic)
    message = device.get(timeout_s=5)
    assert message is not None
    assert (message.topic, message.payload, message.retain) == (topic, model, True)


def test_client_reconnects_after_broker_restart_and_keeps_its_session(
    mqtt: ClientFactory, mosquitto_factory: BrokerFactory, topic_root: str
) -> None:
    """A broker restart (persistence on) must not need operator action: paho reconnects with
    back-off, the session (subscription and queued messages) survives, delivery continues."""
    broker = mosquitto_factory(persistence=True)
    sub = mqtt(broker, f"s-{topic_root[-6:]}")
    sub.subscribe(f"{topic_root}/x")
    broker.restart()
    assert sub.wait_connected(timeout_s=10)
    assert sub.session_present
    pub = mqtt(broker)
    pub.publish(f"{topic_root}/x", b"after restart")
    message = sub.get(timeout_s=5)
    assert message is not None and message.payload == b"after restart"
    assert sub.connect_count == 2


def test_connect_without_broker_raises_naming_the_address() -> None:
    """A wrong broker address must fail fast with the address in the message, not hang."""
    port = free_port()
    client = MqttTransport("lonely", host="127.0.0.1", port=port, reconnect_min_s=0.1)
    with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}"):
        client.connect(timeout_s=0.5)


def test_refused_connection_raises_with_the_reason_code(
    mosquitto_factory: BrokerFactory, mqtt: ClientFactory
) -> None:
    """Wrong credentials are reported with the broker's reason, not as a timeout."""
    broker = mosquitto_factory(allow_anonymous=False)
    with pytest.raises(BrokerUnavailableError, match=r"Not authorized \(135\)"):
        mqtt(broker, "intruder")


def test_shared_subscription_spreads_messages_over_the_group(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Aggregator workers sharing ``$share/agg/...`` each get a part of the updates and
    together all of them, each exactly once."""
    workers = [mqtt(mosquitto) for _ in range(2)]
    for worker in workers:
        worker.subscribe(f"$share/agg/{topic_root}/up/#")
    pub = mqtt(mosquitto)
    for i in range(10):
        pub.publish(f"{topic_root}/up/{i}", str(i).encode())
    received = [[m.payload for m in _drain(w)] for w in workers]
    assert all(received)
    assert sorted(int(p) for part in received for p in part) == list(range(10))


def test_missing_mosquitto_binary_names_the_install_command(tmp_path: Path) -> None:
    """``fleet broker`` and the simulation start mosquitto themselves; without it the user
    must be told how to get it, not shown a FileNotFoundError."""
    with pytest.raises(BrokerUnavailableError, match="apt-get install mosquitto") as info:
        MosquittoBroker(binary=str(tmp_path / "no-such-mosquitto"))
    assert "docker compose" in str(info.value)


def _wait_for_failure(*clients: MqttTransport, timeout_s: float) -> list[MqttTransport]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and all(c.failure is None for c in clients):
        time.sleep(0.05)
    return [c for c in clients if c.failure is not None]


def test_two_clients_with_one_client_id_stop_fighting_over_the_session(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """Two clients with one client id take the session from each other at every reconnect: a
    device named like the fleet manager kicked it off and swallowed the round's updates.
    mosquitto 2.0.11 just closes the older connection, so the fight is recognised by its
    pattern; it must end with one client giving up, loudly and naming the id, and the other
    keeping the session."""
    client_id = f"dup-{topic_root[-6:]}"
    first = mqtt(mosquitto, client_id)
    first.subscribe(f"{topic_root}/#")
    second = mqtt(mosquitto, client_id)
    failed = _wait_for_failure(first, second, timeout_s=15)
    assert len(failed) == 1, "the fight over the client id did not end"
    loser = failed[0]
    winner = second if loser is first else first
    assert isinstance(loser.failure, SessionTakenOverError)
    assert loser.failure.client_id == client_id and f"{client_id!r}" in str(loser.failure)
    assert loser.connect_count <= TAKEOVER_STRIKES + 1
    with pytest.raises(SessionTakenOverError):
        loser.get(timeout_s=0)
    with pytest.raises(SessionTakenOverError):
        loser.publish(f"{topic_root}/x", b"x")
    assert winner.wait_connected(timeout_s=5)
    settled = winner.connect_count
    time.sleep(1.5)  # longer than the fixture's longest reconnect delay (1 s)
    assert winner.connected and winner.connect_count == settled and winner.failure is None
    mqtt(mosquitto).publish(f"{topic_root}/after", b"yours")
    message = winner.get(timeout_s=5)
    assert message is not None and message.payload == b"yours"


def test_one_takeover_is_not_a_fight(
    mosquitto: MosquittoBroker, mqtt: ClientFactory, topic_root: str
) -> None:
    """A device restarted before the broker noticed its old connection die takes the session
    over once; the old connection's owner, if it is still alive, must not give up for that."""
    client_id = f"once-{topic_root[-6:]}"
    old = mqtt(mosquitto, client_id, connect=False)
    old.reconnect_min_s = old.reconnect_max_s = 30.0  # it never comes back to fight
    old.connect(timeout_s=5)
    new = mqtt(mosquitto, client_id)
    time.sleep(1.0)
    assert old.failure is None and new.failure is None and new.connected
    old.kill()


@pytest.fixture
def broker_that_reports_takeovers() -> Iterator[tuple[int, list[int]]]:
    """A minimal MQTT 5 server, as newer mosquitto behaves on a takeover: it accepts every
    CONNECT and then disconnects the client with reason 142, "Session taken over". Yields its
    port and a list that counts the connections it accepted."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                accepted.append(1)
                conn.recv(4096)  # the CONNECT
                conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: success, no properties
                time.sleep(0.2)
                conn.sendall(b"\xe0\x02\x8e\x00")  # DISCONNECT: Session taken over
                time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(5)
    server.close()


def test_a_session_taken_over_disconnect_stops_reconnecting_at_once(
    broker_that_reports_takeovers: tuple[int, list[int]],
) -> None:
    """A broker that says why (MQTT 5 reason 142) is believed at the first disconnect."""
    port, accepted = broker_that_reports_takeovers
    client = MqttTransport(
        "fleet-manager", host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.2
    )
    client.connect(timeout_s=5)
    try:
        assert _wait_for_failure(client, timeout_s=5) == [client]
        assert isinstance(client.failure, SessionTakenOverError)
        assert "'fleet-manager'" in str(client.failure) and "142" in str(client.failure)
        time.sleep(1.0)  # five reconnect delays
        assert len(accepted) == 1 and not client.connected
        with pytest.raises(SessionTakenOverError):
            client.get(timeout_s=None)
    finally:
        client.close(timeout_s=1)

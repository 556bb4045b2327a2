"""The in-memory twin: the broker semantics the runner and the agent rely on, without a broker.

Each test mirrors a behaviour tested against mosquitto in tests/integration/, so that code
proven on the twin behaves the same over MQTT.
"""

from __future__ import annotations

import os
import threading

import pytest

from device.errors import BrokerUnavailableError
from device.wire.chunking import plan_publish
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.transport import Message, Will


def _drain(t: MemoryTransport) -> list[Message]:
    out = []
    while (m := t.get(timeout_s=0)) is not None:
        out.append(m)
    return out


def _client(broker: MemoryBroker, cid: str, **kw: object) -> MemoryTransport:
    t = MemoryTransport(broker, cid, **kw)  # type: ignore[arg-type]
    t.connect()
    return t


def test_qos1_round_trip() -> None:
    broker = MemoryBroker()
    sub = _client(broker, "sub", manual_ack=True)
    sub.subscribe("a/b")
    pub = _client(broker, "pub")
    assert pub.publish("a/b", b"payload") == 7
    message = sub.get(timeout_s=1)
    assert message is not None
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "a/b",
        b"payload",
        1,
        False,
    )
    assert len(message.ack_ids) == 1


def test_wildcard_filters_select_topics_as_mqtt_does() -> None:
    """The runner's ``dev/+/status`` and ``dev/+/up/#`` must catch exactly their topics."""
    broker = MemoryBroker()
    status, updates = _client(broker, "s"), _client(broker, "u")
    status.subscribe("fl/v1/dev/+/status")
    updates.subscribe("fl/v1/dev/+/up/#")
    pub = _client(broker, "p")
    for topic in ["fl/v1/dev/a/status", "fl/v1/dev/a/up/r/1", "fl/v1/dev/a/events", "x/y"]:
        pub.publish(topic, b"x")
    assert [m.topic for m in _drain(status)] == ["fl/v1/dev/a/status"]
    assert [m.topic for m in _drain(updates)] == ["fl/v1/dev/a/up/r/1"]


def test_delivery_order_is_publish_order() -> None:
    """Determinism: a simulation replayed with the same seeds sees the same message order."""
    broker = MemoryBroker()
    sub = _client(broker, "sub")
    sub.subscribe("#")
    a, b = _client(broker, "a"), _client(broker, "b")
    for i in range(5):
        (a if i % 2 else b).publish(f"t/{i}", str(i).encode())
    assert [m.payload for m in _drain(sub)] == [b"0", b"1", b"2", b"3", b"4"]


def test_shared_subscription_round_robins_over_connected_members() -> None:
    """Aggregator workers on ``$share/agg/...`` split the updates, each exactly once."""
    broker = MemoryBroker()
    w1, w2 = _client(broker, "w1"), _client(broker, "w2")
    for w in (w1, w2):
        w.subscribe("$share/agg/up/#")
    pub = _client(broker, "p")
    for i in range(6):
        pub.publish(f"up/{i}", str(i).encode())
    assert [m.payload for m in _drain(w1)] == [b"0", b"2", b"4"]
    assert [m.payload for m in _drain(w2)] == [b"1", b"3", b"5"]
    w2.close()
    pub.publish("up/6", b"6")
    assert [m.payload for m in _drain(w1)] == [b"6"]


def test_retained_message_reaches_later_subscribers_and_empty_payload_clears_it() -> None:
    """Device status and the global model are retained; clearing must really clear."""
    broker = MemoryBroker()
    pub = _client(broker, "p")
    pub.publish("fl/v1/fleet/status", b"online", retain=True)
    late = _client(broker, "late")
    late.subscribe("fl/v1/fleet/status")
    message = late.get(timeout_s=0)
    assert message is not None and (message.payload, message.retain) == (b"online", True)
    pub.publish("fl/v1/fleet/status", b"", retain=True)
    assert broker.retained("fl/v1/fleet/status") is None
    later = _client(broker, "later")
    later.subscribe("fl/v1/fleet/status")
    assert later.get(timeout_s=0) is None


def test_resubscribing_does_not_repeat_retained_messages() -> None:
    """Every reconnect re-subscribes; the retained model must not arrive again each time."""
    broker = MemoryBroker()
    pub = _client(broker, "p")
    pub.publish("m", b"model", retain=True)
    dev = _client(broker, "dev")
    dev.subscribe("m")
    dev.close()
    dev.connect()
    assert [m.payload for m in _drain(dev)] == [b"model"]


def test_persistent_session_queues_messages_while_offline() -> None:
    broker = MemoryBroker()
    dev = _client(broker, "dev")
    dev.subscribe("cmd")
    dev.close()
    pub = _client(broker, "fleet")
    pub.publish("cmd", b"1")
    pub.publish("cmd", b"2")
    assert broker.queued("dev") == 2
    again = _client(broker, "dev")
    assert again.session_present
    assert [m.payload for m in _drain(again)] == [b"1", b"2"]


def test_clean_session_forgets_everything() -> None:
    """Contrast: without a session expiry nothing waits for the client."""
    broker = MemoryBroker()
    dev = _client(broker, "dev", session_expiry_s=0)
    dev.subscribe("cmd")
    dev.close()
    _client(broker, "fleet").publish("cmd", b"lost")
    again = _client(broker, "dev", session_expiry_s=0)
    assert not again.session_present and _drain(again) == []


def test_will_is_published_on_kill_not_on_close() -> None:
    """A crashed device is marked offline by its retained will; a clean stop is not."""
    broker = MemoryBroker()
    watcher = _client(broker, "w")
    watcher.subscribe("dev/+/status")
    crashing = _client(broker, "a", will=Will("dev/a/status", b"offline"))
    stopping = _client(broker, "b", will=Will("dev/b/status", b"offline"))
    stopping.close()
    crashing.kill()
    assert [(m.topic, m.payload) for m in _drain(watcher)] == [("dev/a/status", b"offline")]
    assert broker.retained("dev/a/status") == b"offline"
    assert broker.retained("dev/b/status") is None


def test_session_takeover_resumes_the_session_without_the_will() -> None:
    """A device restarted before the broker noticed its death takes over its session: the old
    connection is dropped and, as on mosquitto 2.0.11, no offline will is published, because
    the session goes on (the new birth message follows)."""
    broker = MemoryBroker()
    watcher = _client(broker, "w")
    watcher.subscribe("s")
    old = _client(broker, "dev", will=Will("s", b"offline", retain=False))
    old.subscribe("cmd")
    new = _client(broker, "dev")
    assert not old.connected and new.session_present
    assert _drain(watcher) == []
    with pytest.raises(BrokerUnavailableError):
        old.publish("s", b"zombie")


def test_session_takeover_by_a_clean_start_publishes_the_will() -> None:
    """Contrast: a clean start ends the old session, and with it the old connection's life."""
    broker = MemoryBroker()
    watcher = _client(broker, "w")
    watcher.subscribe("s")
    _client(broker, "dev", will=Will("s", b"offline", retain=False))
    _client(broker, "dev", session_expiry_s=0)
    assert [m.payload for m in _drain(watcher)] == [b"offline"]


def test_unacked_message_is_redelivered_after_reconnect_and_acked_one_is_not() -> None:
    broker = MemoryBroker()
    fleet = _client(broker, "fleet", manual_ack=True)
    fleet.subscribe("up/#")
    dev = _client(broker, "dev")
    dev.publish("up/1", b"stored")
    dev.publish("up/2", b"not stored")
    first, second = fleet.get(timeout_s=0), fleet.get(timeout_s=0)
    assert first is not None and second is not None
    fleet.ack(first)
    fleet.kill()
    again = _client(broker, "fleet", manual_ack=True)
    redelivered = _drain(again)
    assert [m.payload for m in redelivered] == [b"not stored"]
    assert redelivered[0].ack_ids == second.ack_ids  # same packet id, as MQTT 5 requires
    again.ack(redelivered[0])
    assert broker.unacked("fleet") == 0


def test_ack_while_disconnected_is_lost_as_over_a_network() -> None:
    """An acknowledgement needs a connection; a crash before it reached the broker means the
    message comes back. The twin must not be more forgiving than MQTT."""
    broker = MemoryBroker()
    fleet = _client(broker, "fleet", manual_ack=True)
    fleet.subscribe("up")
    _client(broker, "dev").publish("up", b"u")
    message = fleet.get(timeout_s=0)
    assert message is not None
    fleet.kill()
    fleet.ack(message)
    assert [m.payload for m in _drain(_client(broker, "fleet", manual_ack=True))] == [b"u"]


def test_payload_over_the_broker_limit_arrives_whole_and_no_one_is_disconnected() -> None:
    broker = MemoryBroker(max_packet_size=2048)
    sub = _client(broker, "sub", manual_ack=True)
    sub.subscribe("runs/r/model")
    pub = _client(broker, "pub", will=Will("pub/status", b"dead"))
    payload = os.urandom(20_000)
    sent = pub.publish("runs/r/model", payload)
    message = sub.get(timeout_s=0)
    assert message is not None and message.payload == payload
    assert sent > len(payload) and pub.packets_sent > 10
    assert len(message.ack_ids) == pub.packets_sent
    assert pub.connected and broker.retained("pub/status") is None
    sub.ack(message)
    assert broker.unacked("sub") == 0


def test_an_oversized_packet_gets_the_client_disconnected() -> None:
    """Control: a client that ignores the limit is cut off, as mosquitto does, and its will
    fires; the test above would notice if chunking failed."""
    broker = MemoryBroker(max_packet_size=2048)
    watcher = _client(broker, "w")
    watcher.subscribe("pub/status")
    pub = _client(broker, "pub", will=Will("pub/status", b"dead", retain=False))
    pub.max_packet_bytes = 10**6  # as plain paho behaves
    with pytest.raises(BrokerUnavailableError, match="maximum packet size"):
        pub.publish("x", b"y" * 5000)
    assert not pub.connected
    assert [m.payload for m in _drain(watcher)] == [b"dead"]


def test_transport_limit_below_the_brokers_forces_chunking() -> None:
    """Tests (and cautious deployments) can lower the packet size on the client side."""
    broker = MemoryBroker()
    sub = _client(broker, "sub")
    sub.subscribe("t")
    pub = _client(broker, "pub", max_packet_bytes=1024)
    pub.publish("t", b"z" * 5000)
    assert pub.packets_sent > 5
    message = sub.get(timeout_s=0)
    assert message is not None and message.payload == b"z" * 5000


def test_duplicated_chunks_are_reassembled_once() -> None:
    broker = MemoryBroker()
    sub = _client(broker, "sub", manual_ack=True)
    sub.subscribe("m")
    pub = _client(broker, "pub")
    payload = os.urandom(6000)
    _, packets = plan_publish("m", payload, qos=1, retain=False, max_packet_bytes=1500)
    raw = list(packets)
    for packet in [*raw, *raw[1:3], raw[0]]:
        pub.publish(packet.topic, packet.payload)
    got = _drain(sub)
    assert [m.payload for m in got] == [payload]
    sub.ack(got[0])
    assert broker.unacked("sub") == 0  # the duplicates were acknowledged too


def test_republishing_a_smaller_retained_payload_clears_stale_chunks() -> None:
    """A retained model that shrinks must not leave old chunks that every new device would
    receive (and hold in memory) forever."""
    broker = MemoryBroker(max_packet_size=2048)
    pub = _client(broker, "fleet")
    pub.publish("runs/r/model", os.urandom(10_000), retain=True)
    assert broker.retained("runs/r/model/4") is not None
    pub.publish("runs/r/model", b"small model", retain=True)
    assert broker.retained("runs/r/model/0") is None
    assert broker.retained("runs/r/model/4") is None
    dev = _client(broker, "dev")
    dev.subscribe("runs/r/model")
    assert [m.payload for m in _drain(dev)] == [b"small model"]


def test_unavailable_broker_refuses_connections() -> None:
    broker = MemoryBroker()
    broker.available = False
    with pytest.raises(BrokerUnavailableError, match="unavailable"):
        MemoryTransport(broker, "dev").connect()


def test_concurrent_publishers_lose_nothing() -> None:
    """Thread safety: the simulation publishes from many device threads at once."""
    broker = MemoryBroker()
    sub = _client(broker, "sub")
    sub.subscribe("up/#")
    pubs = [_client(broker, f"d{i}") for i in range(4)]

    def send(t: MemoryTransport) -> None:
        for j in range(50):
            t.publish(f"up/{t.client_id}/{j}", b"x")

    threads = [threading.Thread(target=send, args=(p,)) for p in pubs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = _drain(sub)
    assert len(got) == 200 and len({m.topic for m in got}) == 200

"""Fixtures for tests against a real mosquitto broker on a free loopback port.

``mosquitto``: one broker per test module (64 KiB maximum packet size, so chunking is exercised
with small payloads). ``mosquitto_factory``: brokers with other settings, stopped after the test.
``mqtt``: builds ``MqttTransport`` clients for a broker and closes them after the test.
Everything is skipped, with the install command in the reason, when mosquitto is missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from device.errors import BrokerUnavailableError
from device.wire.broker import MosquittoBroker, find_mosquitto
from device.wire.mqtt import MqttTransport

MODULE_BROKER_MAX_PACKET = 64 * 1024

BrokerFactory = Callable[..., MosquittoBroker]
ClientFactory = Callable[..., MqttTransport]


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"integration test needs a mosquitto broker: {exc}")


@pytest.fixture(scope="module")
def mosquitto() -> Iterator[MosquittoBroker]:
    """A broker shared by the tests of one module (use distinct client ids and topics)."""
    _require_mosquitto()
    broker = MosquittoBroker(max_packet_size=MODULE_BROKER_MAX_PACKET)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def mosquitto_factory() -> Iterator[BrokerFactory]:
    """Start brokers with custom settings (``MosquittoBroker`` keyword arguments)."""
    _require_mosquitto()
    brokers: list[MosquittoBroker] = []

    def start(**kwargs: Any) -> MosquittoBroker:
        broker = MosquittoBroker(**kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.cleanup()


@pytest.fixture
def mqtt() -> Iterator[ClientFactory]:
    """``mqtt(broker, client_id=None, **kwargs)`` -> a connected ``MqttTransport``.

    ``connect=False`` leaves it unconnected. Every client is closed (or left dead, if the test
    killed it) at teardown.
    """
    clients: list[MqttTransport] = []

    def make(
        broker: MosquittoBroker,
        client_id: str | None = None,
        *,
        connect: bool = True,
        **kwargs: Any,
    ) -> MqttTransport:
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 1.0)
        kwargs.setdefault("publish_timeout_s", 10.0)
        client = MqttTransport(
            client_id or f"c-{uuid.uuid4().hex[:10]}", host=broker.host, port=broker.port, **kwargs
        )
        clients.append(client)
        if connect:
            client.connect(timeout_s=5.0)
        return client

    yield make
    for client in clients:
        client.close(timeout_s=1.0)


@pytest.fixture
def topic_root() -> str:
    """A topic prefix unique to the test, so tests sharing a broker never see each other."""
    return f"t/{uuid.uuid4().hex[:10]}"

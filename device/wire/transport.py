"""The transport interface shared by the MQTT client (``mqtt.py``) and its in-memory twin
(``memory.py``). Device agent, runner and simulation code is written against this only.

Callbacks of the underlying client only enqueue; the owner of a transport drains ``get()`` from
its own worker thread. Payloads larger than the broker's limit are chunked on ``publish`` and
reassembled before ``get`` returns them, so callers see whole payloads; the one exception is a
receiver built with ``ReassemblyLimits(deliver_shared_chunks=True)``, which gets the chunks of a
shared subscription one by one (the sharded aggregator reassembles them through its store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Message:
    """A received message, detached from the client library.

    ``ack_ids`` identifies the underlying packets (several when a payload was chunked);
    pass the message to ``Transport.ack`` once it has been durably handled.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    ack_ids: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the client disappears without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(Protocol):
    """A connection to a broker for one client id."""

    client_id: str

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (persistent session) and block until connected; raise
        ``BrokerUnavailableError`` on failure. Subscriptions are restored on every reconnect."""

    def close(self) -> None:
        """Flush pending QoS 1 publishes, disconnect cleanly (the will is not sent)."""

    def subscribe(self, pattern: str, qos: int = 1) -> None:
        """Subscribe to an MQTT topic filter (``+`` and ``#`` wildcards, ``$share/...``)."""

    def unsubscribe(self, pattern: str) -> None:
        """Drop a subscription made with ``subscribe`` (and its chunk filter); a later
        ``subscribe`` of the same filter is new, so the broker sends its retained messages
        again (how a device re-fetches a retained artefact it lost). Never blocks."""

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, wait: bool = True
    ) -> int:
        """Publish, chunking when the payload exceeds the broker's maximum packet size.

        Returns the number of bytes handed to the broker (payload plus chunk overhead), which is
        what the runner counts as traffic. With ``wait`` it blocks until the broker acknowledged
        QoS 1 messages; never call it with ``wait=True`` from a client callback.
        """
        ...

    def get(self, timeout_s: float | None = None) -> Message | None:
        """The next whole received message, or ``None`` after ``timeout_s``."""
        ...

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message (manual ack) after it has been stored."""

    def set_will(self, will: Will | None) -> None:
        """Set the last will for the next connection (the one ``connect`` or an automatic
        reconnect makes); the current connection keeps the will it connected with."""

    def set_on_connect(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` after every successful (re)connect, on the network thread.

        For a device's birth message: the broker may have published the will while the client
        was away, so the birth must follow every reconnect. The callback may only enqueue
        (``publish(..., wait=False)``, ``set_will``); it must not block.
        """


TransportFactory = Callable[[str], Transport]

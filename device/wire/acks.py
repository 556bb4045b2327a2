"""Packet-id bookkeeping of one MQTT client: which PUBACKs and SUBACKs are awaited, which arrived.

paho reports every acknowledgement on its network thread, possibly before the thread that sent
the packet has even learned the packet id. ``AckBook`` reconciles the two: every packet id handed
to paho is registered, every acknowledgement recorded, and a waiter collects the reason code of
its own packet. Reason codes are MQTT 5's: below 0x80 is success, 0x80 and above a refusal.

Invariant: paho reuses a packet id only after the previous packet with that id was acknowledged,
so a result waiting under an id belongs to the latest packet registered with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

REFUSED = 0x80
"""Reason codes from here up are refusals (MQTT 5, section 2.4)."""

_POLL_S = 0.1  # waiters look at ``gave_up`` at least this often (seconds)


class AckBook:
    """Acknowledgements of one client's QoS 1 publishes and subscriptions (thread-safe).

    ``name`` is the client id, used in log lines. Waiters stop early once ``gave_up()`` is true
    (the connection ended for good, so no acknowledgement will come).
    """

    def __init__(self, name: str, gave_up: Callable[[], bool] = lambda: False) -> None:
        self._name = name
        self._gave_up = gave_up
        self._cond = threading.Condition()
        self._done: dict[int, int] = {}  # packet id -> reason code, waiting to be collected
        self._forget: set[int] = set()  # packet ids nobody waits for
        self._inflight: set[int] = set()  # QoS 1 publishes not yet acknowledged

    def register(self, mid: int, *, waiting: bool, tracked: bool = True) -> None:
        """Note a packet id just handed to paho (every one is registered, so that no result is
        left behind for a later packet with the same id).

        Its acknowledgement may already have arrived (the network thread is fast); it then sits
        in ``_done`` and belongs to this packet (see the module's invariant). ``waiting`` means
        the caller will collect the result with ``wait_one``; ``tracked`` packets count as in
        flight until acknowledged (``wait_inflight`` waits for them).
        """
        with self._cond:
            if mid in self._done:
                if not waiting:
                    self._log_refusal(mid, self._done.pop(mid))
                return
            if tracked:
                self._inflight.add(mid)
            if waiting:
                self._forget.discard(mid)  # left over from a lost packet with the same id
            else:
                self._forget.add(mid)

    def forget(self, mid: int) -> None:
        """Nobody waits for packet ``mid`` (a SUBACK of a re-subscription, say)."""
        with self._cond:
            self._forget.add(mid)

    def record(self, mid: int, code: int) -> None:
        """The broker acknowledged packet ``mid`` with reason ``code`` (network thread)."""
        with self._cond:
            self._inflight.discard(mid)
            if mid in self._forget:
                self._forget.discard(mid)
                self._log_refusal(mid, code)
            else:
                self._done[mid] = code
            self._cond.notify_all()

    def wait_one(self, mid: int, deadline: float) -> int | None:
        """The reason code of packet ``mid``, or ``None`` if it was not acknowledged by
        ``deadline`` (``time.monotonic()`` seconds) or the connection gave up; a late result is
        then only logged."""
        with self._cond:
            while mid not in self._done:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._gave_up():
                    self._forget.add(mid)
                    return None
                self._cond.wait(min(remaining, _POLL_S))
            return self._done.pop(mid)

    def wait_all(self, mids: list[int], deadline: float) -> tuple[list[int], int]:
        """Wait for every packet in ``mids``; returns (refusal codes, how many timed out)."""
        refused: list[int] = []
        missing = 0
        for mid in mids:
            code = self.wait_one(mid, deadline)
            if code is None:
                missing += 1
            elif code >= REFUSED:
                refused.append(code)
        return refused, missing

    def wait_inflight(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` seconds until no tracked publish is in flight; returns how
        many still are."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._gave_up():
                    break
                self._cond.wait(min(remaining, _POLL_S))
            return len(self._inflight)

    def _log_refusal(self, mid: int, code: int) -> None:
        if code >= REFUSED:
            log.warning(
                "%s: broker refused publish (packet %d): %s (%d)",
                self._name,
                mid,
                reason_name(PacketTypes.PUBACK, code),
                code,
            )


def reason_name(packet_type: int, code: int) -> str:
    """MQTT 5's name of reason ``code`` in a packet of ``packet_type`` (e.g. "Not authorized")."""
    try:
        return ReasonCode(packet_type, identifier=code).getName()
    except Exception:  # unknown code: the number says enough
        return "unknown reason"

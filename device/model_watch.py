"""Which runs' model topics a device agent receives: only while it has a job of that run.

An idle device receives no model: of a fleet of 400 training 20 per round, each device would
otherwise receive every round's model, 20 times the download its own jobs need. The retained
snapshot arrives with each new subscription (docs/protocol.md).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from device.wire.topics import Topics
from device.wire.transport import Transport

log = logging.getLogger(__name__)

__all__ = ["ModelWatch"]


class ModelWatch:
    """Counts each run's jobs queued or running; subscribes to the run's model topic for the
    first job that needs a newer model than the one held, unsubscribes when the last job ends.

    ``lock`` is the agent's model lock (held snapshots change under it), so that a command and a
    job's end never interleave between deciding and (un)subscribing.
    """

    def __init__(self, transport: Transport, topics: Topics, lock: threading.Condition) -> None:
        self._transport = transport
        self._topics = topics
        self._lock = lock
        self._jobs: Counter[str] = Counter()
        self._subscribed: set[str] = set()

    @property
    def busy(self) -> bool:
        """Whether any run has a job queued or running."""
        with self._lock:
            return bool(self._jobs)

    def watch(self, run_id: str, version: int, held_version: int | None) -> None:
        """A job of ``run_id`` on model ``version`` was queued; the agent holds
        ``held_version`` (None: no snapshot). Subscribes unless already subscribed or the held
        snapshot is that version or newer (the job then runs on it, or is refused)."""
        with self._lock:
            self._jobs[run_id] += 1
            if run_id in self._subscribed or (held_version is not None and held_version >= version):
                return
            self._subscribed.add(run_id)
            self._transport.subscribe(self._topics.run_model(run_id), qos=1)

    def release(self, run_id: str) -> None:
        """A job of ``run_id`` ended; the last one unsubscribes (the snapshot held stays)."""
        with self._lock:
            self._jobs[run_id] -= 1
            if self._jobs[run_id] > 0:
                return
            del self._jobs[run_id]
            if run_id not in self._subscribed:
                return
            self._subscribed.discard(run_id)
            try:
                self._transport.unsubscribe(self._topics.run_model(run_id))
            except Exception as exc:  # a closed transport: nothing to receive anyway
                log.info("unsubscribe from %s's model: %s", run_id, exc)

"""The global models a device agent holds, and when it receives them.

A device receives a run's models only while it has a job of that run queued or running, and for
``linger_s`` seconds after the last one ends: a device commanded again soon (asynchronous rounds,
a small fleet that trains every round) finds the newest version already held, and an idle one
leaves (of 400 devices training 20 per round, each would otherwise receive 20 times the models
its own jobs need).

While it receives, it follows the run's patch topic: every version with its pruned tensors'
positions against the masks of the version before it (values absolute, so a patch decodes to
exactly the self-contained snapshot), a fraction of the snapshot's bytes when masks rarely
change. The self-contained snapshot on the model topic is fetched only when the device holds no
model of the run, or when a patch refers to masks it does not hold (it missed a mask change) or
does not decode; it is left again once received (docs/protocol.md, "Models").

Threads: ``receive`` and ``expire`` run on the agent's dispatch thread, ``watch`` there too,
``release`` and ``wait`` on its worker; everything that decides and (un)subscribes holds
one lock, so a command and a job's end never interleave between deciding and subscribing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from device.errors import DecodeError
from device.wire import envelope
from device.wire.codec import KnownMask
from device.wire.messages import ModelSnapshot
from device.wire.topics import TopicKind, Topics
from device.wire.transport import Transport

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LINGER_S", "ModelFeed"]

DEFAULT_LINGER_S = 30.0
"""Seconds a device keeps receiving a run's models after its last job of that run ended."""

_MODEL, _PATCH = TopicKind.RUN_MODEL, TopicKind.RUN_PATCH


class ModelFeed:
    """The newest snapshot of every run this device trains in, and its model subscriptions.

    Counters (cumulative, for status and tests): ``received_bytes`` of model and patch payloads,
    ``snapshots`` and ``patches`` decoded and kept.
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        *,
        linger_s: float = DEFAULT_LINGER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if linger_s < 0:
            raise ValueError(f"model linger must be >= 0 seconds, got {linger_s}")
        self._transport = transport
        self._topics = topics
        self._linger_s = linger_s
        self._clock = clock
        self._cond = threading.Condition()
        self._models: dict[str, ModelSnapshot] = {}
        self._books: dict[str, tuple[int, dict[str, KnownMask]]] = {}  # run -> held masks
        self._jobs: Counter[str] = Counter()
        self._idle_since: dict[str, float] = {}  # runs without jobs that still receive
        self._subscribed: dict[str, set[TopicKind]] = {}
        self.received_bytes = 0
        self.snapshots = 0
        self.patches = 0

    def held(self, run_id: str) -> ModelSnapshot | None:
        """The newest snapshot of ``run_id`` held, or None."""
        with self._cond:
            return self._models.get(run_id)

    @property
    def busy(self) -> bool:
        """Whether any run has a job queued or running."""
        with self._cond:
            return bool(self._jobs)

    def subscriptions(self, run_id: str) -> frozenset[TopicKind]:
        """The model topics of ``run_id`` received now."""
        with self._cond:
            return frozenset(self._subscribed.get(run_id, ()))

    # -- jobs ------------------------------------------------------------------------------

    def watch(self, run_id: str, version: int) -> None:
        """A job of ``run_id`` on model ``version`` was queued: receive the run's models unless
        the snapshot held is that version or newer (the job then runs on it, or is refused)."""
        with self._cond:
            self._jobs[run_id] += 1
            self._idle_since.pop(run_id, None)
            held = self._models.get(run_id)
            if held is not None and held.version >= version:
                return
            if held is None:
                self._subscribe(run_id, _MODEL)
            self._subscribe(run_id, _PATCH)

    def release(self, run_id: str) -> None:
        """A job of ``run_id`` ended; after the last one, the run's models are received for
        ``linger_s`` more seconds (``expire``)."""
        with self._cond:
            self._jobs[run_id] -= 1
            if self._jobs[run_id] > 0:
                return
            del self._jobs[run_id]
            if self._subscribed.get(run_id):
                self._idle_since[run_id] = self._clock()

    def expire(self) -> None:
        """Stop receiving the models of runs idle for ``linger_s`` (called periodically)."""
        now = self._clock()
        with self._cond:
            for run_id, since in list(self._idle_since.items()):
                if now - since >= self._linger_s:
                    del self._idle_since[run_id]
                    for kind in list(self._subscribed.get(run_id, ())):
                        self._unsubscribe(run_id, kind)

    def wait(
        self, run_id: str, version: int, deadline_unix_s: float, *, give_up: Callable[[], bool]
    ) -> ModelSnapshot | None:
        """The snapshot of ``version`` once held; None when a newer one is held instead, at the
        deadline (wall clock, seconds), or when ``give_up()`` turns true."""
        with self._cond:
            while not give_up():
                snap = self._models.get(run_id)
                if snap is not None and snap.version >= version:
                    return snap if snap.version == version else None
                remaining = deadline_unix_s - time.time()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 1.0))
        return None

    def wake(self) -> None:
        """Wake every ``wait`` (to check ``give_up``)."""
        with self._cond:
            self._cond.notify_all()

    # -- messages --------------------------------------------------------------------------

    def receive(self, kind: TopicKind, run_id: str, payload: bytes) -> None:
        """A message on a run's model or patch topic. Raises ``DecodeError`` for one that does
        not decode (after asking for the snapshot, where a job waits for it)."""
        if not payload:
            return  # a cleared retained topic (the run ended)
        self.received_bytes += len(payload)
        held = self.held(run_id)
        if kind == _PATCH:
            version = None
            try:
                version = envelope.peek(payload).model_version
                if held is not None and version is not None and version <= held.version:
                    return  # nothing newer (the retained patch of the version held)
                env = envelope.decode(payload, sparse_weights=True, held=self._book(run_id, held))
            except DecodeError as exc:
                with self._cond:
                    if self._jobs[run_id] > 0 or run_id in self._idle_since:
                        self._subscribe(run_id, _MODEL)
                if exc.reason in ("unknown_mask", "mask_mismatch"):
                    log.info(
                        "%s: patch %s not for the masks held; fetching it whole", run_id, version
                    )
                    return
                raise
        else:
            env = envelope.decode(payload, sparse_weights=True)
        body = env.body
        if not isinstance(body, ModelSnapshot) or env.run_id != run_id:
            raise DecodeError(
                f"the {kind} topic of run {run_id!r} carried a {type(body).__name__} of run "
                f"{env.run_id!r}",
                reason="bad_field",
            )
        with self._cond:
            old = self._models.get(run_id)
            if old is None or body.version > old.version:
                self._models[run_id] = body
                if kind == _PATCH:
                    self.patches += 1
                else:
                    self.snapshots += 1
            if kind == _MODEL:
                self._unsubscribe(run_id, _MODEL)  # patches follow from here
            self._cond.notify_all()

    def _book(self, run_id: str, held: ModelSnapshot | None) -> dict[str, KnownMask] | None:
        """The held snapshot's masks as a mask book; cached per mask version (equal mask
        versions are equal masks, and a patch's digests are checked against them anyway)."""
        if held is None:
            return None
        cached = self._books.get(run_id)
        if cached is not None and cached[0] == held.mask_version:
            return cached[1]
        book = {
            name: KnownMask(version=held.mask_version, mask=mask)
            for name, mask in held.masks.items()
        }
        self._books[run_id] = (held.mask_version, book)
        return book

    def _subscribe(self, run_id: str, kind: TopicKind) -> None:
        subscribed = self._subscribed.setdefault(run_id, set())
        if kind in subscribed:
            return
        subscribed.add(kind)
        self._transport.subscribe(self._topic(run_id, kind), qos=1)

    def _unsubscribe(self, run_id: str, kind: TopicKind) -> None:
        subscribed = self._subscribed.get(run_id, set())
        if kind not in subscribed:
            return
        subscribed.discard(kind)
        if not subscribed:
            del self._subscribed[run_id]
        try:
            self._transport.unsubscribe(self._topic(run_id, kind))
        except Exception as exc:  # a closed transport: nothing to receive anyway
            log.info("unsubscribe from %s's %s: %s", run_id, kind, exc)

    def _topic(self, run_id: str, kind: TopicKind) -> str:
        if kind == _MODEL:
            return self._topics.run_model(run_id)
        return self._topics.run_patch(run_id)

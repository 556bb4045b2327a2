"""One aggregator worker: decode, validate, store, acknowledge and sum a run's updates, and hand
its partial sums over when the coordinator closes a round.

Workers (``AggregatorWorker``, one process each, ``python -m fleet.runtime.aggregator run ...``)
share ``$share/agg/{prefix}/dev/+/up/{run}/#``, so the broker hands each update to one of them. A
worker decodes it, validates it exactly as the runner does (``fleet.strategies.validate`` and
``strategy.check_result``, against the open round and its input checkpoint read from the store,
``RoundContext``; on the sparse representation, ``fleet.strategies.validate.check_sparse``: the
same checks and verdicts), stores it (``Store.record_update``: SQLite WAL, ``BEGIN IMMEDIATE``,
first write wins, so several processes share one store), acknowledges it only then, and adds it
to its exact partial sums (``fleet.strategies.accumulate.Accumulator``).

On the coordinator's close request (``fleet.runtime.coordinator``) a worker takes back the
devices it holds that are not counted (exact subtraction), writes its partial sums to
``{store}/partials/{run}/{round}/{worker}-{request}.npz`` (temporary name, fsync, rename) and
answers with the path on ``agg_partial(run, worker)``.

Chunks: the broker spreads packets, not payloads, so the manifest and chunks of a chunked update
land on different workers (docs/protocol.md). Workers reassemble through the store: their
transport hands shared chunk packets on unassembled (``AggregatorWorker.RECEIVE_LIMITS``); a
worker stores each piece (``Store.store_chunk``/``store_chunk_manifest``: first write wins, one
``BEGIN IMMEDIATE`` transaction) and acknowledges it only then; the worker that stores the last
missing piece gets the payload back from that transaction, verified (sizes, SHA-256), and
handles it as an update that arrived whole, deleting its chunk rows once the update is stored or
rejected (a crash before that leaves them for the redelivered piece to complete again; the
update table counts it once). A manifest over ``max_update_bytes``, pieces that contradict
each other or the digest, and a device holding more than twice ``max_update_bytes`` of chunks
give the transfer up (logged, ``bad_chunk`` rejection); a round's chunks are purged at its
close and unfinished transfers after ``CHUNK_MAX_AGE_S``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device.errors import DecodeError, ValidationError
from device.wire import envelope
from device.wire.chunking import ReassemblyLimits, peek_chunk_kind
from device.wire.messages import Chunk, ChunkManifest, DeviceUpdate
from device.wire.topics import TopicKind, Topics, split_chunk_topic
from device.wire.transport import Message, Transport
from fleet.runtime.round_context import RoundContext
from fleet.state.store import ChunkKey, ChunkOutcome, Store, StoreConflictError
from fleet.strategies.validate import ModelIndex, SparseResult, check_sparse

log = logging.getLogger(__name__)

DEFAULT_GROUP = "agg"
"""The shared-subscription group of a run's workers (``$share/{group}/...``)."""
PARTIALS_DIR = "partials"
"""Where partial sums are handed over, under the store's root."""


def _partial_path(store: Store, run_id: str, round_: int, worker_id: str, request: str) -> Path:
    return store.root / PARTIALS_DIR / run_id / str(round_) / f"{worker_id}-{request}.npz"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AggregatorWorker:
    """One aggregator worker of one run (module docstring). Single-threaded: call ``run``.

    Its transport must pass shared chunks on (``RECEIVE_LIMITS``; ``fleet aggregator run``
    builds it so) for chunked updates to be reassembled through the store; with a transport
    that reassembles itself the worker still takes the whole updates it is given.
    """

    RECEIVE_LIMITS = ReassemblyLimits(deliver_shared_chunks=True)
    """``MqttTransport(..., reassembly=AggregatorWorker.RECEIVE_LIMITS)`` for a worker."""
    CHUNK_MAX_AGE_S = 600.0
    """Chunks of a transfer not completed within this many seconds are purged."""
    PURGE_EVERY_S = 30.0

    def __init__(
        self,
        transport: Transport,
        store: Store,
        run_id: str,
        worker_id: str,
        *,
        topics: Topics | None = None,
        group: str = DEFAULT_GROUP,
    ) -> None:
        self.transport = transport
        self.store = store
        self.run_id = run_id
        self.worker_id = worker_id
        self.topics = topics or Topics()
        self.group = group
        self._close_topic = self.topics.agg_close(run_id)
        self._rounds: dict[int, RoundContext] = {}
        self._indexes: dict[int, ModelIndex] = {}
        self._next_purge = 0.0
        self.accepted = 0
        self.rejected = 0
        self.chunks_stored = 0
        self.reassembled = 0

    def connect(self) -> None:
        self.transport.connect()
        self.transport.subscribe(self._close_topic, qos=1)
        self.transport.subscribe(self.topics.shared_updates(self.group, self.run_id), qos=1)
        # Presence: the coordinator can wait until its workers share the subscription (a shared
        # group with no member drops what devices publish meanwhile).
        hello = {"worker": self.worker_id, "round": 0, "request": "", "hello": True}
        self.transport.publish(
            self.topics.agg_partial(self.run_id, self.worker_id), json.dumps(hello).encode()
        )

    def run(self, stop: threading.Event) -> None:
        """Handle messages until ``stop`` is set."""
        while not stop.is_set():
            message = self.transport.get(timeout_s=0.2)
            if message is not None:
                self.handle(message)
            self._purge_stale_chunks()

    def handle(self, message: Message) -> None:
        """Handle one message; never raises for anything a device sent."""
        try:
            if message.topic == self._close_topic:
                self._on_close(message.payload)
            else:
                parsed = self.topics.parse(message.topic)
                if (
                    parsed.kind is TopicKind.DEV_UPDATE
                    and parsed.run_id == self.run_id
                    and parsed.round > 0  # round 0 is the initial job: the coordinator's
                ):
                    kind = peek_chunk_kind(message.payload)
                    if kind is None:
                        self._on_update(parsed.device_id, parsed.round, message)
                    else:
                        self._on_chunk(parsed.device_id, parsed.round, message)
                    return  # acknowledged inside, after the write
        except Exception:  # a device message must never stop the worker
            log.exception("worker %s: error handling %s", self.worker_id, message.topic)
        self.transport.ack(message)

    def _context(self) -> RoundContext | None:
        record = self.store.find_open_round(self.run_id)
        if record is None:
            return None
        ctx = self._rounds.get(record.round)
        if ctx is None:
            ctx = RoundContext.load(self.store, self.run_id)
            if ctx is None:
                return None
            self._rounds[ctx.round.round] = ctx
        return ctx

    def _validate(
        self, ctx: RoundContext, device_id: str, round_: int, payload: bytes
    ) -> tuple[DeviceUpdate, SparseResult]:
        """``ctx.validate`` on the sparse representation
        (``fleet.strategies.validate.check_sparse``: the same checks, reasons and verdicts,
        without the dense copies)."""
        update = ctx.routed(device_id, self.run_id, round_, payload)
        index = self._indexes.get(ctx.round.round)
        if index is None or index.model is not ctx.model:
            index = self._indexes[ctx.round.round] = ModelIndex(ctx.model)
        result = check_sparse(
            update,
            ctx.model,
            ctx.strategy,
            device_id=device_id,
            model_digest=ctx.digest,
            model_index=index,
        )
        return update, result

    def _on_update(
        self,
        device_id: str,
        round_: int,
        message: Message,
        decided: Callable[[], None] | None = None,
    ) -> None:
        """Validate, store, then acknowledge one whole update. ``decided`` runs once the
        update's fate is durable, before the acknowledgement (deleting its chunk rows)."""

        def ack() -> None:
            if decided is not None:
                decided()
            self.transport.ack(message)

        ctx = self._rounds.get(round_) or self._context()
        try:
            stored = self.store.get_update(self.run_id, round_, device_id)
            if stored is not None:
                if stored.payload_digest != hashlib.sha256(message.payload).hexdigest():
                    raise ValidationError(
                        f"a different update for round {round_} after the one already stored",
                        reason="duplicate",
                    )
                # A redelivery, or somebody's replay: changes nothing, counts against nobody.
                log.info("repeated update from %s for round %d ignored", device_id, round_)
                ack()
                return
            if ctx is None:
                raise self._not_open(round_)
            update, result = self._validate(ctx, device_id, round_, message.payload)
            try:
                is_new = self.store.record_update(
                    self.run_id,
                    round_,
                    device_id,
                    message.payload,
                    result.num_examples,
                    {"train_s": update.train_s, "worker": self.worker_id},
                )
            except StoreConflictError as exc:
                raise self._not_open(round_, str(exc)) from exc
        except ValidationError as exc:
            log.warning(
                "worker %s rejected %s round %d: %s", self.worker_id, device_id, round_, exc
            )
            self.store.record_rejection(self.run_id, round_, device_id, exc.reason, str(exc))
            self.rejected += 1
            ack()
            return
        ack()  # only now: the update is durable
        if is_new:
            assert ctx is not None
            ctx.acc.add_sparse(result)
            self.accepted += 1

    def _not_open(self, round_: int, detail: str = "") -> ValidationError:
        """Why an update for a round that is not open is refused, by its round alone (as the
        runner judges it): ``late`` for the round that closed last, ``stale_round`` for older
        ones, ``future_round`` for one not opened yet."""
        current = self.store.get_run(self.run_id).current_round  # the last round opened
        last_closed = current - 1 if self.store.find_open_round(self.run_id) else current
        if round_ > current:
            reason = "future_round"
        elif round_ >= last_closed:
            reason = "late"
        else:
            reason = "stale_round"
        return ValidationError(detail or f"round {round_} is not open", reason=reason)

    # -- chunked updates: reassembly through the store ---------------------------------------

    def _on_chunk(self, device_id: str, round_: int, message: Message) -> None:
        """Store one manifest or chunk of a chunked update (the broker spreads the pieces over
        the workers), acknowledge it once stored, and when this piece completed the transfer
        handle the reassembled payload as a whole update."""
        ctx = self._rounds.get(round_) or self._context()
        if ctx is None or ctx.round.round != round_:
            log.warning(
                "worker %s: chunk of %s for round %d dropped: the round is not open",
                self.worker_id,
                device_id,
                round_,
            )
            self.transport.ack(message)
            return
        if self.store.get_update(self.run_id, round_, device_id) is not None:
            self.transport.ack(message)  # the device's update of this round is decided
            return
        base = message.topic
        try:
            body = envelope.decode(message.payload).body
            key, outcome = self._store_piece(device_id, round_, ctx, body, message.topic)
            if isinstance(body, Chunk):
                base = self.topics.dev_update(device_id, self.run_id, round_)
        except (DecodeError, ValidationError) as exc:
            self._reject_chunk(device_id, round_, str(exc))
            self.transport.ack(message)
            return
        if outcome.problem:
            self._reject_chunk(device_id, round_, f"chunked update given up: {outcome.problem}")
            self.transport.ack(message)
            return
        self.chunks_stored += int(outcome.new)
        if outcome.payload is None:
            self.transport.ack(message)  # stored durably; another piece completes it
            return
        self.reassembled += 1
        whole = Message(base, outcome.payload, message.qos, message.retain, message.ack_ids)
        self._on_update(device_id, round_, whole, lambda: self._forget_chunks(key))

    def _store_piece(
        self, device_id: str, round_: int, ctx: RoundContext, body: object, topic: str
    ) -> tuple[ChunkKey, ChunkOutcome]:
        if isinstance(body, ChunkManifest):
            key = ChunkKey(self.run_id, round_, device_id, bytes(body.sha256))
            self._check_sha(key)
            outcome = self.store.store_chunk_manifest(
                key,
                body.total_bytes,
                body.chunk_count,
                body.chunk_bytes,
                max_payload_bytes=ctx.max_update_bytes,
            )
            return key, outcome
        if isinstance(body, Chunk):
            split = split_chunk_topic(topic)
            if split is None or split[1] != body.index:
                raise ValidationError(f"chunk {body.index} on {topic!r}", reason="bad_chunk")
            key = ChunkKey(self.run_id, round_, device_id, bytes(body.sha256))
            self._check_sha(key)
            # A device may hold about two updates' worth of chunks: one transfer in flight and
            # one it gave up on; anything beyond is refused (and logged), not stored.
            outcome = self.store.store_chunk(
                key, body.index, bytes(body.data), max_device_bytes=2 * ctx.max_update_bytes
            )
            return key, outcome
        raise ValidationError(f"{type(body).__name__} is not a chunk", reason="bad_chunk")

    def _forget_chunks(self, key: ChunkKey) -> None:
        self.store.delete_chunk_set(key)

    @staticmethod
    def _check_sha(key: ChunkKey) -> None:
        if len(key.sha256) != 32:
            raise ValidationError(
                f"chunk sha256 of {len(key.sha256)} bytes, expected 32", reason="bad_chunk"
            )

    def _reject_chunk(self, device_id: str, round_: int, why: str) -> None:
        log.warning("worker %s: chunk of %s round %d: %s", self.worker_id, device_id, round_, why)
        self.store.record_rejection(self.run_id, round_, device_id, "bad_chunk", why)
        self.rejected += 1

    def _purge_stale_chunks(self) -> None:
        """Every ``PURGE_EVERY_S``: drop transfers older than ``CHUNK_MAX_AGE_S``."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + self.PURGE_EVERY_S
        try:
            cutoff = self.store.now() - self.CHUNK_MAX_AGE_S
            purged = self.store.purge_chunks(self.run_id, received_before=cutoff)
        except Exception:  # the store is busy or gone: try again later
            log.exception("worker %s: purging stale chunks failed", self.worker_id)
            return
        if purged:
            log.info("worker %s: purged %d stale chunk rows", self.worker_id, purged)

    def _on_close(self, payload: bytes) -> None:
        request = json.loads(payload)
        round_, req_id = int(request["round"]), str(request["request"])
        counted = set(request["devices"])
        ctx = self._rounds.get(round_)
        if ctx is None:
            ctx = self._context()
            if ctx is None or ctx.round.round != round_:
                ctx = None
        devices: list[str] = []
        path = ""
        if ctx is not None:
            for device_id in sorted(set(ctx.acc.devices) - counted):
                # Accepted after the coordinator's snapshot: not counted, so not in the partial.
                ctx.acc.remove(ctx.stored_result(self.store, device_id))
            devices = sorted(ctx.acc.devices)
            if devices:
                target = _partial_path(self.store, self.run_id, round_, self.worker_id, req_id)
                _write_atomic(target, ctx.acc.to_bytes())
                path = str(target)
        for r in [r for r in self._rounds if r <= round_]:
            del self._rounds[r]
        for r in [r for r in self._indexes if r <= round_]:
            del self._indexes[r]
        # Transfers of the closing round can no longer count here: their chunks go.
        self.store.purge_chunks(self.run_id, rounds_up_to=round_)
        notice = {"round": round_, "request": req_id, "worker": self.worker_id}
        notice.update({"devices": devices, "path": path})
        self.transport.publish(
            self.topics.agg_partial(self.run_id, self.worker_id),
            json.dumps(notice).encode(),
            qos=1,
        )

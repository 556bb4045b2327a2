"""Sharded aggregation: aggregator workers on a shared subscription and the coordinator's handover.

Workers (``AggregatorWorker``, one process each, ``python -m fleet.runtime.aggregator run ...``)
share ``$share/agg/{prefix}/dev/+/up/{run}/#``, so the broker hands each update to one of them. A
worker decodes it, validates it exactly as the runner does (``fleet.strategies.validate`` and
``strategy.check_result``, against the open round and its input checkpoint read from the store;
on the sparse representation, ``fleet.strategies.validate.check_sparse``: the same checks and
verdicts),
stores it (``Store.record_update``: SQLite WAL, ``BEGIN IMMEDIATE``, first write wins, so several
processes share one store), acknowledges it only then, and adds it to its exact partial sums
(``fleet.strategies.accumulate.Accumulator``).

Handover (``Coordinator.collect``): the coordinator publishes ``{round, request, devices}`` on
``agg_close(run)``, where ``devices`` are the updates it counts (the round's accepted rows at the
close). Each worker takes back the devices it holds that are not counted (exact subtraction),
writes its partial sums to ``{store}/partials/{run}/{round}/{worker}-{request}.npz`` (temporary
name, fsync, rename) and answers with the path on ``agg_partial(run, worker)``. The coordinator
merges the partials whose devices are disjoint and counted; every counted device that no partial
covered by ``timeout_s`` (its worker died, hung, or restarted empty) is decoded again from the
store and added by the coordinator itself. Acknowledged updates are always in the store, so a
worker killed at any moment loses nothing; unacknowledged ones stay in its persistent MQTT
session, which a worker restarted with the same id resumes (mosquitto keeps a dead member's
share of in-flight messages for its session rather than giving it to another member).

Exact integer partial sums make the new model independent of how updates were spread: K = 1
and K = 3 workers, or the coordinator alone, give the same bits (``aggregate_exact``).

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

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.errors import (
    ConfigError,
    DecodeError,
    NotFoundError,
    SparseFleetError,
    ValidationError,
)
from device.wire import envelope
from device.wire.chunking import ReassemblyLimits, peek_chunk_kind
from device.wire.codec import KnownMask, model_digest
from device.wire.messages import Chunk, ChunkManifest, DeviceUpdate
from device.wire.mqtt import MqttTransport, TlsSettings, parse_broker_url
from device.wire.topics import TopicKind, Topics, split_chunk_topic
from device.wire.transport import Message, Transport
from fleet.state.store import ChunkKey, ChunkOutcome, RoundRecord, Store, StoreConflictError
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import Accumulator
from fleet.strategies.base import ClientResult, GlobalModel, Strategy
from fleet.strategies.validate import (
    Expectation,
    ModelIndex,
    SparseResult,
    check_routing,
    check_sparse,
    reconstruct,
)

__all__ = [
    "AggregatorWorker",
    "BrokerLogin",
    "Coordinator",
    "Handover",
    "LocalWorkers",
    "RoundContext",
    "local_worker_id",
    "main",
    "run_worker",
    "start_workers",
    "stop_workers",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "agg"
PARTIALS_DIR = "partials"


@dataclass
class RoundContext:
    """What validating an update of one open round needs, read from the store."""

    run_id: str
    round: RoundRecord
    model: GlobalModel
    digest: bytes
    book: dict[str, KnownMask]
    strategy: Strategy
    max_update_bytes: int
    acc: Accumulator = field(init=False)

    def __post_init__(self) -> None:
        self.acc = Accumulator.for_model(self.strategy.name, self.model)

    @classmethod
    def load(cls, store: Store, run_id: str) -> RoundContext | None:
        """The open round of ``run_id`` with its input model, or None when no round is open."""
        record = store.find_open_round(run_id)
        if record is None:
            return None
        config = store.get_run(run_id).config
        checkpoint = store.load_checkpoint(run_id, record.model_version_in)
        model = GlobalModel(
            version=checkpoint.record.version,
            weights=dict(checkpoint.weights),
            masks=dict(checkpoint.masks),
            model_name=str(config["model_name"]),
        )
        strategy = create_strategy(str(config["strategy"]), **dict(config["strategy_options"]))
        strategy.load_state_dict(dict(checkpoint.extra_state))
        mask_version = int(checkpoint.record.meta.get("mask_version", model.version))
        book = {n: KnownMask(version=mask_version, mask=m) for n, m in model.masks.items()}
        return cls(
            run_id,
            record,
            model,
            model_digest(model.weights, model.masks),
            book,
            strategy,
            int(config.get("max_update_bytes", 256 * 1024 * 1024)),
        )

    def book_for(self, version: int) -> dict[str, KnownMask] | None:
        return self.book if version == self.model.version else None

    def routed(
        self, device_id: str, topic_run: str, topic_round: int, payload: bytes
    ) -> DeviceUpdate:
        """Decode an update and check that it belongs to this round and device, as the runner
        does (size limit, envelope, ``check_routing``); ``ValidationError`` says why not."""
        if len(payload) > self.max_update_bytes:
            raise ValidationError(
                f"{len(payload)} bytes exceeds the limit {self.max_update_bytes}",
                reason="oversized",
            )
        try:
            env = envelope.decode(payload, book_for=self.book_for, max_bytes=self.max_update_bytes)
        except DecodeError as exc:
            raise ValidationError(str(exc), reason=f"decode:{exc.reason}") from exc
        exp = Expectation(
            self.run_id, self.round.round, tuple(self.round.selected), self.model, self.digest
        )
        return check_routing(env, device_id, topic_run, topic_round, exp)

    def validate(
        self, device_id: str, topic_run: str, topic_round: int, payload: bytes
    ) -> tuple[DeviceUpdate, ClientResult]:
        """Decode and check an update as the runner does; ``ValidationError`` says why not."""
        update = self.routed(device_id, topic_run, topic_round, payload)
        result = reconstruct(update, self.model, device_id=device_id, model_digest=self.digest)
        self.strategy.check_result(self.model, result)
        return update, result

    def stored_result(self, store: Store, device_id: str) -> ClientResult:
        """A stored update of this round, decoded and validated again (recovery, removal)."""
        row = store.get_update(self.run_id, self.round.round, device_id)
        if row is None:
            raise NotFoundError(f"no stored update of {device_id!r} for round {self.round.round}")
        _, result = self.validate(device_id, self.run_id, self.round.round, row.load_payload())
        return result


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
            if ctx is None:
                raise ValidationError(f"round {round_} is not open", reason="late")
            if self.store.get_update(self.run_id, round_, device_id) is not None:
                log.info("duplicate update from %s for round %d ignored", device_id, round_)
                ack()
                return
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
                raise ValidationError(str(exc), reason="late") from exc
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


@dataclass(frozen=True)
class Handover:
    """How a round's partial sums came together: which workers answered, which devices the
    coordinator had to recover from the store itself."""

    partials: tuple[str, ...]
    recovered: tuple[str, ...]
    wall_s: float


class Coordinator:
    """The coordinator's side of the handover; its own transport (client id) and the store."""

    def __init__(
        self, transport: Transport, store: Store, run_id: str, *, topics: Topics | None = None
    ) -> None:
        self.transport = transport
        self.store = store
        self.run_id = run_id
        self.topics = topics or Topics()

    def connect(self) -> None:
        self.transport.connect()
        self.transport.subscribe(self.topics.all_agg_partials(self.run_id), qos=1)

    def wait_for_workers(self, worker_ids: Sequence[str], timeout_s: float) -> None:
        """Block until every worker in ``worker_ids`` has announced itself since ``connect``."""
        waiting = set(worker_ids)
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            message = self.transport.get(timeout_s=0.2)
            if message is None:
                continue
            try:
                notice = json.loads(message.payload)
                if notice.get("hello"):
                    waiting.discard(str(notice["worker"]))
            except (ValueError, KeyError) as exc:
                log.warning("ignored notice on %s: %s", message.topic, exc)
            self.transport.ack(message)
        if waiting:
            raise TimeoutError(f"aggregator workers {sorted(waiting)} did not start")

    def collect(
        self,
        strategy: Strategy,
        round_: int,
        model: GlobalModel,
        devices: Sequence[str],
        *,
        timeout_s: float = 10.0,
    ) -> tuple[GlobalModel, Handover]:
        """The next global model from the counted ``devices`` (their updates are stored).

        Waits up to ``timeout_s`` for the workers' partials, then decodes whatever no partial
        covered from the store. ``strategy`` is the coordinator's (its state moves on).
        """
        start = time.monotonic()
        ctx = RoundContext.load(self.store, self.run_id)
        if ctx is None or ctx.round.round != round_:
            raise NotFoundError(f"round {round_} of run {self.run_id!r} is not open")
        want = set(devices)
        req_id = secrets.token_hex(8)
        request = {"round": round_, "request": req_id, "devices": sorted(want)}
        self.transport.publish(self.topics.agg_close(self.run_id), json.dumps(request).encode())
        acc = Accumulator.for_model(strategy.name, model)
        covered: set[str] = set()
        partials: list[str] = []
        deadline = start + timeout_s
        while covered != want and time.monotonic() < deadline:
            message = self.transport.get(timeout_s=min(0.2, max(0.0, deadline - time.monotonic())))
            if message is None:
                continue
            try:
                self._take(message, round_, req_id, want, covered, acc, partials)
            except (ValueError, OSError, KeyError) as exc:
                log.warning("ignored partial on %s: %s", message.topic, exc)
            self.transport.ack(message)
        missing = sorted(want - covered)
        for device_id in missing:
            acc.add(ctx.stored_result(self.store, device_id))
        new_model = acc.finish(strategy, round_, model)
        return new_model, Handover(tuple(partials), tuple(missing), time.monotonic() - start)

    def _take(
        self,
        message: Message,
        round_: int,
        req_id: str,
        want: set[str],
        covered: set[str],
        acc: Accumulator,
        partials: list[str],
    ) -> None:
        notice: dict[str, Any] = json.loads(message.payload)
        if notice.get("request") != req_id or notice.get("round") != round_:
            return  # an answer to an earlier request
        if not notice["path"]:
            return  # the worker holds nothing of this round
        path = Path(notice["path"])
        try:
            part = Accumulator.from_bytes(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)
        mine = set(part.devices)
        if not mine <= want or mine & covered:
            raise ValueError(
                f"partial of {notice['worker']} holds devices {sorted(mine - want)[:5]} not "
                f"counted or {sorted(mine & covered)[:5]} already covered; recovering them"
            )
        acc.merge(part)
        covered |= mine
        partials.append(str(notice["worker"]))


# -- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerLogin:
    """How a worker logs in to the broker: an account (the password read from a file, never
    put on a command line) and TLS files. All None: anonymous, plain MQTT (a local mosquitto).
    """

    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def argv(self) -> list[str]:
        """These settings as ``fleet.runtime.aggregator run`` options."""
        out: list[str] = []
        for flag, value in (
            ("--username", self.username),
            ("--password-file", self.password_file),
            ("--ca-file", self.ca_file),
            ("--cert-file", self.cert_file),
            ("--key-file", self.key_file),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out + (["--insecure"] if self.insecure else [])

    def password(self) -> str | None:
        """The first line of ``password_file`` (None without one); ``ConfigError`` if unreadable
        or empty."""
        if self.password_file is None:
            return None
        try:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"password file {self.password_file}: {exc.strerror}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"password file {self.password_file} is empty")
        return lines[0].strip()

    def tls(self, url: str) -> TlsSettings | None:
        """TLS settings for ``url``: the files given, or the system's CAs for ``mqtts://``."""
        if any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            return TlsSettings(
                ca_file=None if self.ca_file is None else str(self.ca_file),
                cert_file=None if self.cert_file is None else str(self.cert_file),
                key_file=None if self.key_file is None else str(self.key_file),
                insecure=self.insecure,
            )
        return TlsSettings(insecure=self.insecure) if parse_broker_url(url).tls else None


def local_worker_id(run_id: str, index: int) -> str:
    """The id (MQTT client id) of local worker ``index`` of ``run_id``: stable, so a restarted
    worker resumes the session, and the updates, of the one it replaces."""
    return f"{run_id}-agg-{index}"


def start_workers(
    count: int,
    broker_url: str,
    state_dir: Path | str,
    run_id: str,
    *,
    prefix: str = "fl/v1",
    group: str = DEFAULT_GROUP,
    first: int = 0,
    login: BrokerLogin | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes (ids ``local_worker_id(run_id, i)``); the caller stops them
    with ``stop_workers`` (SIGTERM: finish the message at hand, close the session cleanly)."""
    if count < 1:
        raise ValueError(f"need at least one worker, got {count}")
    procs = []
    for i in range(first, first + count):
        argv = [sys.executable, "-m", "fleet.runtime.aggregator", "run", "--broker", broker_url]
        argv += [
            "--state",
            str(state_dir),
            "--run",
            run_id,
            "--worker-id",
            local_worker_id(run_id, i),
        ]
        argv += ["--prefix", prefix, "--group", group]
        argv += (login or BrokerLogin()).argv()
        procs.append(subprocess.Popen(argv))
    return procs


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """Stop worker processes and reap them: SIGTERM, wait up to ``timeout_s`` in all, then
    SIGKILL whatever still runs. Never leaves a child behind (nor a zombie)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("aggregator worker pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()


class LocalWorkers:
    """``count`` local worker processes of one run, kept alive: ``respawn_dead`` restarts a
    worker that died under the same id, so its persistent session (and the unacknowledged
    updates the broker keeps for it) is taken up again. A context manager: leaving it stops
    and reaps every process, on errors and Ctrl-C too."""

    def __init__(
        self,
        count: int,
        broker_url: str,
        state_dir: Path | str,
        run_id: str,
        *,
        prefix: str = "fl/v1",
        group: str = DEFAULT_GROUP,
        login: BrokerLogin | None = None,
        max_restarts: int = 20,
    ) -> None:
        if count < 1:
            raise ValueError(f"need at least one worker, got {count}")
        self.max_restarts = max_restarts
        self.count = count
        self.broker_url = broker_url
        self.state_dir = Path(state_dir)
        self.run_id = run_id
        self.prefix = prefix
        self.group = group
        self.login = login
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    @property
    def ids(self) -> list[str]:
        return [local_worker_id(self.run_id, i) for i in range(self.count)]

    def _start(self, index: int) -> None:
        (proc,) = start_workers(
            1,
            self.broker_url,
            self.state_dir,
            self.run_id,
            prefix=self.prefix,
            group=self.group,
            first=index,
            login=self.login,
        )
        self.procs[index] = proc

    def start(self) -> LocalWorkers:
        for index in range(self.count):
            if index not in self.procs:
                self._start(index)
        return self

    def respawn_dead(self) -> list[str]:
        """Restart every worker whose process has exited; returns their ids.

        Raises ``SparseFleetError`` once more than ``max_restarts`` restarts were needed (a
        worker that cannot start, e.g. refused by the broker, would otherwise loop forever).
        """
        restarted = []
        for index, proc in sorted(self.procs.items()):
            code = proc.poll()
            if code is not None:
                if self.restarts >= self.max_restarts:
                    raise SparseFleetError(
                        f"aggregator worker {local_worker_id(self.run_id, index)} exited with "
                        f"status {code} after {self.restarts} restarts of this run's workers; "
                        "see their log"
                    )
                log.warning(
                    "aggregator worker %s exited (%d); restarting it",
                    local_worker_id(self.run_id, index),
                    code,
                )
                self._start(index)
                self.restarts += 1
                restarted.append(local_worker_id(self.run_id, index))
        return restarted

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_workers(list(self.procs.values()), timeout_s)

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_worker(
    broker_url: str,
    state_dir: Path | str,
    run_id: str,
    worker_id: str,
    *,
    prefix: str = "fl/v1",
    group: str = DEFAULT_GROUP,
    login: BrokerLogin | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run one worker until ``stop`` is set, or SIGTERM/SIGINT when called from the main thread.

    Raises ``NotFoundError`` when ``state_dir`` holds no store, ``BrokerUnavailableError`` when
    the broker cannot be reached, ``ConfigError`` for an unreadable password file.
    """
    login = login or BrokerLogin()
    stop = stop or threading.Event()
    password = login.password()
    store = Store(state_dir, create=False)
    previous: dict[int, Any] = {}
    try:
        transport = MqttTransport.from_url(
            broker_url,
            worker_id,
            manual_ack=True,
            username=login.username,
            password=password,
            tls=login.tls(broker_url),
            reassembly=AggregatorWorker.RECEIVE_LIMITS,
        )
        worker = AggregatorWorker(
            transport, store, run_id, worker_id, topics=Topics(prefix), group=group
        )
        try:
            worker.connect()
            if threading.current_thread() is threading.main_thread():
                # Stop between messages, never inside one (a half-stored update); the previous
                # handlers come back afterwards (the caller may be a CLI or a test process).
                for sig in (signal.SIGTERM, signal.SIGINT):
                    previous[sig] = signal.signal(sig, lambda *_: stop.set())
            log.info("aggregator worker %s running for run %s", worker_id, run_id)
            worker.run(stop)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            transport.close()
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.runtime.aggregator run``: one worker until SIGTERM/SIGINT. Returns the exit
    status (``fleet aggregator run`` is the same through the CLI)."""
    parser = argparse.ArgumentParser(prog="fleet aggregator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one aggregator worker")
    run.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    run.add_argument("--state", required=True, type=Path, help="the fleet manager's state dir")
    run.add_argument("--run", required=True, dest="run_id", help="run id")
    run.add_argument("--worker-id", required=True, help="MQTT client id (stable across restarts)")
    run.add_argument("--prefix", default="fl/v1", help="topic prefix")
    run.add_argument("--group", default=DEFAULT_GROUP, help="shared-subscription group")
    run.add_argument("--username", help="broker account")
    run.add_argument("--password-file", type=Path, help="file whose first line is the password")
    run.add_argument("--ca-file", type=Path, help="CA certificate that verifies the broker")
    run.add_argument("--cert-file", type=Path, help="client certificate")
    run.add_argument("--key-file", type=Path, help="client certificate's key")
    run.add_argument("--insecure", action="store_true", help="skip the TLS host-name check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    login = BrokerLogin(
        args.username,
        args.password_file,
        args.ca_file,
        args.cert_file,
        args.key_file,
        args.insecure,
    )
    try:
        run_worker(
            args.broker,
            args.state,
            args.run_id,
            args.worker_id,
            prefix=args.prefix,
            group=args.group,
            login=login,
        )
    except SparseFleetError as exc:
        print(f"fleet aggregator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sharded aggregation: aggregator workers on a shared subscription and the coordinator's handover.

Workers (``AggregatorWorker``, one process each, ``python -m fleet.aggregator run ...``) share
``$share/agg/{prefix}/dev/+/up/{run}/#``, so the broker hands each update to one of them. A
worker decodes it, validates it exactly as the runner does (``fleet.validate`` and
``strategy.check_result``, against the open round and its input checkpoint read from the store),
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

Chunks: the broker spreads packets, not payloads, so a chunked update would be split over
workers (docs/protocol.md). Sharded runs need updates that fit the broker's maximum packet size
(mosquitto: ``max_packet_size``), or a broker that keeps one publisher's messages on one member
(EMQX ``shared_subscription_strategy = hash_clientid``; broker/cluster/README.md). A worker that
gets a chunk it cannot complete logs it; the device's update then misses the round.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.errors import DecodeError, NotFoundError, ValidationError
from device.wire import envelope
from device.wire.codec import KnownMask, model_digest
from device.wire.messages import DeviceUpdate
from device.wire.mqtt import MqttTransport
from device.wire.topics import TopicKind, Topics
from device.wire.transport import Message, Transport
from fleet.store import RoundRecord, Store, StoreConflictError
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import Accumulator
from fleet.strategies.base import ClientResult, GlobalModel, Strategy
from fleet.validate import Expectation, check_routing, reconstruct

__all__ = [
    "AggregatorWorker",
    "Coordinator",
    "Handover",
    "RoundContext",
    "main",
    "start_workers",
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

    def validate(
        self, device_id: str, topic_run: str, topic_round: int, payload: bytes
    ) -> tuple[DeviceUpdate, ClientResult]:
        """Decode and check an update as the runner does; ``ValidationError`` says why not."""
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
        update = check_routing(env, device_id, topic_run, topic_round, exp)
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
    """One aggregator worker of one run (module docstring). Single-threaded: call ``run``."""

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
        self.accepted = 0
        self.rejected = 0

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
                    self._on_update(parsed.device_id, parsed.round, message)
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

    def _on_update(self, device_id: str, round_: int, message: Message) -> None:
        ctx = self._rounds.get(round_) or self._context()
        try:
            if ctx is None:
                raise ValidationError(f"round {round_} is not open", reason="late")
            if self.store.get_update(self.run_id, round_, device_id) is not None:
                log.info("duplicate update from %s for round %d ignored", device_id, round_)
                self.transport.ack(message)
                return
            update, result = ctx.validate(device_id, self.run_id, round_, message.payload)
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
            self.transport.ack(message)
            return
        self.transport.ack(message)  # only now: the update is durable
        if is_new:
            assert ctx is not None
            ctx.acc.add(result)
            self.accepted += 1

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


def start_workers(
    count: int,
    broker_url: str,
    state_dir: Path | str,
    run_id: str,
    *,
    prefix: str = "fl/v1",
    group: str = DEFAULT_GROUP,
    first: int = 0,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes (ids ``{run_id}-agg-{i}``); the caller stops them
    (SIGTERM: finish the message at hand, close the session cleanly)."""
    if count < 1:
        raise ValueError(f"need at least one worker, got {count}")
    procs = []
    for i in range(first, first + count):
        argv = [sys.executable, "-m", "fleet.aggregator", "run", "--broker", broker_url]
        argv += ["--state", str(state_dir), "--run", run_id, "--worker-id", f"{run_id}-agg-{i}"]
        argv += ["--prefix", prefix, "--group", group]
        procs.append(subprocess.Popen(argv))
    return procs


def main(argv: Sequence[str] | None = None) -> int:
    """``fleet aggregator run``: one worker until SIGTERM/SIGINT. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="fleet aggregator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one aggregator worker")
    run.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    run.add_argument("--state", required=True, type=Path, help="the fleet manager's state dir")
    run.add_argument("--run", required=True, dest="run_id", help="run id")
    run.add_argument("--worker-id", required=True, help="MQTT client id (stable across restarts)")
    run.add_argument("--prefix", default="fl/v1", help="topic prefix")
    run.add_argument("--group", default=DEFAULT_GROUP, help="shared-subscription group")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    store = Store(args.state, create=False)
    transport = MqttTransport.from_url(args.broker, args.worker_id, manual_ack=True)
    worker = AggregatorWorker(
        transport, store, args.run_id, args.worker_id, topics=Topics(args.prefix), group=args.group
    )
    worker.connect()
    log.info("aggregator worker %s running for run %s", args.worker_id, args.run_id)
    try:
        worker.run(stop)
    finally:
        transport.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

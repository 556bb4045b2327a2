"""The coordinator's side of sharded aggregation: wait for the workers, then collect a round's
partial sums into the next global model.

Handover (``Coordinator.collect``): the coordinator publishes ``{round, request, devices}`` on
``agg_close(run)``, where ``devices`` are the updates it counts (the round's accepted rows at the
close). Each worker (``fleet.runtime.worker``) answers with the path of its partial sums on
``agg_partial(run, worker)``. The coordinator merges the partials whose devices are disjoint and
counted; every counted device that no partial covered by ``timeout_s`` (its worker died, hung,
or restarted empty) is decoded again from the store and added by the coordinator itself.
Acknowledged updates are always in the store, so a worker killed at any moment loses nothing;
unacknowledged ones stay in its persistent MQTT session, which a worker restarted with the same
id resumes (mosquitto keeps a dead member's share of in-flight messages for its session rather
than giving it to another member).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.errors import NotFoundError
from device.wire.topics import Topics
from device.wire.transport import Message, Transport
from fleet.runtime.round_context import RoundContext
from fleet.state.store import Store
from fleet.strategies.accumulate import Accumulator
from fleet.strategies.base import GlobalModel, Strategy

log = logging.getLogger(__name__)


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

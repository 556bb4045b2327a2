"""One round in progress and when it closes: k of n updates, every selected device answered,
or the deadline; and the round's close in the store (counted and dropped updates).

In sharded mode (``fleet.runtime.coordinator``) the aggregator workers decode, validate and
store the round's updates; the runner learns which were accepted by polling the store
(``Collector.poll_stored``, every ``POLL_S``). An update a worker stores between the runner's
decision to close and the close itself is dropped, as a late one would be
(``Collector.close_in_store``), never left undecided.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from device.wire.messages import Readjust
from device.wire.transport import Message, Transport
from fleet.runtime.spec import ClosedBy, ProgressCallback, RunSpec
from fleet.state.store import Store, StoreConflictError, UpdateRecord
from fleet.strategies.base import ClientResult

log = logging.getLogger(__name__)

POLL_S = 0.2
"""Sharded mode: seconds between two looks at the store for the workers' accepted updates."""
CLOSE_ATTEMPTS = 5
"""Sharded mode: tries of ``Store.close_round`` when a worker's write races the close."""
SUPERVISE_EVERY_S = 1.0
"""Sharded mode: seconds between two calls of the ``supervise`` callback while collecting."""


@dataclass
class RoundState:
    """One round in progress. ``results``: updates the runner decoded itself; ``rows``: those
    the aggregator workers stored (sharded mode). A device is in at most one of them.
    ``deadline`` is a ``clock()`` time (Unix seconds); byte counts are payload bytes."""

    round: int
    selected: tuple[str, ...]
    deadline: float
    results: dict[str, ClientResult] = field(default_factory=dict)
    rows: dict[str, UpdateRecord] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    rejected: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    download_whole_bytes: int = 0  # what download_bytes would be without model patches
    # Per-device density budgets of this round (fleet.runtime.budget_plan; absent: none) and
    # the round's FedDST readjustment, which the budget check needs.
    budgets: dict[str, float] = field(default_factory=dict)
    readjust: Readjust | None = None

    @property
    def count(self) -> int:
        """Updates accepted so far."""
        return len(self.results) + len(self.rows)

    @property
    def received(self) -> tuple[str, ...]:
        """The devices whose update was accepted, sorted (the aggregation order)."""
        return tuple(sorted(self.results.keys() | self.rows.keys()))

    def has(self, device_id: str) -> bool:
        return device_id in self.results or device_id in self.rows


class Collector:
    """Collects a round's updates until it closes. ``handle(message, state)`` judges one
    message (``MessageHandler.handle``); ``sharded``: the workers take the updates, and the
    store says which they accepted; ``supervise`` is called about once a second while a sharded
    round collects (``LocalWorkers.respawn_dead``)."""

    def __init__(
        self,
        spec: RunSpec,
        store: Store,
        transport: Transport,
        *,
        handle: Callable[[Message, RoundState | None], None],
        progress: ProgressCallback,
        clock: Callable[[], float],
        sharded: bool,
        supervise: Callable[[], object] | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.transport = transport
        self.handle = handle
        self.progress = progress
        self.clock = clock
        self.sharded = sharded
        self.supervise = supervise

    def collect(self, state: RoundState) -> ClosedBy:
        """Handle messages until the round closes; returns why it closed."""
        k = min(self.spec.clients_per_round, len(state.selected))
        polled = supervised = -math.inf
        while True:
            if self.sharded and time.monotonic() - polled >= POLL_S:
                self.poll_stored(state, announce=True)
                polled = time.monotonic()
            if (
                self.sharded
                and self.supervise is not None
                and time.monotonic() - supervised >= SUPERVISE_EVERY_S
            ):
                self.supervise()
                supervised = time.monotonic()
            if state.count >= k:
                return "k_of_n"
            if state.count + len(state.failed) >= len(state.selected):
                return "all_answered"
            remaining = state.deadline - self.clock()
            if remaining <= 0:
                return "deadline"
            message = self.transport.get(timeout_s=min(remaining, POLL_S if self.sharded else 0.5))
            if message is not None:
                self.handle(message, state)

    def poll_stored(self, state: RoundState, *, announce: bool) -> None:
        """Sharded mode: take the round's updates the workers have accepted (and stored);
        ``announce``: report each new one to the progress callback."""
        rows = self.store.updates_for_round(self.spec.run_id, state.round, statuses=("accepted",))
        for row in rows:
            if row.device_id in state.rows:
                continue
            state.rows[row.device_id] = row
            state.upload_bytes += row.payload_bytes
            if announce:
                self.progress(
                    "update",
                    {
                        "device_id": row.device_id,
                        "round": state.round,
                        "received": state.count,
                        "selected": len(state.selected),
                    },
                )

    def stored_rejections(self, round_: int) -> int:
        """Sharded mode: how many updates of ``round_`` the workers refused (they record it)."""
        return sum(1 for r in self.store.rejections(run_id=self.spec.run_id) if r.round == round_)

    def close_in_store(
        self,
        round_: int,
        *,
        model_version_out: int | None,
        counted: list[tuple[int, str]],
        dropped: list[tuple[int, str]],
        metrics: Mapping[str, Any],
        reason: str,
    ) -> None:
        """``Store.close_round``. In sharded mode a worker may store an update of this round
        after the runner decided to close it (the round is open in the store until now): such
        updates were not aggregated, so they are dropped, like late ones, never left undecided.
        """
        for attempt in range(CLOSE_ATTEMPTS):
            if self.sharded:
                decided = set(counted) | set(dropped)
                extra = [
                    (round_, u.device_id)
                    for u in self.store.updates_for_round(
                        self.spec.run_id, round_, statuses=("accepted",)
                    )
                    if (round_, u.device_id) not in decided
                ]
                if extra:
                    log.info("round %d: dropping updates stored after its close: %s", round_, extra)
                    dropped = [*dropped, *extra]
            try:
                self.store.close_round(
                    self.spec.run_id,
                    round_,
                    model_version_out=model_version_out,
                    counted=counted,
                    dropped=dropped,
                    metrics=metrics,
                    reason=reason,
                )
                return
            except StoreConflictError:
                if not self.sharded or attempt == CLOSE_ATTEMPTS - 1:
                    raise

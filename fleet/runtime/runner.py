"""The round loop: select, command, collect by deadline, validate, store, aggregate, checkpoint.

The runner knows nothing about the algorithm (the strategy configures rounds and aggregates) and
nothing about the network beyond the ``Transport`` interface, so the same code runs over MQTT and
over the in-memory broker. One thread does all the work: transport callbacks only enqueue.

Durability: an update is written to the store (payload file, then row) before it is acknowledged;
a checkpoint of the new global model and the strategy's state is written before the round is
closed. ``Runner.resume`` continues a run from the store after a crash: the open round's stored
updates are decoded again, commands are re-sent to the devices that have not answered, and
redelivered updates are recognised as duplicates.

Aggregation is exact (``fleet.strategies.accumulate.aggregate_exact``: integer partial sums), so
the new model does not depend on the order or the split of the updates. That is what makes the
**sharded mode** give the same bits: with a ``Coordinator`` (``fleet.runtime.aggregator``), K
aggregator workers on a shared subscription decode, validate, store and sum the round's
updates; the runner does not subscribe to them (only to round 0, the initial job). It learns which
updates were accepted from the store (polled), closes the round as usual (k of n, all answered,
deadline), and gets the new model from ``Coordinator.collect`` (the workers' partial sums, and the
coordinator's own decoding of whatever a dead worker held). An update a worker stores between
the runner's decision to close and the close itself is dropped, as a late one would be.
Robust aggregation (trimmed mean, median, clipping) and the "next" late policy need every update
in the runner, so they are refused with workers (``check_sharding``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from device.errors import ConfigError, DecodeError, NotFoundError, ValidationError
from device.models import create_model, prunable_names
from device.seeding import derive_seed
from device.wire import envelope
from device.wire.codec import KnownMask, model_digest
from device.wire.messages import (
    CancelCommand,
    DeviceStatus,
    Envelope,
    FleetStatus,
    InitialPruneCommand,
    InitialPruneResult,
    JobEvent,
    JobState,
    ModelSnapshot,
    RoundCommand,
)
from device.wire.topics import Topics
from device.wire.transport import Message, Transport, Will
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.aggregator import Coordinator
from fleet.state.store import Store, StoreConflictError, UpdateRecord
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import aggregate_exact, kind_of
from fleet.strategies.base import Candidate, ClientResult, GlobalModel, Strategy
from fleet.strategies.robust import RobustOptions
from fleet.strategies.validate import Expectation, check_routing, reconstruct

log = logging.getLogger(__name__)

Evaluator = Callable[[GlobalModel], Mapping[str, float]]
"""Evaluates a global model on held-out data: ``{"accuracy": 0..1, "loss": ...}``."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run. Stored as JSON with the run, so ``resume`` needs nothing else.

    ``clients_per_round`` (k) updates close a round early; ``over_select`` >= 1 selects
    ``ceil(k * over_select)`` devices so that stragglers do not hold it open; the deadline closes
    it otherwise, with whatever arrived (at least ``min_updates`` for an aggregation to happen).
    """

    run_id: str
    model_name: str
    strategy: str
    rounds: int
    clients_per_round: int
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    over_select: float = 1.0
    min_updates: int = 1
    round_timeout_s: float = 600.0
    late_policy: Literal["drop", "next"] = "drop"
    eval_every: int = 1
    seed: int = 0
    tags: tuple[str, ...] = ()
    max_update_bytes: int = 256 * 1024 * 1024
    init_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategy_options"] = dict(self.strategy_options)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        values = dict(data)
        values["tags"] = tuple(values.get("tags", ()))
        return cls(**values)


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round; passed to the progress callback and stored with the round."""

    round: int
    selected: tuple[str, ...]
    received: tuple[str, ...]
    failed: tuple[str, ...]
    rejected: int
    model_version: int
    density: float
    upload_bytes: int
    download_bytes: int
    wall_s: float
    max_train_s: float
    closed_by: Literal["k_of_n", "deadline", "all_answered"]
    metrics: Mapping[str, float]


ProgressCallback = Callable[[str, Mapping[str, Any]], None]


def global_density(model: GlobalModel) -> float:
    """Kept fraction over all pruned tensors (1.0 when nothing is pruned)."""
    if not model.masks:
        return 1.0
    kept = sum(int(m.sum()) for m in model.masks.values())
    total = sum(m.size for m in model.masks.values())
    return kept / total if total else 1.0


def exact_aggregation_applies(strategy: Strategy) -> bool:
    """Whether ``strategy``'s rounds can be aggregated from exact partial sums
    (``aggregate_exact``): its kind is known to ``fleet.strategies.accumulate`` and it has no
    robust aggregation enabled (a trimmed mean, a median or clipping needs every update)."""
    try:
        kind_of(strategy.name)
    except ValueError:
        return False
    robust = getattr(getattr(strategy, "options", None), "robust", None)
    return not (isinstance(robust, RobustOptions) and robust.enabled)


def check_sharding(spec: RunSpec, workers: int, strategy: Strategy | None = None) -> None:
    """Raise ``ConfigError`` when ``spec`` cannot run with ``workers`` aggregator workers.

    ``workers`` >= 0 (0: the runner aggregates alone, always possible). With workers, the
    strategy must aggregate from sums (no robust aggregation) and the late policy must be
    "drop" (workers refuse updates of a closed round). ``strategy`` defaults to the spec's.
    """
    if workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}")
    if workers == 0:
        return
    if strategy is None:
        try:
            strategy = create_strategy(spec.strategy, **dict(spec.strategy_options))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"run {spec.run_id!r}: {exc}") from None
    robust = getattr(getattr(strategy, "options", None), "robust", None)
    if isinstance(robust, RobustOptions) and robust.enabled:
        raise ConfigError(
            f"run {spec.run_id!r}: robust aggregation (method {robust.method!r}, clip_norm "
            f"{robust.clip_norm!r}) cannot run on aggregator workers: a trimmed mean, a median "
            "or clipping needs every update, and workers hand over only sums; run without "
            "--workers, or remove run.options.robust"
        )
    if not exact_aggregation_applies(strategy):
        raise ConfigError(
            f"run {spec.run_id!r}: strategy {strategy.name!r} has no partial-sum aggregation; "
            "run it without --workers"
        )
    if spec.late_policy != "drop":
        raise ConfigError(
            f"run {spec.run_id!r}: late_policy {spec.late_policy!r} cannot run on aggregator "
            "workers (they refuse updates of a closed round); use late_policy drop or run "
            "without --workers"
        )


def initial_weights(model_name: str, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """The seeded initial weights of a registered model and the names of its prunable tensors."""
    module = create_model(model_name, seed=seed)
    weights = {
        k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()
    }
    return weights, prunable_names(module)


class Runner:
    """Runs one federated run over a transport, recording everything in a store."""

    def __init__(
        self,
        spec: RunSpec,
        transport: Transport,
        store: Store,
        *,
        topics: Topics | None = None,
        registry: DeviceRegistry | None = None,
        strategy: Strategy | None = None,
        evaluator: Evaluator | None = None,
        partition_for: Callable[[str], str] | None = None,
        on_progress: ProgressCallback | None = None,
        clock: Callable[[], float] = time.time,
        coordinator: Coordinator | None = None,
        handover_timeout_s: float = 10.0,
        supervise: Callable[[], object] | None = None,
    ) -> None:
        """``coordinator`` (connected, its workers running): sharded mode (module docstring);
        ``handover_timeout_s``: how long ``Coordinator.collect`` waits for the workers' partial
        sums before decoding the rest itself; ``supervise`` is called about once a second while
        a sharded round collects (``LocalWorkers.respawn_dead``)."""
        self.spec = spec
        self.transport = transport
        self.store = store
        self.topics = topics or Topics()
        self.registry = registry or DeviceRegistry(store)
        self.strategy = strategy or create_strategy(spec.strategy, **dict(spec.strategy_options))
        if coordinator is not None:
            check_sharding(spec, 1, self.strategy)
        self.coordinator = coordinator
        self.handover_timeout_s = handover_timeout_s
        self.supervise = supervise
        self._exact = exact_aggregation_applies(self.strategy)
        self.evaluator = evaluator
        self.partition_for = partition_for or (lambda device_id: "")
        self.on_progress = on_progress
        self.clock = clock
        self.model: GlobalModel | None = None
        self.model_digest = b""
        self.mask_version = 0
        self._published_version: int | None = None
        self._snapshot_bytes = 0
        self._previous: tuple[GlobalModel, bytes] | None = None  # for the "next" late policy
        self._books: dict[int, dict[str, KnownMask]] = {}  # model version -> its masks
        self._late: list[tuple[tuple[int, str], ClientResult]] = []
        self._last_closed: _RoundState | None = None  # late updates are judged against it
        self._deferred: list[Message] = []  # updates that arrived while no round was open
        self._stop = False
        self._initial_device: str | None = None
        self._initial_result: InitialPruneResult | None = None
        self.reports: list[RoundReport] = []

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect with a last will for the fleet status and subscribe to devices' topics."""
        will = envelope.encode(Envelope(body=FleetStatus(online=False, run_id=self.spec.run_id)))
        self.transport.set_will(Will(self.topics.fleet_status(), will))
        self.transport.connect()
        self.transport.subscribe(self.topics.all_status(), qos=1)
        self.transport.subscribe(self.topics.all_events(), qos=1)
        if self.coordinator is None:
            self.transport.subscribe(self.topics.all_updates(self.spec.run_id), qos=1)
        else:
            # The workers take the rounds' updates; the runner only the initial job's (round 0).
            self.transport.subscribe(self.topics.round_updates(self.spec.run_id, 0), qos=1)

    def wait_for_devices(self, count: int, timeout_s: float) -> int:
        """Handle births until ``count`` devices are eligible (or ``timeout_s`` passes).

        Returns how many are eligible. Simulations call it so that the first selection sees the
        whole fleet, which makes runs reproducible whatever the order of the births.
        """
        deadline = self.clock() + timeout_s
        eligible = len(self.registry.eligible(tags=self.spec.tags))
        while eligible < count and self.clock() < deadline:
            self._drain_status(timeout_s=0.1)
            eligible = len(self.registry.eligible(tags=self.spec.tags))
        return eligible

    def stop(self) -> None:
        """Ask the loop to stop after the current round (thread-safe)."""
        self._stop = True

    # -- run -------------------------------------------------------------------------------

    def run(self) -> list[RoundReport]:
        """Start a new run (or continue it, if the store has it) and run it to the end."""
        try:
            self.store.get_run(self.spec.run_id)
        except NotFoundError:
            self._start_new()
        else:
            self._restore()
        return self._loop()

    def _start_new(self) -> None:
        spec = self.spec
        self.store.create_run(
            spec.run_id, config=spec.to_json(), strategy=spec.strategy, model_name=spec.model_name
        )
        weights, prunable = initial_weights(spec.model_name, spec.init_seed)
        rng = np.random.default_rng(derive_seed(spec.run_id, "init", spec.seed))
        model = self.strategy.initialize(weights, spec.model_name, prunable, rng)
        self._set_model(model, mask_changed=True)
        self._checkpoint(round_=None)
        self.store.set_run_status(spec.run_id, "running")

    def _restore(self) -> None:
        """Continue from the store: the open round's input model, else the newest checkpoint."""
        open_round = self.store.find_open_round(self.spec.run_id)
        version = open_round.model_version_in if open_round is not None else None
        checkpoint = self.store.load_checkpoint(self.spec.run_id, version)
        model = GlobalModel(
            version=checkpoint.record.version,
            weights=dict(checkpoint.weights),
            masks=dict(checkpoint.masks),
            model_name=self.spec.model_name,
        )
        self.strategy.load_state_dict(dict(checkpoint.extra_state))
        self.mask_version = int(checkpoint.record.meta.get("mask_version", model.version))
        self._set_model(model, mask_changed=False)
        self.store.set_run_status(self.spec.run_id, "running")

    def _set_model(self, model: GlobalModel, *, mask_changed: bool) -> None:
        """Make ``model`` current; keep the previous one (late updates) and both mask books."""
        current = self._books.get(self.model.version) if self.model is not None else None
        if self.model is not None:
            self._previous = (self.model, self.model_digest)
        if mask_changed or current is None:
            if mask_changed:
                self.mask_version = model.version
            book = {
                name: KnownMask(version=self.mask_version, mask=mask)
                for name, mask in model.masks.items()
            }
        else:
            book = current  # same masks: reuse the digests instead of hashing them again
        keep = {model.version} | ({self._previous[0].version} if self._previous else set())
        self._books = {v: b for v, b in self._books.items() if v in keep}
        self._books[model.version] = book
        self.model = model
        self.model_digest = model_digest(model.weights, model.masks)

    def _checkpoint(self, round_: int | None) -> str:
        assert self.model is not None
        return self.store.save_checkpoint(
            self.spec.run_id,
            self.model.version,
            self.model.weights,
            self.model.masks,
            self.strategy.state_dict(),
            {"mask_version": self.mask_version},
            round=round_,
        )

    def _loop(self) -> list[RoundReport]:
        spec = self.spec
        run = self.store.get_run(spec.run_id)
        open_round = self.store.find_open_round(spec.run_id)
        first = open_round.round if open_round is not None else run.current_round + 1
        if first == 1 and open_round is None:
            self._initial_job()
        for round_ in range(first, spec.rounds + 1):
            if self._stop:
                self.store.set_run_status(spec.run_id, "stopped", error="stopped by request")
                return self.reports
            self.reports.append(self._round(round_))
        self.store.set_run_status(spec.run_id, "finished")
        self._publish_fleet_status(round_=spec.rounds, selected=0, received=0)
        return self.reports

    # -- one round -------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(device_id=d.device_id, num_examples=d.dataset_size, profile=d.profile)
            for d in self.registry.eligible(tags=self.spec.tags)
        ]

    def _drain_status(self, timeout_s: float = 0.0) -> None:
        """Handle whatever is queued (births, wills, events) without waiting for more."""
        deadline = self.clock() + timeout_s
        while True:
            message = self.transport.get(timeout_s=max(0.0, deadline - self.clock()))
            if message is None:
                return
            self._handle(message, None)

    def _round(self, round_: int) -> RoundReport:
        spec = self.spec
        assert self.model is not None
        start = self.clock()
        existing = self.store.find_open_round(spec.run_id)
        rng = np.random.default_rng(derive_seed(spec.run_id, round_, "select", spec.seed))
        self._drain_status()
        if existing is not None and existing.round == round_:
            # Resuming: same devices, same settings; the deadline restarts from now.
            selected = tuple(existing.selected)
            deadline = start + spec.round_timeout_s
            config = self.strategy.configure_round(round_, self.model, self._candidates(), rng)
        else:
            want = max(1, math.ceil(spec.clients_per_round * spec.over_select))
            candidates = self._wait_for_candidates(want)
            config = self.strategy.configure_round(
                round_, self.model, candidates, rng, num_select=want
            )
            selected = tuple(config.selected)
            deadline = start + spec.round_timeout_s
            self.store.open_round(
                spec.run_id,
                round_,
                selected=list(selected),
                deadline=deadline,
                model_version_in=self.model.version,
            )
        state = _RoundState(round_, selected, deadline)
        if self.coordinator is not None:
            self._poll_stored(state, announce=False)  # after a restart: stored ones count
        else:
            for row in self.store.updates_for_round(spec.run_id, round_, statuses=("accepted",)):
                # After a restart: updates stored before the crash count, exactly once.
                result = self._decode_stored(row.device_id, round_, row.load_payload())
                if result is None:
                    state.dropped.append((round_, row.device_id))
                else:
                    state.results[row.device_id] = result
                    state.upload_bytes += row.payload_bytes
            deferred, self._deferred = self._deferred, []
            for message in deferred:
                self._handle(message, state)
        self._publish_model()
        command = RoundCommand(
            model_version=self.model.version,
            model_digest=self.model_digest,
            training=config.training,
            readjust=config.readjust,
            report_importance=config.report_importance,
            upload_dtype=config.upload_dtype,
            deadline_unix_s=deadline,
        )
        for device_id in selected:
            if state.has(device_id):
                continue
            down = self._snapshot_bytes + self._send_command(device_id, round_, command)
            state.download_bytes += down
            self.store.add_traffic(spec.run_id, round_, device_id, down=down)
        self._publish_fleet_status(round_, len(selected), state.count)
        closed_by = self._collect(state)
        self._last_closed = state
        for device_id in selected:  # stragglers: their work would be dropped anyway
            if not state.has(device_id) and device_id not in state.failed:
                self._send(device_id, round_, CancelCommand(reason=f"round {round_} closed"))
        received = state.received
        results = [state.results[d] for d in received if d in state.results]
        counted = [(round_, d) for d in received]
        late = self._late if self.spec.late_policy == "next" else []
        self._late = []
        metrics: dict[str, float] = {}
        handover: dict[str, float] = {}
        if len(received) >= spec.min_updates:
            results.extend(result for _, result in late)
            counted.extend(key for key, _ in late)
            old_masks = self.model.masks
            if self.coordinator is not None:
                new_model, done = self.coordinator.collect(
                    self.strategy, round_, self.model, received, timeout_s=self.handover_timeout_s
                )
                handover = {
                    "handover_s": done.wall_s,
                    "partials": len(done.partials),
                    "recovered": len(done.recovered),
                }
            elif self._exact:
                new_model = aggregate_exact(self.strategy, round_, self.model, results)
            else:
                new_model = self.strategy.aggregate(round_, self.model, results)
            changed = _masks_differ(old_masks, new_model.masks)
            self._set_model(new_model, mask_changed=changed)
        else:
            log.warning(
                "round %d closed with %d updates (< %d): model unchanged",
                round_,
                len(received),
                spec.min_updates,
            )
            metrics["skipped"] = 1.0
            state.dropped.extend(counted)
            state.dropped.extend(key for key, _ in late)
            counted = []
        if self.evaluator is not None and (round_ % spec.eval_every == 0 or round_ == spec.rounds):
            metrics.update(self.evaluator(self.model))
        density = global_density(self.model)
        if counted:
            self._checkpoint(round_)
        if self.coordinator is not None:
            # The workers judged this round's updates; they recorded what they refused.
            state.rejected = sum(
                1 for r in self.store.rejections(run_id=spec.run_id) if r.round == round_
            )
        report = RoundReport(
            round=round_,
            selected=selected,
            received=received,
            failed=tuple(sorted(state.failed)),
            rejected=state.rejected,
            model_version=self.model.version,
            density=density,
            upload_bytes=state.upload_bytes,
            download_bytes=state.download_bytes,
            wall_s=self.clock() - start,
            max_train_s=max(
                [r.metrics.get("train_s", 0.0) for r in results]
                + [float(row.meta.get("train_s", 0.0)) for row in state.rows.values()],
                default=0.0,
            ),
            closed_by=closed_by,
            metrics=metrics,
        )
        self._close_in_store(
            round_,
            model_version_out=self.model.version if counted else None,
            counted=counted,
            dropped=state.dropped,
            metrics={
                **metrics,
                **handover,
                "density": density,
                "wall_s": report.wall_s,
                "received": len(received),
                "selected": len(selected),
            },
            reason=closed_by,
        )
        if self.on_progress is not None:
            self.on_progress("round_closed", {"report": report})
        return report

    def _initial_job(self) -> None:
        """Run the strategy's work before round 1 (PruneFL's initial pruning), if it has any.

        The job is "round 0" of the run: the command goes to one device, whose result arrives on
        its update topic for round 0. A device that fails or misses the deadline is replaced by
        the next choice among the remaining candidates.
        """
        assert self.model is not None
        excluded: set[str] = set()
        while True:
            candidates = [c for c in self._wait_for_candidates(1) if c.device_id not in excluded]
            job = self.strategy.initial_job(self.model, candidates) if candidates else None
            if job is None:
                if excluded:
                    raise NotFoundError(
                        f"initial job failed on every candidate device: {sorted(excluded)}"
                    )
                return
            self._publish_model()
            deadline = self.clock() + self.spec.round_timeout_s
            command = job.command(
                self.model_digest,
                deadline_unix_s=deadline,
                partition=self.partition_for(job.device_id),
            )
            self._send(job.device_id, 0, command)
            self._initial_device = job.device_id
            self._initial_result = None
            state = _RoundState(0, (job.device_id,), deadline)
            while self._initial_result is None and not state.failed and self.clock() < deadline:
                message = self.transport.get(timeout_s=min(0.5, deadline - self.clock()))
                if message is not None:
                    self._handle(message, state)
            self._initial_device = None
            result = self._initial_result
            if result is None:
                log.warning(
                    "initial job on %s failed or timed out; trying another device", job.device_id
                )
                excluded.add(job.device_id)
                continue
            try:
                model = self.strategy.on_initial_result(self.model, result)
            except ValidationError as exc:
                self._reject(job.device_id, 0, exc)
                excluded.add(job.device_id)
                continue
            self._set_model(model, mask_changed=True)
            self._checkpoint(round_=None)
            if self.on_progress is not None:
                self.on_progress(
                    "initial_job", {"device_id": job.device_id, "density": global_density(model)}
                )
            return

    def _on_initial_result(self, device_id: str, message: Message) -> None:
        try:
            env = envelope.decode(message.payload, max_bytes=self.spec.max_update_bytes)
        except DecodeError as exc:
            self._reject(device_id, 0, ValidationError(str(exc), reason=f"decode:{exc.reason}"))
            return
        if (
            not isinstance(env.body, InitialPruneResult)
            or env.device_id != device_id
            or env.run_id != self.spec.run_id
        ):
            self._reject(
                device_id,
                0,
                ValidationError(
                    "expected the initial pruning result of this run", reason="wrong_kind"
                ),
            )
            return
        self._initial_result = env.body

    def _wait_for_candidates(self, want: int) -> list[Candidate]:
        """Give late births a moment: wait (up to the round timeout) for ``want`` devices."""
        deadline = self.clock() + self.spec.round_timeout_s
        candidates = self._candidates()
        while len(candidates) < want and self.clock() < deadline:
            self._drain_status(timeout_s=0.2)
            candidates = self._candidates()
        if not candidates:
            raise NotFoundError(
                f"no eligible device is online for run {self.spec.run_id!r} "
                f"(tags {list(self.spec.tags)})"
            )
        return candidates

    def _collect(self, state: _RoundState) -> Literal["k_of_n", "deadline", "all_answered"]:
        k = min(self.spec.clients_per_round, len(state.selected))
        sharded = self.coordinator is not None
        polled = supervised = -math.inf
        while True:
            if sharded and time.monotonic() - polled >= _POLL_S:
                self._poll_stored(state, announce=True)
                polled = time.monotonic()
            if sharded and self.supervise is not None and time.monotonic() - supervised >= 1.0:
                self.supervise()
                supervised = time.monotonic()
            if state.count >= k:
                return "k_of_n"
            if state.count + len(state.failed) >= len(state.selected):
                return "all_answered"
            remaining = state.deadline - self.clock()
            if remaining <= 0:
                return "deadline"
            message = self.transport.get(timeout_s=min(remaining, _POLL_S if sharded else 0.5))
            if message is not None:
                self._handle(message, state)

    def _poll_stored(self, state: _RoundState, *, announce: bool) -> None:
        """Sharded mode: take the round's updates the workers have accepted (and stored)."""
        rows = self.store.updates_for_round(self.spec.run_id, state.round, statuses=("accepted",))
        for row in rows:
            if row.device_id in state.rows:
                continue
            state.rows[row.device_id] = row
            state.upload_bytes += row.payload_bytes
            if announce and self.on_progress is not None:
                self.on_progress(
                    "update",
                    {
                        "device_id": row.device_id,
                        "round": state.round,
                        "received": state.count,
                        "selected": len(state.selected),
                    },
                )

    def _close_in_store(
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
        for attempt in range(_CLOSE_ATTEMPTS):
            if self.coordinator is not None:
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
                if self.coordinator is None or attempt == _CLOSE_ATTEMPTS - 1:
                    raise

    # -- messages --------------------------------------------------------------------------

    def _handle(self, message: Message, state: _RoundState | None) -> None:
        """Dispatch one message; never raises for anything a device sent."""
        try:
            parsed = self.topics.parse(message.topic)
        except ValueError as exc:
            log.warning("ignored message on unexpected topic %r: %s", message.topic, exc)
            self.transport.ack(message)
            return
        try:
            if parsed.kind == "dev_status":
                self._on_status(parsed.device_id, message)
            elif parsed.kind == "dev_events":
                self._on_event(parsed.device_id, message, state)
            elif parsed.kind == "dev_update" and self.coordinator is not None and parsed.round:
                # Sharded: the workers own the rounds' updates (a subscription left in this
                # client's persistent session from an unsharded start can still deliver them).
                log.debug("update on %s left to the aggregator workers", message.topic)
            elif parsed.kind == "dev_update" and message.retain:
                # Updates are never retained (DESIGN section 4) and the ACL cannot forbid the
                # flag: a retained one would be replayed to every new subscriber.
                retained = ValidationError("retained message on an update topic", reason="retained")
                self._reject(parsed.device_id, parsed.round, retained)
                if state is not None:
                    state.rejected += 1
            elif parsed.kind == "dev_update" and parsed.round == 0:
                if parsed.device_id == self._initial_device and parsed.run_id == self.spec.run_id:
                    self._on_initial_result(parsed.device_id, message)
                else:
                    self._reject(
                        parsed.device_id,
                        0,
                        ValidationError(
                            "initial pruning result from a device no initial job waits for",
                            reason="not_selected",
                        ),
                    )
            elif parsed.kind == "dev_update":
                self._on_update(parsed.device_id, parsed.run_id, parsed.round, message, state)
                return  # acknowledged inside, after the write
        except Exception:  # last line of defence: a device message must never stop the runner
            log.exception("error handling %s", message.topic)
        self.transport.ack(message)

    def _on_status(self, device_id: str, message: Message) -> None:
        if not message.payload:
            return
        try:
            env = envelope.decode(message.payload)
        except DecodeError as exc:
            log.warning("bad status from %s: %s", device_id, exc)
            return
        if isinstance(env.body, DeviceStatus):
            self.registry.apply_status(device_id, env.body)

    def _on_event(self, device_id: str, message: Message, state: _RoundState | None) -> None:
        try:
            env = envelope.decode(message.payload)
        except DecodeError as exc:
            log.warning("bad event from %s: %s", device_id, exc)
            return
        event = env.body
        if not isinstance(event, JobEvent):
            return
        if event.state in (JobState.FAILED, JobState.REJECTED):
            log.info(
                "device %s %s round %d: %s", device_id, event.state.value, env.round, event.reason
            )
            self.registry.record_failure(device_id, event.reason)
            if (
                state is not None
                and env.run_id == self.spec.run_id
                and env.round == state.round
                and device_id in state.selected
            ):
                state.failed.add(device_id)
        if self.on_progress is not None:
            self.on_progress("event", {"device_id": device_id, "event": event, "round": env.round})

    def _book_for(self, version: int) -> dict[str, KnownMask] | None:
        """The masks a device's update for model ``version`` may refer to (None: unknown)."""
        return self._books.get(version)

    def _on_update(
        self, device_id: str, run_id: str, round_: int, message: Message, state: _RoundState | None
    ) -> None:
        if self.model is None:
            # Before run() has made or restored the model (connect, wait_for_devices): a
            # redelivered update waits, unacknowledged, for the first round to judge it.
            self._deferred.append(message)
            return
        try:
            if len(message.payload) > self.spec.max_update_bytes:
                raise ValidationError(
                    f"{len(message.payload)} bytes exceeds the limit {self.spec.max_update_bytes}",
                    reason="oversized",
                )
            try:
                env = envelope.decode(
                    message.payload, book_for=self._book_for, max_bytes=self.spec.max_update_bytes
                )
            except DecodeError as exc:
                raise ValidationError(str(exc), reason=f"decode:{exc.reason}") from exc
            closed = self._last_closed
            if closed is not None and run_id == self.spec.run_id and round_ == closed.round:
                # Trained for a round that has closed: the late policy decides.
                if self.spec.late_policy == "next" and self._previous is not None:
                    self._accept_late(device_id, env, message)
                    return
                raise ValidationError(
                    f"update for round {round_} arrived after the round closed", reason="late"
                )
            if state is None:
                # Between rounds (or before a resumed round is set up): judge it once the next
                # round is open; it stays unacknowledged until then.
                self._deferred.append(message)
                return
            exp = Expectation(
                self.spec.run_id, state.round, state.selected, self.model, self.model_digest
            )
            update = check_routing(env, device_id, run_id, round_, exp)
            if device_id in state.results:
                self._check_redelivery(device_id, state.round, message)
                log.info("redelivered update from %s for round %d ignored", device_id, state.round)
                self.transport.ack(message)
                return
            result = reconstruct(
                update, self.model, device_id=device_id, model_digest=self.model_digest
            )
            self.strategy.check_result(self.model, result)
        except ValidationError as exc:
            self._reject(device_id, round_, exc)
            if state is not None:
                state.rejected += 1
            self.transport.ack(message)
            return
        is_new = self.store.record_update(
            self.spec.run_id,
            state.round,
            device_id,
            message.payload,
            result.num_examples,
            {"train_s": update.train_s},
        )
        self.transport.ack(message)  # only now: the update is durable
        if not is_new:
            log.info("duplicate update from %s for round %d ignored", device_id, state.round)
            return
        state.results[device_id] = ClientResult(
            device_id=result.device_id,
            num_examples=result.num_examples,
            weights=result.weights,
            masks=result.masks,
            importance=result.importance,
            metrics={**result.metrics, "train_s": update.train_s},
        )
        state.upload_bytes += len(message.payload)
        if self.on_progress is not None:
            self.on_progress(
                "update",
                {
                    "device_id": device_id,
                    "round": state.round,
                    "received": len(state.results),
                    "selected": len(state.selected),
                },
            )

    def _check_redelivery(self, device_id: str, round_: int, message: Message) -> None:
        """A second update of ``device_id`` for a round that holds one already must be the same
        bytes: a redelivery (the broker re-sends what was stored but not acknowledged when the
        fleet manager stopped), which changes nothing. Different bytes are a device counting
        twice or replacing its update: ``ValidationError("duplicate")``. The first one stays.
        """
        stored = self.store.get_update(self.spec.run_id, round_, device_id)
        if stored is None or stored.payload_digest != hashlib.sha256(message.payload).hexdigest():
            raise ValidationError(
                f"a different update for round {round_} after the one already accepted",
                reason="duplicate",
            )

    def _accept_late(self, device_id: str, env: Envelope, message: Message) -> None:
        assert self._previous is not None
        model, digest = self._previous
        exp = Expectation(self.spec.run_id, env.round, (device_id,), model, digest)
        update = check_routing(env, device_id, env.run_id, env.round, exp)
        result = reconstruct(update, model, device_id=device_id, model_digest=digest)
        is_new = self.store.record_update(
            self.spec.run_id,
            env.round,
            device_id,
            message.payload,
            result.num_examples,
            {"late": True},
            status="late",
        )
        self.transport.ack(message)
        if is_new:
            self._late.append(((env.round, device_id), result))

    def _reject(self, device_id: str, round_: int, exc: ValidationError) -> None:
        log.warning(
            "rejected update from %s for round %d: %s (%s)", device_id, round_, exc, exc.reason
        )
        self.store.record_rejection(self.spec.run_id, round_, device_id, exc.reason, str(exc))

    def _decode_stored(self, device_id: str, round_: int, payload: bytes) -> ClientResult | None:
        assert self.model is not None
        try:
            env = envelope.decode(payload, book_for=self._book_for)
            exp = Expectation(self.spec.run_id, round_, (device_id,), self.model, self.model_digest)
            update = check_routing(env, device_id, self.spec.run_id, round_, exp)
            return reconstruct(
                update, self.model, device_id=device_id, model_digest=self.model_digest
            )
        except (DecodeError, ValidationError) as exc:
            log.error(
                "stored update of %s for round %d no longer valid: %s", device_id, round_, exc
            )
            return None

    # -- publishing ------------------------------------------------------------------------

    def _publish_model(self) -> None:
        assert self.model is not None
        if self._published_version == self.model.version:
            return
        snapshot = ModelSnapshot(
            model_name=self.model.model_name,
            version=self.model.version,
            digest=self.model_digest,
            mask_version=self.mask_version,
            weights=self.model.weights,
            masks=self.model.masks,
        )
        payload = envelope.encode(Envelope(body=snapshot, run_id=self.spec.run_id))
        self.transport.publish(self.topics.run_model(self.spec.run_id), payload, qos=1, retain=True)
        self._snapshot_bytes = len(payload)
        self._published_version = self.model.version

    def _send(
        self, device_id: str, round_: int, body: RoundCommand | CancelCommand | InitialPruneCommand
    ) -> int:
        payload = envelope.encode(
            Envelope(
                body=body,
                run_id=self.spec.run_id,
                round=round_,
                device_id=device_id,
                correlation_id=f"{self.spec.run_id}/{round_}/{device_id}",
            )
        )
        self.transport.publish(self.topics.dev_cmd(device_id), payload, qos=1, wait=False)
        return len(payload)

    def _send_command(self, device_id: str, round_: int, command: RoundCommand) -> int:
        partition = self.partition_for(device_id)
        if partition:
            command = dataclasses.replace(command, partition=partition)
        return self._send(device_id, round_, command)

    def _publish_fleet_status(self, round_: int, selected: int, received: int) -> None:
        payload = envelope.encode(
            Envelope(
                body=FleetStatus(
                    online=True,
                    run_id=self.spec.run_id,
                    round=round_,
                    selected=selected,
                    received=received,
                    timestamp_unix_s=self.clock(),
                )
            )
        )
        self.transport.publish(self.topics.fleet_status(), payload, qos=1, retain=True, wait=False)


_POLL_S = 0.2
"""Sharded mode: seconds between two looks at the store for the workers' accepted updates."""
_CLOSE_ATTEMPTS = 5


@dataclass
class _RoundState:
    """One round in progress. ``results``: updates the runner decoded itself; ``rows``: those
    the aggregator workers stored (sharded mode). A device is in at most one of them."""

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


def _masks_differ(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    if a.keys() != b.keys():
        return True
    return any(not np.array_equal(a[n], b[n]) for n in a)


def summarize(reports: Sequence[RoundReport]) -> dict[str, float]:
    """Totals over a run's reports: bytes up and down, final accuracy if evaluated."""
    final = next((r.metrics for r in reversed(reports) if "accuracy" in r.metrics), {})
    return {
        "rounds": float(len(reports)),
        "upload_bytes": float(sum(r.upload_bytes for r in reports)),
        "download_bytes": float(sum(r.download_bytes for r in reports)),
        "accuracy": float(final.get("accuracy", math.nan)),
        "density": reports[-1].density if reports else 1.0,
    }

"""The round loop: select, command, collect by deadline, validate, store, aggregate, checkpoint.

The runner knows nothing about the algorithm (the strategy configures rounds and aggregates) and
nothing about the network beyond the ``Transport`` interface, so the same code runs over MQTT and
over the in-memory broker. One thread does all the work: transport callbacks only enqueue.

``Runner`` is the orchestrator; each step has its own module: ``spec`` (what defines a run and
what it reports), ``selection`` (eligible devices, over-selection), ``commands`` (model, round
commands, fleet status), ``handler`` (judging each message: validate, store, acknowledge),
``collection`` (the round in progress and when it closes), ``checkpoint`` (the current model,
checkpoints, start and restore), ``initial`` (PruneFL's initial-prune job) and ``evaluation``
(federated evaluation on the devices after a round closed, ``RunSpec.evaluate``).

Durability: an update is written to the store (payload file, then row) before it is acknowledged;
a checkpoint of the new global model and the strategy's state is written before the round is
closed. ``Runner.resume`` continues a run from the store after a crash: the open round's stored
updates are decoded again, commands are re-sent to the devices that have not answered, and
redelivered updates are recognised as duplicates.

Aggregation is exact (``fleet.strategies.accumulate.aggregate_exact``: integer partial sums), so
the new model does not depend on the order or the split of the updates. That is what makes the
**sharded mode** give the same bits: with a ``Coordinator`` (``fleet.runtime.coordinator``), K
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
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from device.errors import NotFoundError
from device.wire.messages import CancelCommand
from device.wire.topics import Topics
from device.wire.transport import Message, Transport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.async_rounds import AsyncRounds
from fleet.runtime.budget_plan import BudgetPlanner
from fleet.runtime.checkpoint import CurrentModel, initial_weights, masks_differ
from fleet.runtime.collection import Collector, RoundState
from fleet.runtime.commands import Commands
from fleet.runtime.coordinator import Coordinator
from fleet.runtime.evaluation import FederatedEvaluator
from fleet.runtime.handler import MessageHandler
from fleet.runtime.initial import run_initial_job
from fleet.runtime.selection import Selection
from fleet.runtime.spec import (
    ClosedBy,
    Evaluator,
    ProgressCallback,
    RoundReport,
    RunSpec,
    check_sharding,
    exact_aggregation_applies,
    global_density,
    summarize,
)
from fleet.state.store import Store
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import aggregate_exact
from fleet.strategies.base import GlobalModel, RoundConfig, Strategy
from fleet.strategies.nested import aggregate_budgeted

__all__ = [
    "Evaluator",
    "ProgressCallback",
    "RoundReport",
    "RunSpec",
    "Runner",
    "check_sharding",
    "exact_aggregation_applies",
    "global_density",
    "initial_weights",
    "summarize",
]

log = logging.getLogger(__name__)


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
        a sharded round collects (``LocalWorkers.respawn_dead``). ``clock`` gives Unix seconds
        (deadlines are sent to devices in that time)."""
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
        self.current = CurrentModel(spec, store, self.strategy)
        self.budgets = BudgetPlanner(spec, self.registry)
        self.commands = Commands(
            spec.run_id,
            transport,
            self.topics,
            self.current,
            partition_for=self.partition_for,
            clock=clock,
        )
        sharded = coordinator is not None
        self.handler = MessageHandler(
            spec,
            transport,
            store,
            self.topics,
            self.registry,
            self.strategy,
            self.current,
            progress=self._progress,
            clock=clock,
            sharded=sharded,
        )
        self.selection = Selection(
            spec, self.registry, self.strategy, drain=self.handler.drain, clock=clock
        )
        self.collector = Collector(
            spec,
            store,
            transport,
            handle=self.handler.handle,
            progress=self._progress,
            clock=clock,
            sharded=sharded,
            supervise=supervise,
        )
        self.federated = FederatedEvaluator(
            spec,
            transport,
            store,
            self.topics,
            self.registry,
            self.current,
            candidates=lambda: [c.device_id for c in self.selection.candidates()],
            publish_model=self.commands.publish_model,
            handle=self.handler.handle,
            clock=clock,
        )
        self._stop = False
        self.reports: list[RoundReport] = []

    @property
    def model(self) -> GlobalModel | None:
        """The current global model (None before ``run`` made or restored it)."""
        return self.current.model

    @property
    def model_digest(self) -> bytes:
        """``model_digest`` of the current model (empty before ``run``)."""
        return self.current.digest

    @property
    def mask_version(self) -> int:
        """The version of the model whose masks are current."""
        return self.current.mask_version

    def _progress(self, kind: str, payload: Mapping[str, Any]) -> None:
        # Looked up at each call: a caller may set ``on_progress`` after construction.
        if self.on_progress is not None:
            self.on_progress(kind, payload)

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect with a last will for the fleet status and subscribe to devices' topics."""
        self.transport.set_will(self.commands.will())
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
        return self.selection.wait_for_devices(count, timeout_s)

    def stop(self) -> None:
        """Ask the loop to stop after the current round (thread-safe)."""
        self._stop = True

    def _handle(self, message: Message, state: RoundState | None) -> None:
        """Judge one message (``MessageHandler.handle``); never raises for anything a device
        sent."""
        self.handler.handle(message, state)

    @property
    def _deferred(self) -> list[Message]:
        """Updates waiting, unacknowledged, for the next round to judge them."""
        return self.handler.deferred

    # -- run -------------------------------------------------------------------------------

    def run(self) -> list[RoundReport]:
        """Start a new run (or continue it, if the store has it) and run it to the end."""
        try:
            self.store.get_run(self.spec.run_id)
        except NotFoundError:
            self._start_new()
        else:
            self.current.restore()
        return self._loop()

    def _start_new(self) -> None:
        self.current.start_new()

    def _loop(self) -> list[RoundReport]:
        spec = self.spec
        run = self.store.get_run(spec.run_id)
        open_round = self.store.find_open_round(spec.run_id)
        first = open_round.round if open_round is not None else run.current_round + 1
        if first == 1 and open_round is None:
            run_initial_job(
                spec,
                self.strategy,
                self.current,
                selection=self.selection,
                commands=self.commands,
                handler=self.handler,
                transport=self.transport,
                progress=self._progress,
                clock=self.clock,
            )
        if spec.mode == "async":  # buffered asynchronous steps (fleet.runtime.async_rounds)
            steps = self._async_rounds().run(first)
            self.reports.extend(steps)
            stopped_early = len(steps) < spec.rounds + 1 - first
            first = spec.rounds + 1
        else:
            stopped_early = False
        for round_ in range(first, spec.rounds + 1):
            if self._stop:
                stopped_early = True
                break
            self.reports.append(self._round(round_))
        if stopped_early:
            self.store.set_run_status(spec.run_id, "stopped", error="stopped by request")
            self._clear_retained()
            return self.reports
        self.store.set_run_status(spec.run_id, "finished")
        self.commands.fleet_status(round_=spec.rounds, selected=0, received=0)
        self._clear_retained()
        return self.reports

    def _async_rounds(self) -> AsyncRounds:
        return AsyncRounds(
            self.spec,
            transport=self.transport,
            store=self.store,
            topics=self.topics,
            strategy=self.strategy,
            current=self.current,
            commands=self.commands,
            handler=self.handler,
            selection=self.selection,
            budgets=self.budgets,
            evaluator=self.evaluator,
            progress=self._progress,
            clock=self.clock,
            stopped=lambda: self._stop,
        )

    def _clear_retained(self) -> None:
        """The run has ended: nothing it owns stays retained on the broker."""
        commanded = {d for r in self.store.rounds(self.spec.run_id) for d in r.selected}
        self.commands.clear_retained(commanded)

    # -- one round -------------------------------------------------------------------------

    def _round(self, round_: int) -> RoundReport:
        """Open, command, collect until the round closes, cancel the stragglers, close."""
        start = self.clock()
        state, config = self._open(round_, start)
        self._command(state, config)
        closed_by = self.collector.collect(state)
        self.handler.last_closed = state
        for device_id in state.selected:  # stragglers: their work would be dropped anyway
            if not state.has(device_id) and device_id not in state.failed:
                self.commands.send(
                    device_id, round_, CancelCommand(reason=f"round {round_} closed")
                )
        return self._close(state, closed_by, start)

    def _open(self, round_: int, start: float) -> tuple[RoundState, RoundConfig]:
        """Select the round's devices (or take them from the store when resuming it), open it
        in the store, and take what was stored for it before a restart."""
        spec = self.spec
        model = self.current.model
        assert model is not None
        existing = self.store.find_open_round(spec.run_id)
        self.handler.drain()
        deadline = start + spec.round_timeout_s
        if existing is not None and existing.round == round_:
            # Resuming: same devices, same settings; the deadline restarts from now.
            selected, config = self.selection.choose(round_, model, tuple(existing.selected))
        else:
            selected, config = self.selection.choose(round_, model, None)
            self.store.open_round(
                spec.run_id,
                round_,
                selected=list(selected),
                deadline=deadline,
                model_version_in=model.version,
            )
        state = RoundState(round_, selected, deadline)
        state.budgets = self.budgets.plan(selected, model, config.training)
        state.readjust = config.readjust
        if self.coordinator is not None:
            self.collector.poll_stored(state, announce=False)  # after a restart: stored ones count
        else:
            self.handler.open_round(state)
        return state, config

    def _command(self, state: RoundState, config: RoundConfig) -> None:
        """Publish the model and command every selected device that has not answered yet."""
        model = self.current.model
        assert model is not None
        self.commands.download_dtype = config.download_values
        self.commands.publish_model()
        command = config.command(model.version, self.current.digest, deadline_unix_s=state.deadline)
        for device_id in state.selected:
            if state.has(device_id):
                continue
            budget = state.budgets.get(device_id, 0.0)
            device_command = dataclasses.replace(command, density_budget=budget)
            down = self.commands.send_round(device_id, state.round, device_command)
            state.download_bytes += down.bytes
            state.download_whole_bytes += down.whole
            self.store.add_traffic(self.spec.run_id, state.round, device_id, down=down.bytes)
        self.commands.fleet_status(state.round, len(state.selected), state.count)

    def _aggregate(
        self, state: RoundState, metrics: dict[str, float]
    ) -> tuple[list[tuple[int, str]], dict[str, float], float]:
        """The new model from the round's updates (and late ones, "next" policy), if at least
        ``min_updates`` arrived; else ``metrics["skipped"]`` is set and the updates are dropped.
        Returns the updates counted (empty: nothing to checkpoint), the handover's figures
        (sharded mode) and the largest ``train_s`` among the updates (seconds)."""
        spec, round_ = self.spec, state.round
        model = self.current.model
        assert model is not None
        received = state.received
        results = [state.results[d] for d in received if d in state.results]
        counted = [(round_, d) for d in received]
        taken = self.handler.take_late()  # emptied every round, whatever the policy
        late = taken if spec.late_policy == "next" else []
        handover: dict[str, float] = {}
        if len(received) >= spec.min_updates:
            aggregation_start = time.perf_counter()
            results.extend(result for _, result in late)
            counted.extend(key for key, _ in late)
            if self.coordinator is not None:
                new_model, done = self.coordinator.collect(
                    self.strategy, round_, model, received, timeout_s=self.handover_timeout_s
                )
                handover = {
                    "handover_s": done.wall_s,
                    "partials": len(done.partials),
                    "recovered": len(done.recovered),
                }
            elif state.budgets:
                new_model = aggregate_budgeted(self.strategy, round_, model, results, state.budgets)
            elif self._exact:
                new_model = aggregate_exact(self.strategy, round_, model, results)
            else:
                new_model = self.strategy.aggregate(round_, model, results)
            changed = masks_differ(model.masks, new_model.masks)
            self.current.set(new_model, mask_changed=changed)
            # Wall seconds of aggregation (the coordinator's handover included), for the
            # dashboard and /metrics.
            metrics["aggregate_s"] = time.perf_counter() - aggregation_start
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
        max_train_s = max(
            [r.metrics.get("train_s", 0.0) for r in results]
            + [float(row.meta.get("train_s", 0.0)) for row in state.rows.values()],
            default=0.0,
        )
        return counted, handover, max_train_s

    def _close(self, state: RoundState, closed_by: ClosedBy, start: float) -> RoundReport:
        """Aggregate, evaluate, checkpoint, then close the round in the store and report it."""
        spec, round_ = self.spec, state.round
        metrics: dict[str, float] = {}
        counted, handover, max_train_s = self._aggregate(state, metrics)
        model = self.current.model
        assert model is not None
        if self.evaluator is not None and (round_ % spec.eval_every == 0 or round_ == spec.rounds):
            metrics.update(self.evaluator(model))
        density = global_density(model)
        if counted:
            self.current.checkpoint(round_)
        if self.coordinator is not None:
            # The workers judged this round's updates; they recorded what they refused.
            state.rejected = self.collector.stored_rejections(round_)
        received = state.received
        metrics["download_whole_bytes"] = float(state.download_whole_bytes)
        report = RoundReport(
            round=round_,
            selected=state.selected,
            received=received,
            failed=tuple(sorted(state.failed)),
            rejected=state.rejected,
            model_version=model.version,
            density=density,
            upload_bytes=state.upload_bytes,
            download_bytes=state.download_bytes,
            wall_s=self.clock() - start,
            max_train_s=max_train_s,
            closed_by=closed_by,
            metrics=metrics,
        )
        self.collector.close_in_store(
            round_,
            model_version_out=model.version if counted else None,
            counted=counted,
            dropped=state.dropped,
            metrics={
                **metrics,
                **handover,
                "density": density,
                "wall_s": report.wall_s,
                "received": len(received),
                "selected": len(state.selected),
            },
            reason=closed_by,
        )
        federated = self.federated.after_round(round_)  # stored with the round it measures
        if federated:
            report = dataclasses.replace(report, metrics={**report.metrics, **federated})
        self._progress("round_closed", {"report": report})
        return report

"""Buffered asynchronous rounds (``mode: async``), after FedBuff (Nguyen et al., AISTATS 2022).

Instead of waiting for a round's slowest device, the fleet manager keeps up to C jobs in flight
and aggregates every B updates that arrive, whichever model version each trained from
(docs/algorithms.md, "Buffered asynchronous rounds"). The store's rounds become *aggregation
steps*: step ``k`` opens with the devices newly commanded then (refilling the free slots up to
C), collects until B updates are buffered (``k_of_n``) or ``job_timeout_s`` passes
(``deadline``), aggregates the buffer into version + 1, checkpoints it, and closes. A device
trains the model that was current when it was commanded; it publishes on the topic of the
step that commanded it, so the key (run, step, device) of its update is unique.

Judging an update (on top of the synchronous checks: routing, decoding, shapes, values):
``future_round`` for a step not yet opened; ``not_selected`` for a job never given;
``future_model_version`` / ``unknown_model_version`` for a model version newer than the
current one or no longer (or never) held; ``too_stale`` beyond ``max_staleness`` versions;
the budget checks of ``fleet.strategies.nested`` against the version it trained from. Each
rejection is recorded and counted by reason like any other.

Accepted updates are stored with status ``late`` (waiting for the aggregation that counts
them, ``Store.undecided_updates``) before they are acknowledged; an aggregation step closes
counting exactly the buffer it aggregated, atomically with its checkpoint. After ``kill -9``
the open step is resumed: the buffer is what the store holds undecided, the step's devices
that have not answered are commanded again, and a redelivered update finds its row and changes
nothing, so no update is counted twice.

Slots: a job frees its slot when its update arrives, when the device reports that it failed or
refused the job, or after ``job_timeout_s`` (a device that disconnected mid-job). Free slots
are refilled when the next step opens (not at every arrival: a step's devices are fixed when it
opens, as the store records them); so between C - B and C jobs are in flight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device.errors import DecodeError, NotFoundError, ValidationError
from device.seeding import derive_seed
from device.wire import envelope
from device.wire.messages import CancelCommand, DeviceUpdate, JobEvent, JobState
from device.wire.topics import Topics
from device.wire.transport import Message, Transport
from fleet.runtime.async_judge import Buffered, judge_update
from fleet.runtime.async_options import AsyncOptions
from fleet.runtime.budget_plan import BudgetPlanner
from fleet.runtime.checkpoint import CurrentModel, masks_differ
from fleet.runtime.commands import Commands
from fleet.runtime.handler import MessageHandler
from fleet.runtime.model_history import ModelHistory
from fleet.runtime.selection import Selection
from fleet.runtime.spec import ClosedBy, Evaluator, ProgressCallback, RoundReport, RunSpec
from fleet.runtime.spec import global_density as model_density
from fleet.state.store import Store
from fleet.strategies.base import BoolArray, ClientResult, Strategy
from fleet.strategies.nested import (
    aggregate_nested,
    is_budgeted,
    trained_density,
)
from fleet.strategies.staleness import map_to_current, staleness_weight
from fleet.strategies.validate import reconstruct

log = logging.getLogger("fleet.runtime.runner")

__all__ = ["AsyncRounds", "Buffered"]


@dataclass
class _Step:
    """The aggregation step in progress."""

    round: int
    selected: tuple[str, ...]
    deadline: float
    rejected: int = 0
    upload_bytes: int = 0
    download_bytes: int = 0
    download_whole_bytes: int = 0  # what download_bytes would be without model patches
    failed: set[str] = field(default_factory=set)


class AsyncRounds:
    """The asynchronous loop of one run (module docstring), on the runner's parts."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        transport: Transport,
        store: Store,
        topics: Topics,
        strategy: Strategy,
        current: CurrentModel,
        commands: Commands,
        handler: MessageHandler,
        selection: Selection,
        budgets: BudgetPlanner,
        evaluator: Evaluator | None,
        progress: ProgressCallback,
        clock: Callable[[], float],
        stopped: Callable[[], bool],
    ) -> None:
        self.spec = spec
        self.options = spec.async_options or AsyncOptions()
        self.transport = transport
        self.store = store
        self.topics = topics
        self.strategy = strategy
        self.current = current
        self.commands = commands
        self.handler = handler
        self.selection = selection
        self.budgets = budgets
        self.evaluator = evaluator
        self.progress = progress
        self.clock = clock
        self.stopped = stopped
        self.history = ModelHistory(self.options.max_staleness + 1)
        self.in_flight: dict[str, tuple[int, float]] = {}  # device -> (step, commanded at)
        self.buffer: dict[tuple[int, str], Buffered] = {}
        self._plans: dict[int, tuple[tuple[str, ...], Mapping[str, Any]]] = {}
        self.step: _Step | None = None
        # Updates received while no step is open (and redeliveries the handler deferred before
        # the run started), judged when the next step opens.
        self._early: list[Message] = list(handler.deferred)
        handler.deferred.clear()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, first: int) -> list[RoundReport]:
        """Aggregation steps ``first .. spec.rounds`` (fewer when stopped); their reports."""
        model = self.current.model
        assert model is not None
        self.history.load(self.store, self.spec.run_id, model.version, model.model_name)
        self.history.add(model, self.current.digest, self.current.book_for(model.version))
        self._restore_buffer()
        reports: list[RoundReport] = []
        for k in range(first, self.spec.rounds + 1):
            if self.stopped():
                break
            reports.append(self._run_step(k))
        for device_id, (k, _) in sorted(self.in_flight.items()):
            # Jobs still in flight at the end: their work would be dropped anyway.
            self.commands.send(device_id, k, CancelCommand(reason="the run has ended"))
        return reports

    def _run_step(self, k: int) -> RoundReport:
        start = self.clock()
        step = self._open(k, start)
        self.step = step
        early, self._early = self._early, []
        for waiting in early:  # updates that arrived between steps, judged now
            self._dispatch(waiting)
        closed_by: ClosedBy = "deadline"
        while not self.stopped():
            self._expire()
            if len(self.buffer) >= self.options.buffer:
                closed_by = "k_of_n"
                break
            if self.clock() >= step.deadline or not self.in_flight:
                break  # nothing more can arrive in time: aggregate what is buffered
            message = self.transport.get(timeout_s=0.2)
            if message is not None:
                self._dispatch(message)
        report = self._close(step, closed_by, start)
        self.step = None
        return report

    def _open(self, k: int, start: float) -> _Step:
        """Open step ``k`` (or take the open one after a restart) and command its devices."""
        spec, model = self.spec, self.current.model
        assert model is not None
        self._idle(0.0)
        existing = self.store.find_open_round(spec.run_id)
        rng = np.random.default_rng(derive_seed(spec.run_id, k, "async-select", spec.seed))
        if existing is not None and existing.round == k:
            selected = tuple(existing.selected)
            config = self.strategy.configure_round(k, model, self.selection.candidates(), rng)
            budgets = {str(d): float(b) for d, b in existing.plan.get("budgets", {}).items()}
            answered = {u.device_id for u in self.store.updates_for_round(spec.run_id, k)}
            to_command = [d for d in selected if d not in answered]
        else:
            busy = self.in_flight
            candidates = [c for c in self.selection.candidates() if c.device_id not in busy]
            wait_until = self.clock() + spec.round_timeout_s
            while not candidates and not self.in_flight and self.clock() < wait_until:
                self._idle(0.2)  # give late births a moment (never the handler's drain: it
                candidates = self.selection.candidates()  # would judge updates synchronously)
            if not candidates and not self.in_flight:
                raise NotFoundError(
                    f"no eligible device is online for run {spec.run_id!r} "
                    f"(tags {list(spec.tags)}) after {spec.round_timeout_s:g} s"
                )
            free = max(0, self.options.concurrency - len(self.in_flight))
            count = min(free, len(candidates))
            if count:
                config = self.strategy.configure_round(k, model, candidates, rng, num_select=count)
            else:
                config = self.strategy.configure_round(k, model, candidates, rng, num_select=0)
            selected = tuple(config.selected) if count else ()
            budgets = self.budgets.plan(selected, model, config.training)
            readjust = None if config.readjust is None else config.readjust.alpha
            self.store.open_round(
                spec.run_id,
                k,
                selected=list(selected),
                deadline=start + self.options.job_timeout_s,
                model_version_in=model.version,
                plan={"budgets": budgets, "readjust_alpha": readjust, "mode": "async"},
            )
            to_command = list(selected)
        step = _Step(k, selected, start + self.options.job_timeout_s)
        self.commands.publish_model()
        command = config.command(model.version, self.current.digest, deadline_unix_s=step.deadline)
        for device_id in to_command:
            device_command = dataclasses.replace(
                command, density_budget=budgets.get(device_id, 0.0)
            )
            down = self.commands.send_round(device_id, k, device_command)
            step.download_bytes += down.bytes
            step.download_whole_bytes += down.whole
            self.store.add_traffic(spec.run_id, k, device_id, down=down.bytes)
            self.in_flight[device_id] = (k, start)
        self.commands.fleet_status(k, len(self.in_flight), len(self.buffer))
        return step

    def _idle(self, timeout_s: float) -> None:
        """Between steps: handle births, wills and events now; keep updates for the next step
        (``_dispatch`` judges them against an open step)."""
        deadline = self.clock() + timeout_s
        while True:
            message = self.transport.get(timeout_s=max(0.0, deadline - self.clock()))
            if message is None:
                return
            try:
                is_update = self.topics.parse(message.topic).kind == "dev_update"
            except (ValueError, DecodeError):
                is_update = False
            if is_update:
                self._early.append(message)
            else:
                self._dispatch(message)

    def _expire(self) -> None:
        """Free the slots of jobs older than the job timeout (their devices may have gone)."""
        now = self.clock()
        for device_id, (k, at) in list(self.in_flight.items()):
            if now - at >= self.options.job_timeout_s:
                log.info("job of %s from step %d timed out: slot freed", device_id, k)
                del self.in_flight[device_id]

    # -- messages ----------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        try:
            parsed = self.topics.parse(message.topic)
        except (ValueError, DecodeError):
            self.handler.handle(message, None)
            return
        if parsed.kind == "dev_update" and parsed.round > 0 and not message.retain:
            try:
                self._on_update(parsed.device_id, parsed.run_id, parsed.round, message)
            except Exception:  # never stop the run for a device's message
                log.exception("error handling %s", message.topic)
                self.transport.ack(message)
            return
        if parsed.kind == "dev_events":
            self._free_on_failure(parsed.device_id, message)
        self.handler.handle(message, None)

    def _free_on_failure(self, device_id: str, message: Message) -> None:
        """A device that failed, refused or cancelled its job frees its slot at once."""
        try:
            env = envelope.decode(message.payload)
        except DecodeError:
            return
        job = self.in_flight.get(device_id)
        if (
            isinstance(env.body, JobEvent)
            and env.body.state in (JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)
            and job is not None
            and env.run_id == self.spec.run_id
            and env.round == job[0]
        ):
            del self.in_flight[device_id]
            if self.step is not None:
                self.step.failed.add(device_id)

    def _job_plan(self, round_: int) -> tuple[tuple[str, ...], Mapping[str, Any]]:
        plan = self._plans.get(round_)
        if plan is None:
            record = self.store.get_round(self.spec.run_id, round_)  # NotFoundError: no step
            plan = (tuple(record.selected), dict(record.plan))
            self._plans[round_] = plan
        return plan

    def _on_update(self, device_id: str, run_id: str, round_: int, message: Message) -> None:
        spec, step = self.spec, self.step
        assert step is not None
        try:
            if run_id != spec.run_id:
                raise ValidationError(f"update for run {run_id!r}", reason="other_run")
            if len(message.payload) > spec.max_update_bytes:
                raise ValidationError(
                    f"{len(message.payload)} bytes exceeds the limit {spec.max_update_bytes}",
                    reason="oversized",
                )
            if round_ > step.round:
                raise ValidationError(
                    f"update for step {round_}, the current is {step.round}", reason="future_round"
                )
            try:
                selected, plan = self._job_plan(round_)
            except NotFoundError:
                selected, plan = (), {}
            if device_id not in selected:
                raise ValidationError(
                    f"device {device_id!r} got no job in step {round_}", reason="not_selected"
                )
            if (round_, device_id) in self.buffer or self.store.get_update(
                spec.run_id, round_, device_id
            ):
                log.info("redelivered update of %s for step %d ignored", device_id, round_)
                self.transport.ack(message)
                return
            item = judge_update(
                message.payload, device_id, round_, plan, self.history, self.strategy,
                self.spec.run_id, self.spec.max_update_bytes, self.options.max_staleness,
                self._version(),
            )  # fmt: skip
        except ValidationError as exc:
            self.handler.reject(device_id, round_, exc)
            step.rejected += 1
            if self.in_flight.get(device_id, (None,))[0] == round_:
                del self.in_flight[device_id]
            self.transport.ack(message)
            return
        meta = {
            "train_s": float(item.result.metrics.get("train_s", 0.0)),
            "density": trained_density(self.history_model(item.version), item.result),
            "model_version": item.version,
            "staleness": self._version() - item.version,
        }
        # "late": waiting for the aggregation that counts it (module docstring).
        is_new = self.store.record_update(
            spec.run_id, round_, device_id, message.payload, item.result.num_examples, meta,
            status="late",
        )  # fmt: skip
        self.transport.ack(message)  # only now: the update is durable
        if not is_new:
            return
        self.buffer[(round_, device_id)] = item
        step.upload_bytes += len(message.payload)
        if self.in_flight.get(device_id, (None,))[0] == round_:
            del self.in_flight[device_id]
        self.progress(
            "update",
            {
                "device_id": device_id,
                "round": step.round,
                "received": len(self.buffer),
                "selected": self.options.buffer,
            },
        )

    def _version(self) -> int:
        model = self.current.model
        assert model is not None
        return model.version

    def history_model(self, version: int) -> Any:
        held = self.history.get(version)
        assert held is not None
        return held.model

    # -- aggregation -------------------------------------------------------------------------

    def _restore_buffer(self) -> None:
        """After a restart: the undecided updates are the buffer (module docstring)."""
        for row in self.store.undecided_updates(self.spec.run_id):
            version = int(row.meta.get("model_version", -1))
            held = self.history.get(version)
            try:
                _, plan = self._job_plan(row.round)
                if held is None:
                    raise ValidationError("model version not held", reason="unknown_model_version")
                env = envelope.decode(row.load_payload(), book_for=self.history.book_for)
                if not isinstance(env.body, DeviceUpdate):
                    raise ValidationError("not an update", reason="wrong_kind")
                result = reconstruct(
                    env.body, held.model, device_id=row.device_id, model_digest=held.digest
                )
            except (ValidationError, DecodeError, NotFoundError) as exc:
                log.warning(
                    "stored update of %s (step %d) dropped: %s", row.device_id, row.round, exc
                )
                continue
            budget = float(plan.get("budgets", {}).get(row.device_id, 0.0))
            self.buffer[(row.round, row.device_id)] = Buffered(
                row.round, row.device_id, version, budget, result, row.payload_bytes
            )

    def _close(self, step: _Step, closed_by: ClosedBy, start: float) -> RoundReport:
        spec = self.spec
        model = self.current.model
        assert model is not None
        metrics: dict[str, float] = {}
        counted: list[tuple[int, str]] = []
        max_train_s = 0.0
        if len(self.buffer) >= spec.min_updates and self.buffer:
            items = [self.buffer[key] for key in sorted(self.buffer)]
            mapped: list[ClientResult] = []
            assigned: dict[str, dict[str, BoolArray]] = {}
            staleness = [model.version - item.version for item in items]
            max_train_s = max(float(i.result.metrics.get("train_s", 0.0)) for i in items)
            positions_dropped = 0
            for item, s in zip(items, staleness, strict=True):
                held = self.history.get(item.version)
                assert held is not None
                result, dropped = map_to_current(
                    item.result, held.model, model, staleness_weight(s)
                )
                positions_dropped += dropped
                # Unique ids for the aggregation (a device may have two updates buffered).
                key = f"{item.device_id}@{item.round}"
                result = ClientResult(
                    key, result.num_examples, result.weights, result.masks,
                    result.importance, result.metrics, result.profile,
                )  # fmt: skip
                if s > 0 or is_budgeted(held.model, item.budget):
                    assigned[key] = dict(result.masks)
                mapped.append(result)
            new_model = aggregate_nested(self.strategy, step.round, model, mapped, assigned)
            self.current.set(new_model, mask_changed=masks_differ(model.masks, new_model.masks))
            self.current.checkpoint(step.round)
            book = self.current.book_for(new_model.version)
            self.history.add(new_model, self.current.digest, book)
            counted = [(item.round, item.device_id) for item in items]
            metrics.update(
                buffered=float(len(items)),
                staleness_mean=float(np.mean(staleness)),
                staleness_max=float(max(staleness)),
                positions_dropped=float(positions_dropped),
            )
            self.buffer.clear()
        else:
            metrics["skipped"] = 1.0
        model = self.current.model
        assert model is not None
        if self.evaluator is not None and (
            step.round % spec.eval_every == 0 or step.round == spec.rounds
        ):
            metrics.update(self.evaluator(model))
        density = model_density(model)
        metrics["in_flight"] = float(len(self.in_flight))
        metrics["download_whole_bytes"] = float(step.download_whole_bytes)
        report = RoundReport(
            round=step.round,
            selected=step.selected,
            received=tuple(sorted(d for _, d in counted)),
            failed=tuple(sorted(step.failed)),
            rejected=step.rejected,
            model_version=model.version,
            density=density,
            upload_bytes=step.upload_bytes,
            download_bytes=step.download_bytes,
            wall_s=self.clock() - start,
            max_train_s=max_train_s,
            closed_by=closed_by,
            metrics=metrics,
        )
        self.store.close_round(
            spec.run_id,
            step.round,
            model_version_out=model.version if counted else None,
            counted=counted,
            metrics={**metrics, "density": density, "wall_s": report.wall_s},
            reason=closed_by,
        )
        self.progress("round_closed", {"report": report})
        return report

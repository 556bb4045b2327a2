"""Judging what devices send: births and wills, job events, and updates (validate, store,
then acknowledge), with redeliveries, the late policy and rejections.

A device's bytes are untrusted: ``MessageHandler.handle`` never raises for anything a device
sent, acknowledges every message once (an update only once it is durable: payload file, then
row, ``Store.record_update``), and records at most one outcome per message (accepted, or
rejected with a reason). A redelivered update (the broker re-sends what was stored but not
acknowledged when the fleet manager stopped) is recognised as a duplicate and changes nothing.

Rejections are logged as warnings under the ``fleet.runtime.runner`` logger (device, round,
what was wrong, reason code), the name docs/security.md gives operators.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from device.errors import DecodeError, ValidationError
from device.wire import envelope
from device.wire.messages import DeviceStatus, Envelope, InitialPruneResult, JobEvent, JobState
from device.wire.topics import Topics
from device.wire.transport import Message, Transport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.checkpoint import CurrentModel
from fleet.runtime.collection import RoundState
from fleet.runtime.spec import ProgressCallback, RunSpec
from fleet.state.store import Store
from fleet.strategies.base import ClientResult, Strategy
from fleet.strategies.nested import check_budgeted, trained_density
from fleet.strategies.validate import Expectation, check_routing, reconstruct

log = logging.getLogger("fleet.runtime.runner")


class MessageHandler:
    """Handles the runner's incoming messages for one run, against the current model.

    ``deferred``: updates that arrived while no round was open, unacknowledged until
    ``open_round`` judges them; ``late``: updates accepted under the "next" late policy, for the
    next aggregation; ``last_closed``: the round late updates are judged against;
    ``initial_device``/``initial_result``: the device the initial job waits for, and its result.
    ``sharded``: the aggregator workers own the rounds' updates, the runner only round 0's.
    """

    def __init__(
        self,
        spec: RunSpec,
        transport: Transport,
        store: Store,
        topics: Topics,
        registry: DeviceRegistry,
        strategy: Strategy,
        current: CurrentModel,
        *,
        progress: ProgressCallback,
        clock: Callable[[], float],
        sharded: bool,
    ) -> None:
        self.spec = spec
        self.transport = transport
        self.store = store
        self.topics = topics
        self.registry = registry
        self.strategy = strategy
        self.current = current
        self.progress = progress
        self.clock = clock
        self.sharded = sharded
        self.deferred: list[Message] = []
        self.late: list[tuple[tuple[int, str], ClientResult]] = []
        self.last_closed: RoundState | None = None
        self.initial_device: str | None = None
        self.initial_result: InitialPruneResult | None = None

    def drain(self, timeout_s: float = 0.0) -> None:
        """Handle whatever is queued (births, wills, events) and what arrives within
        ``timeout_s`` seconds, outside any round."""
        deadline = self.clock() + timeout_s
        while True:
            message = self.transport.get(timeout_s=max(0.0, deadline - self.clock()))
            if message is None:
                return
            self.handle(message, None)

    def open_round(self, state: RoundState) -> None:
        """A round (new or resumed) is open: updates stored for it before a restart count,
        exactly once; then the deferred updates are judged against it."""
        for row in self.store.updates_for_round(
            self.spec.run_id, state.round, statuses=("accepted",)
        ):
            result = self.decode_stored(row.device_id, state.round, row.load_payload())
            if result is None:
                state.dropped.append((state.round, row.device_id))
            else:
                state.results[row.device_id] = result
                state.upload_bytes += row.payload_bytes
        deferred, self.deferred = self.deferred, []
        for message in deferred:
            self.handle(message, state)

    def take_late(self) -> list[tuple[tuple[int, str], ClientResult]]:
        """The late updates accepted since the last call ("next" policy), emptied."""
        late, self.late = self.late, []
        return late

    def handle(self, message: Message, state: RoundState | None) -> None:
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
            elif parsed.kind == "dev_update" and self.sharded and parsed.round:
                # Sharded: the workers own the rounds' updates (a subscription left in this
                # client's persistent session from an unsharded start can still deliver them).
                log.debug("update on %s left to the aggregator workers", message.topic)
            elif parsed.kind == "dev_update" and message.retain:
                # Updates are never retained (DESIGN section 4) and the ACL cannot forbid the
                # flag: a retained one would be replayed to every new subscriber.
                retained = ValidationError("retained message on an update topic", reason="retained")
                self.reject(parsed.device_id, parsed.round, retained)
                if state is not None:
                    state.rejected += 1
            elif parsed.kind == "dev_update" and parsed.round == 0:
                if parsed.device_id == self.initial_device and parsed.run_id == self.spec.run_id:
                    self._on_initial_result(parsed.device_id, message)
                else:
                    self.reject(
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

    def _on_event(self, device_id: str, message: Message, state: RoundState | None) -> None:
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
        self.progress("event", {"device_id": device_id, "event": event, "round": env.round})

    def _on_update(
        self, device_id: str, run_id: str, round_: int, message: Message, state: RoundState | None
    ) -> None:
        model = self.current.model
        if model is None:
            # Before run() has made or restored the model (connect, wait_for_devices): a
            # redelivered update waits, unacknowledged, for the first round to judge it.
            self.deferred.append(message)
            return
        digest = self.current.digest
        try:
            if len(message.payload) > self.spec.max_update_bytes:
                raise ValidationError(
                    f"{len(message.payload)} bytes exceeds the limit {self.spec.max_update_bytes}",
                    reason="oversized",
                )
            if run_id == self.spec.run_id:
                self._check_round_window(round_, state)
                if self._is_exact_replay(device_id, round_, state, message):
                    log.info(
                        "replay of the stored update of %s for round %d ignored", device_id, round_
                    )
                    self.transport.ack(message)
                    return
            try:
                env = envelope.decode(
                    message.payload,
                    book_for=self.current.book_for,
                    max_bytes=self.spec.max_update_bytes,
                )
            except DecodeError as exc:
                raise ValidationError(str(exc), reason=f"decode:{exc.reason}") from exc
            closed = self.last_closed
            if closed is not None and run_id == self.spec.run_id and round_ == closed.round:
                # Trained for a round that has closed: the late policy decides.
                if self.spec.late_policy == "next" and self.current.previous is not None:
                    self._accept_late(device_id, env, message)
                    return
                raise ValidationError(
                    f"update for round {round_} arrived after the round closed", reason="late"
                )
            if state is None:
                # Between rounds (or before a resumed round is set up): judge it once the next
                # round is open; it stays unacknowledged until then.
                self.deferred.append(message)
                return
            exp = Expectation(self.spec.run_id, state.round, state.selected, model, digest)
            update = check_routing(env, device_id, run_id, round_, exp)
            if device_id in state.results:
                self._check_redelivery(device_id, state.round, message)
                log.info("redelivered update from %s for round %d ignored", device_id, state.round)
                self.transport.ack(message)
                return
            result = reconstruct(update, model, device_id=device_id, model_digest=digest)
            budget = state.budgets.get(device_id, 0.0)
            check_budgeted(self.strategy, model, result, budget, state.readjust)
        except ValidationError as exc:
            self.reject(device_id, round_, exc)
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
            {"train_s": update.train_s, "density": trained_density(model, result)},
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
        self.progress(
            "update",
            {
                "device_id": device_id,
                "round": state.round,
                "received": len(state.results),
                "selected": len(state.selected),
            },
        )

    def _check_round_window(self, round_: int, state: RoundState | None) -> None:
        """Judge an update by the round in its topic alone, before it is decoded: the masks
        of old model versions are gone, so decoding an old round's update would fail as
        ``decode:unknown_mask`` and hide what is wrong with it. The rounds that can still be
        judged are the open one and the one that just closed (the late policy's); anything
        older is ``stale_round``, anything after the open round ``future_round``."""
        closed = self.last_closed.round if self.last_closed is not None else None
        current = state.round if state is not None else None
        oldest = closed if closed is not None else current
        if oldest is not None and round_ < oldest:
            raise ValidationError(
                f"update for round {round_}, current is {current or oldest + 1}",
                reason="stale_round",
            )
        if current is not None and round_ > current:
            raise ValidationError(
                f"update for future round {round_}, current is {current}", reason="future_round"
            )

    def _is_exact_replay(
        self, device_id: str, round_: int, state: RoundState | None, message: Message
    ) -> bool:
        """The same bytes as the update already stored for this device and a round that can
        still be judged: a broker redelivery or somebody's replay, which changes nothing and
        counts against nobody (docs/security.md). The open round's redeliveries are handled
        with its results (``_check_redelivery``); this catches the round that just closed."""
        if state is not None and round_ == state.round:
            return False
        stored = self.store.get_update(self.spec.run_id, round_, device_id)
        return (
            stored is not None
            and stored.payload_digest == hashlib.sha256(message.payload).hexdigest()
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
        """The "next" late policy: an update trained on the previous model, stored as late and
        kept for the next aggregation."""
        assert self.current.previous is not None
        model, digest = self.current.previous
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
            self.late.append(((env.round, device_id), result))

    def reject(self, device_id: str, round_: int, exc: ValidationError) -> None:
        """Log and record a rejection (``exc.reason`` is its reason code)."""
        log.warning(
            "rejected update from %s for round %d: %s (%s)", device_id, round_, exc, exc.reason
        )
        self.store.record_rejection(self.spec.run_id, round_, device_id, exc.reason, str(exc))

    def decode_stored(self, device_id: str, round_: int, payload: bytes) -> ClientResult | None:
        """A stored update decoded and checked again against the current model (after a
        restart); None, logged, when it no longer passes."""
        model = self.current.model
        assert model is not None
        digest = self.current.digest
        try:
            env = envelope.decode(payload, book_for=self.current.book_for)
            exp = Expectation(self.spec.run_id, round_, (device_id,), model, digest)
            update = check_routing(env, device_id, self.spec.run_id, round_, exp)
            return reconstruct(update, model, device_id=device_id, model_digest=digest)
        except (DecodeError, ValidationError) as exc:
            log.error(
                "stored update of %s for round %d no longer valid: %s", device_id, round_, exc
            )
            return None

    def _on_initial_result(self, device_id: str, message: Message) -> None:
        """The initial job's result (round 0), kept in ``initial_result`` when well-formed."""
        try:
            env = envelope.decode(message.payload, max_bytes=self.spec.max_update_bytes)
        except DecodeError as exc:
            self.reject(device_id, 0, ValidationError(str(exc), reason=f"decode:{exc.reason}"))
            return
        if (
            not isinstance(env.body, InitialPruneResult)
            or env.device_id != device_id
            or env.run_id != self.spec.run_id
        ):
            self.reject(
                device_id,
                0,
                ValidationError(
                    "expected the initial pruning result of this run", reason="wrong_kind"
                ),
            )
            return
        self.initial_result = env.body

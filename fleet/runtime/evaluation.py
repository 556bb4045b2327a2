"""Federated evaluation: the global model measured on the devices' own held-out data.

A run with ``RunSpec.evaluate`` (``FederatedEvaluation``: ``every``, ``fraction``,
``min_devices``, ``timeout_s``) is evaluated on its devices after the aggregation of every
``every``-th round and of the last one. ``FederatedEvaluator.after_round`` (the runner's hook,
called once the round is closed in the store):

1. samples the devices: ``ceil(fraction * eligible)`` of the eligible online devices, at least
   ``min_devices`` (as many as there are, if fewer), idle ones as well as the round's, seeded by
   run, round and ``spec.seed`` (:func:`sample_devices`);
2. publishes the current model (once per version) and sends each an ``EvaluateCommand`` with
   the correlation id ``{run}/{round}/{device}/evaluate``;
3. handles messages until every sampled device answered (an ``EVALUATED`` job event, or a
   failed / rejected / cancelled one) or ``timeout_s`` passed; every message is also handed to
   the runner's ``MessageHandler`` (births, failures shown by ``fleet status``, late updates);
4. checks each reply like an update (:func:`check_reply`): finite loss >= 0, accuracy in
   [0, 1], a whole number of examples >= 1 and no more than the device reported having for
   evaluation (its status ``eval_examples``, else its ``dataset_size``). A reply that fails is
   rejected: recorded with a reason code (``Store.record_rejection``, counted per device) and
   left out;
5. combines the accepted replies weighted by example count (:func:`combine`) and stores them
   with the round (``Store.set_round_metrics``): ``federated_accuracy`` (0..1),
   ``federated_loss`` (mean cross-entropy, nats per example), ``federated_examples``,
   ``federated_devices`` (replies combined), ``federated_rejected`` and ``federated_s`` (the
   evaluation's wall time, seconds; not in the round's ``wall_s``). With fewer than
   ``min_devices`` accepted replies, no accuracy or loss is stored, and ``federated_skipped``
   is 1.

The runner waits for the evaluation before it opens the next round, so a device's evaluation and
its next training job never race for the same model version. The evaluation's messages are not
counted in the round's traffic. After a restart, rounds closed before it are not evaluated again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from device.errors import DecodeError, ValidationError
from device.seeding import derive_seed
from device.wire import envelope
from device.wire.messages import Envelope, EvaluateCommand, JobEvent, JobState
from device.wire.topics import Topics
from device.wire.transport import Message, Transport
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.checkpoint import CurrentModel
from fleet.runtime.collection import RoundState
from fleet.runtime.spec import FederatedEvaluation, RunSpec
from fleet.state.store import Store

__all__ = [
    "EvaluationReply",
    "FederatedEvaluator",
    "check_reply",
    "combine",
    "correlation_id",
    "sample_devices",
]

log = logging.getLogger(__name__)

POLL_S = 0.5
"""Seconds the collection waits for one message before it looks at its deadline again."""

_ENDED = (JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)


def correlation_id(run_id: str, round_: int, device_id: str) -> str:
    """The correlation id of an evaluation command (and of the events that answer it)."""
    return f"{run_id}/{round_}/{device_id}/evaluate"


@dataclass(frozen=True)
class EvaluationReply:
    """One device's accepted evaluation: mean ``loss`` (nats per example, >= 0),
    ``accuracy`` in [0, 1], over ``examples`` >= 1 examples."""

    device_id: str
    loss: float
    accuracy: float
    examples: int


def sample_devices(
    eligible: Sequence[str], settings: FederatedEvaluation, rng: np.random.Generator
) -> list[str]:
    """The devices to evaluate on, sorted: ``max(min_devices, ceil(fraction * n))`` of the
    ``n`` eligible ones (all of them when there are fewer), drawn without replacement."""
    pool = sorted(set(eligible))
    want = min(len(pool), max(settings.min_devices, math.ceil(settings.fraction * len(pool))))
    if want >= len(pool):
        return pool
    chosen = rng.choice(len(pool), size=want, replace=False)
    return sorted(pool[int(i)] for i in chosen)


def check_reply(device_id: str, metrics: Mapping[str, float], limit: int) -> EvaluationReply:
    """The reply of ``device_id`` (its ``EVALUATED`` event's metrics) when it is believable.

    ``limit`` is how many examples the device reported it evaluates on (0: it reported none).

    Raises:
        ValidationError: reason ``eval_metrics`` (loss, accuracy or examples missing or not a
            finite number in range) or ``eval_examples`` (more examples than ``limit``).
    """
    values = {}
    for key in ("loss", "accuracy", "examples"):
        value = metrics.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationError(
                f"evaluation reply without a finite {key} ({value!r})", reason="eval_metrics"
            )
        values[key] = float(value)
    if values["loss"] < 0:
        raise ValidationError(f"negative loss {values['loss']}", reason="eval_metrics")
    if not 0.0 <= values["accuracy"] <= 1.0:
        raise ValidationError(
            f"accuracy {values['accuracy']} outside [0, 1]", reason="eval_metrics"
        )
    examples = values["examples"]
    if examples < 1 or examples != int(examples):
        raise ValidationError(
            f"examples {examples} is not a whole number >= 1", reason="eval_metrics"
        )
    if examples > limit:
        raise ValidationError(
            f"claims {int(examples)} evaluation examples, the device reported {limit}",
            reason="eval_examples",
        )
    return EvaluationReply(device_id, values["loss"], values["accuracy"], int(examples))


def combine(replies: Iterable[EvaluationReply]) -> dict[str, float]:
    """Loss and accuracy over all the replies' examples (each device weighted by its example
    count): ``federated_loss``, ``federated_accuracy``, ``federated_examples``,
    ``federated_devices``. Empty without replies."""
    replies = list(replies)
    total = sum(r.examples for r in replies)
    if not total:
        return {}
    return {
        "federated_loss": sum(r.loss * r.examples for r in replies) / total,
        "federated_accuracy": sum(r.accuracy * r.examples for r in replies) / total,
        "federated_examples": float(total),
        "federated_devices": float(len(replies)),
    }


@dataclass
class _Collection:
    """One evaluation in progress: the sampled devices, and who answered how."""

    round: int
    sampled: tuple[str, ...]
    accepted: dict[str, EvaluationReply] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)  # failed, rejected or cancelled on the device
    rejected: int = 0

    @property
    def done(self) -> bool:
        return len(self.accepted) + len(self.ended) >= len(self.sampled)


class FederatedEvaluator:
    """Runs a run's federated evaluations (module docstring). ``candidates()`` gives the
    devices that may take work now (``Selection.candidates``); ``publish_model()`` publishes
    the current model (``Commands.publish_model``); ``handle(message, None)`` is the runner's
    message handler, which acknowledges every message it is given."""

    def __init__(
        self,
        spec: RunSpec,
        transport: Transport,
        store: Store,
        topics: Topics,
        registry: DeviceRegistry,
        current: CurrentModel,
        *,
        candidates: Callable[[], Sequence[str]],
        publish_model: Callable[[], None],
        handle: Callable[[Message, RoundState | None], None],
        clock: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.transport = transport
        self.store = store
        self.topics = topics
        self.registry = registry
        self.current = current
        self.candidates = candidates
        self.publish_model = publish_model
        self.handle = handle
        self.clock = clock

    def after_round(self, round_: int) -> dict[str, float]:
        """Evaluate the current model if ``round_`` is due; the metrics stored with it (empty
        when the run has no federated evaluation or the round is not due)."""
        settings = self.spec.evaluate
        if settings is None or not settings.due(round_, self.spec.rounds):
            return {}
        rng = np.random.default_rng(
            derive_seed(self.spec.run_id, round_, "evaluate", self.spec.seed)
        )
        sampled = sample_devices(self.candidates(), settings, rng)
        collection = _Collection(round_, tuple(sampled))
        start = self.clock()
        if sampled:
            self._command(collection)
            self._collect(collection, start + settings.timeout_s)
        metrics = {**self._result(collection, settings), "federated_s": self.clock() - start}
        self.store.set_round_metrics(self.spec.run_id, round_, metrics)
        return metrics

    def _command(self, collection: _Collection) -> None:
        model = self.current.model
        assert model is not None
        self.publish_model()
        command = EvaluateCommand(model_version=model.version, model_digest=self.current.digest)
        for device_id in collection.sampled:
            payload = envelope.encode(
                Envelope(
                    body=command,
                    run_id=self.spec.run_id,
                    round=collection.round,
                    device_id=device_id,
                    correlation_id=correlation_id(self.spec.run_id, collection.round, device_id),
                )
            )
            self.transport.publish(self.topics.dev_cmd(device_id), payload, qos=1, wait=False)

    def _collect(self, collection: _Collection, deadline: float) -> None:
        while not collection.done:
            remaining = deadline - self.clock()
            if remaining <= 0:
                missing = set(collection.sampled) - collection.accepted.keys() - collection.ended
                log.info(
                    "round %d: evaluation timed out without %s", collection.round, sorted(missing)
                )
                return
            message = self.transport.get(timeout_s=min(remaining, POLL_S))
            if message is None:
                continue
            try:
                self._observe(message, collection)
            except Exception:  # a device's message must never stop the run
                log.exception("error reading %s as an evaluation reply", message.topic)
            self.handle(message, None)  # the runner's view too; it acknowledges the message

    def _observe(self, message: Message, collection: _Collection) -> None:
        """Take the evaluation reply in ``message``, if it is one of this evaluation's."""
        try:
            parsed = self.topics.parse(message.topic)
        except ValueError:
            return
        if parsed.kind != "dev_events" or not message.payload:
            return
        try:
            env = envelope.decode(message.payload)
        except DecodeError:
            return  # the handler logs it
        event = env.body
        if (
            not isinstance(event, JobEvent)
            or env.run_id != self.spec.run_id
            or env.round != collection.round
        ):
            return
        device_id = parsed.device_id
        if device_id in collection.accepted or device_id in collection.ended:
            return  # a redelivery
        expected = device_id in collection.sampled and env.correlation_id == correlation_id(
            self.spec.run_id, collection.round, device_id
        )
        if event.state in _ENDED and expected:
            log.info("device %s could not evaluate: %s", device_id, event.reason)
            collection.ended.add(device_id)
            return
        if event.state is not JobState.EVALUATED:
            return
        try:
            if not expected:
                raise ValidationError(
                    f"evaluation reply for round {collection.round} nobody asked this device for",
                    reason="eval_not_selected",
                )
            reply = check_reply(device_id, event.metrics, self._limit(device_id))
        except ValidationError as exc:
            log.warning(
                "rejected evaluation from %s for round %d: %s (%s)",
                device_id,
                collection.round,
                exc,
                exc.reason,
            )
            self.store.record_rejection(
                self.spec.run_id, collection.round, device_id, exc.reason, str(exc)
            )
            collection.rejected += 1
            if expected:
                collection.ended.add(device_id)
            return
        collection.accepted[device_id] = reply

    def _limit(self, device_id: str) -> int:
        """The examples ``device_id`` reported it evaluates on (its dataset size for an agent
        that does not report them; 0 for an unknown device)."""
        info = self.registry.find(device_id)
        if info is None:
            return 0
        return info.eval_examples or info.dataset_size

    def _result(self, collection: _Collection, settings: FederatedEvaluation) -> dict[str, float]:
        replies = list(collection.accepted.values())
        counts = {
            "federated_devices": float(len(replies)),
            "federated_rejected": float(collection.rejected),
        }
        if len(replies) < settings.min_devices:
            log.warning(
                "round %d: %d of %d devices answered the evaluation (< min_devices %d): "
                "not combined",
                collection.round,
                len(replies),
                len(collection.sampled),
                settings.min_devices,
            )
            return {**counts, "federated_skipped": 1.0}
        return {**combine(replies), **counts}

"""The device side of model deployment: follow the fleet's deployment notices, fetch and verify
artefacts, install them next to the previous version, switch, and serve remote inference.

The agent (``device.agent``) owns one ``Deployer`` when its config has a ``deploy`` section; the
agent's dispatcher hands it every message on a deployment or inference topic and it does the
work on its own thread, so a download or a verification never blocks commands or training.

Protocol (docs/deployment.md):

1. Every deployment has a retained notice (``{prefix}/deploy/{id}/notice``). The device serves
   the artefact of the highest-sequence notice that addresses it; lower or already-applied
   sequences are ignored, so notices may arrive in any order and any number of times.
2. A notice for a version the models directory already holds (a rollback) switches at once.
   Otherwise the deployment becomes *pending* (written to ``state.json``, so a restart resumes
   it), the device reports ``downloading`` and subscribes afresh to the deployment's retained
   artefact (``.../artefact``): unsubscribing first makes the subscription new, so the broker
   sends the retained artefact even into a session that saw it before.
3. The artefact must match the notice's SHA-256 and size, parse (``device.wire.artefact``),
   carry a manifest signed by a trusted key (``device.trust``), name the notice's version,
   build here (the architecture digest when the manifest has one, and the tensors' names and
   shapes), and agree with the device's data (classes, example shape). Then ``verified``.
4. It is written to the models directory, loaded (kernel plan measured and cached), checked on
   a few local examples when the device has data (finite logits; the accuracy goes into the
   event), and switched to atomically; then ``active``, and the status is republished with the
   new ``DeployedModel``.

Anything that fails reports ``failed`` with the reason and leaves the previous version serving.
A download that times out is retried (``retries`` times, each with a fresh subscription); a bad
artefact is not (it would fail the same way), and its notice counts as applied.

A **pin** (``deploy.pin`` in the device config, ``DeployOptions.pin``) holds the device on one
version: at start the worker activates it from the models directory (its file checked against
the trusted keys first) and drops a pending deployment of another version; a notice of another
version is refused with a ``failed`` event naming the pin. Refused notices do not count as
applied, so once the pin is removed (and the agent restarted) the device installs the newest
deployment that addresses it. A notice of the pinned version itself is followed as usual, so a
pinned version that is not kept here yet can still arrive by a deployment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device.deploy_checks import DeployFailure, LocalSample, selftest, verify_artefact
from device.deploy_pin import activate_pin, pin_reason
from device.deploy_status import deployed_model
from device.errors import DecodeError, SparseFleetError
from device.inference import InferenceModel, build
from device.model_store import LastEvent, ModelStore, Pending
from device.trust import TrustedKeys
from device.wire import envelope
from device.wire.artefact import Artefact, read_artefact
from device.wire.messages import (
    DeployArtefact,
    DeployedModel,
    DeployEvent,
    DeployNotice,
    DeployState,
    Envelope,
    InferenceReply,
    InferenceRequest,
)
from device.wire.topics import ParsedTopic, TopicKind, Topics
from device.wire.transport import Message, Transport

__all__ = ["DeployFailure", "DeployOptions", "Deployer", "LocalData", "LocalSample"]

log = logging.getLogger(__name__)


LocalData = Callable[[], LocalSample | None]
"""The device's data for the checks and the self-test (None: it has none, or it is unreadable)."""

EventSink = Callable[[str, DeployEvent], None]
"""Publishes a deployment event: ``(deployment id, event)``."""

_KINDS = (TopicKind.DEPLOY_NOTICE, TopicKind.DEPLOY_ARTEFACT, TopicKind.DEV_INFER_REQUEST)
_TICK = Message(topic="", payload=b"")  # the worker's "no message this second"


@dataclass(frozen=True)
class DeployOptions:
    """A device's deployment settings (``deploy`` in its config).

    ``classes``: the class names of its data when known (they must equal the manifest's);
    ``local_data``: a sample of its data, whose class count and example shape must match the
    manifest's (not checked without data). ``download_timeout_s``: how long one attempt waits
    for the artefact;
    ``retries``: further attempts after a timeout. ``selftest_examples``: most local examples
    a new model predicts before the switch. ``status_interval_s``: how often changed inference
    counters are republished in the status. ``pin``: the only version this device serves
    (None: whatever the fleet deploys); see the module docstring.
    """

    models_dir: Path
    trusted: TrustedKeys
    classes: tuple[str, ...] | None = None
    remote_inference: bool = False
    keep_versions: int = 3
    download_timeout_s: float = 300.0
    retries: int = 3
    selftest_examples: int = 64
    status_interval_s: float = 60.0
    local_data: LocalData | None = None
    pin: str | None = None


@dataclass
class _Download:
    pending: Pending
    deadline: float
    topic: str


class Deployer:
    """Follows deployment notices for one device; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        device_id: str,
        options: DeployOptions,
        *,
        publish_event: EventSink,
        status_changed: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.device_id = device_id
        self.options = options
        self.store = ModelStore(options.models_dir, keep=options.keep_versions)
        self._publish_event = publish_event
        self._status_changed = status_changed
        self._clock = clock
        self._inbox: queue.Queue[Message | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._download: _Download | None = None
        self._model: InferenceModel | None = None
        self._model_lock = threading.Lock()
        self._reported_usage: tuple[int, int] = (0, 0)
        self._next_status = 0.0
        self._refused_sequence = 0  # highest notice refused because of the pin (this process)
        self._deployed = self._compute_deployed()

    # -- lifecycle (agent thread) ----------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the notices (and inference requests when enabled); start the worker,
        which loads the active model and resumes an interrupted download.

        The notices' subscription is made afresh (unsubscribe first): retained messages go
        only to a new subscription, and a session that survived the restart would otherwise
        not see again the notices refused under a pin that has been removed since."""
        self.transport.unsubscribe(self.topics.all_deploy_notices())
        self.transport.subscribe(self.topics.all_deploy_notices(), qos=1)
        if self.options.remote_inference:
            self.transport.subscribe(self.topics.dev_infer_request(self.device_id), qos=1)
        self._thread = threading.Thread(
            target=self._loop, name=f"{self.device_id}-deploy", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._model_lock:
            if self._model is not None:
                self._model.close()

    def handles(self, parsed: ParsedTopic) -> bool:
        """Whether the agent should hand this topic's messages to ``dispatch``."""
        if parsed.kind == TopicKind.DEV_INFER_REQUEST:
            return parsed.device_id == self.device_id
        return parsed.kind in _KINDS

    def dispatch(self, message: Message) -> None:
        """Queue a message for the worker (called on the agent's dispatcher thread)."""
        self._inbox.put(message)

    def deployed(self) -> DeployedModel | None:
        """What this device serves, for its status (None before the first deployment): kept in
        memory by the worker, so the network thread (a birth after a reconnect) reads no file."""
        return self._deployed

    def _compute_deployed(self) -> DeployedModel | None:  # device.deploy_status
        return deployed_model(self.store, self.model, self.device_id)

    @property
    def model(self) -> InferenceModel | None:
        """The model this agent serves (None until one is active and loaded)."""
        with self._model_lock:
            return self._model

    # -- worker ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._apply_pin()
        except Exception:  # a broken pin must not stop the worker: the reason is logged
            log.exception("%s: cannot apply the pinned model version", self.device_id)
        self._load_active()
        self._resume()
        while True:
            try:
                message = self._inbox.get(timeout=1.0)
            except queue.Empty:
                message = _TICK
            if message is None:
                return
            try:
                if message is not _TICK:
                    self._handle(message)
                self._check_download()
                self._maybe_refresh_status()
            except Exception:  # the worker must survive anything a message brings
                log.exception("%s: deployment worker error", self.device_id)

    def _handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed.kind == TopicKind.DEV_INFER_REQUEST:
            self._on_infer(message)
            return
        if not message.payload:
            if parsed.kind == TopicKind.DEPLOY_NOTICE:
                self._withdrawn(parsed.deployment_id)
            return
        try:
            env = envelope.decode(message.payload)
        except DecodeError as exc:
            log.warning("%s: undecodable message on %s: %s", self.device_id, message.topic, exc)
            return
        if parsed.kind == TopicKind.DEPLOY_NOTICE and isinstance(env.body, DeployNotice):
            self._on_notice(parsed.deployment_id, env.body)
        elif parsed.kind == TopicKind.DEPLOY_ARTEFACT and isinstance(env.body, DeployArtefact):
            self._on_artefact(parsed.deployment_id, env.body.data)

    def _event(
        self,
        deployment_id: str,
        state: DeployState,
        version: str,
        reason: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        if state == DeployState.FAILED:
            log.warning("%s: deployment %s failed: %s", self.device_id, deployment_id, reason)
        now = self._clock()
        event = DeployEvent(
            state=state,
            version=version,
            reason=reason,
            timestamp_unix_s=now,
            metrics=dict(metrics or {}),
        )
        last = LastEvent(deployment_id, state.value, version, reason, now)
        self.store.update(last_event=last)
        self._deployed = self._compute_deployed()  # before the event: "active" => deployed()
        self._publish_event(deployment_id, event)
        self._status_changed()  # the retained status carries the last event too

    # -- notices ---------------------------------------------------------------------------------

    def _on_notice(self, deployment_id: str, notice: DeployNotice) -> None:
        if not notice.addresses(self.device_id):
            return
        state = self.store.state()
        if notice.sequence <= state.last_sequence:
            return  # applied (or superseded) already
        if self.options.pin is not None and notice.version != self.options.pin:
            self._refuse_pinned(deployment_id, notice)
            return
        pending = state.pending
        if pending is not None and pending.sequence >= notice.sequence:
            return  # this one, or a later one, is being installed
        sha = notice.artefact_sha256.hex()
        if state.active is not None and state.active.sha256 == sha:
            self.store.update(last_sequence=notice.sequence, pending=None)
            self._event(deployment_id, DeployState.ACTIVE, notice.version)
            return
        if self.store.has(notice.version, sha):  # a rollback: the version is kept here
            self._install(deployment_id, notice.sequence, self.store.read(notice.version))
            return
        pending = Pending(deployment_id, notice.sequence, notice.version, sha)
        self.store.update(pending=pending)
        self._fetch(pending)

    def _refuse_pinned(self, deployment_id: str, notice: DeployNotice) -> None:
        """One ``failed`` event per refused notice (none for one older); not marked applied."""
        if notice.sequence <= self._refused_sequence:
            return
        self._refused_sequence = notice.sequence
        reason = pin_reason(str(self.options.pin), self._serving())
        self._event(deployment_id, DeployState.FAILED, notice.version, reason)

    def _apply_pin(self) -> None:
        """At start: drop a pending deployment of another version than the pin (``failed``)
        and activate the pinned version (``device.deploy_pin``); a pin that cannot be applied
        leaves the active version as it is and is logged as an error."""
        pin = self.options.pin
        if pin is None:
            return
        pending = self.store.state().pending
        if pending is not None and pending.version != pin:
            self.store.update(pending=None)
            reason = pin_reason(pin, self._serving())
            self._event(pending.deployment_id, DeployState.FAILED, pending.version, reason)
        before = self.store.state().active
        problem = activate_pin(self.store, pin, self.options.trusted)
        if problem is not None:
            log.error("%s: %s; serving %s", self.device_id, problem, self._serving() or "none")
        elif before is None or before.version != pin:
            log.info("%s: model version %r activated by the pin", self.device_id, pin)
            self._changed()

    def _withdrawn(self, deployment_id: str) -> None:
        """A cleared notice (a stopped rollout): drop it if it is the one pending."""
        pending = self.store.state().pending
        if pending is not None and pending.deployment_id == deployment_id:
            self.store.update(pending=None)
            self._end_download()
            log.info("%s: deployment %s was withdrawn", self.device_id, deployment_id)

    # -- download --------------------------------------------------------------------------------

    def _fetch(self, pending: Pending) -> None:
        """Subscribe afresh to the pending deployment's retained artefact."""
        self._end_download()
        topic = self.topics.deploy_artefact(pending.deployment_id)
        self._event(pending.deployment_id, DeployState.DOWNLOADING, pending.version)
        self.transport.unsubscribe(topic)
        self.transport.subscribe(topic, qos=1)
        deadline = time.monotonic() + self.options.download_timeout_s
        self._download = _Download(pending, deadline, topic)

    def _end_download(self) -> None:
        if self._download is not None:
            self.transport.unsubscribe(self._download.topic)
            self._download = None

    def _resume(self) -> None:
        pending = self.store.state().pending
        if pending is not None:
            log.info("%s: resuming deployment %s", self.device_id, pending.deployment_id)
            self._fetch(pending)

    def _check_download(self) -> None:
        download = self._download
        if download is None or time.monotonic() < download.deadline:
            return
        pending = download.pending
        attempts = pending.attempts + 1
        if attempts <= self.options.retries:
            retried = dataclasses.replace(pending, attempts=attempts)
            self.store.update(pending=retried)
            log.info(
                "%s: artefact of %s not received; retry %d",
                self.device_id,
                pending.deployment_id,
                attempts,
            )
            self._fetch(retried)
            return
        self._end_download()
        self.store.update(pending=None)
        self._event(
            pending.deployment_id,
            DeployState.FAILED,
            pending.version,
            f"artefact not received in {attempts} attempts of "
            f"{self.options.download_timeout_s:.0f} s; still serving the previous version",
        )

    def _on_artefact(self, deployment_id: str, data: bytes) -> None:
        download = self._download
        if download is None or download.pending.deployment_id != deployment_id:
            return  # not waiting for it (installed already, or withdrawn)
        self._end_download()
        self._install(deployment_id, download.pending.sequence, data, download.pending)

    # -- install ---------------------------------------------------------------------------------

    def _install(
        self, deployment_id: str, sequence: int, data: bytes, pending: Pending | None = None
    ) -> None:
        version = pending.version if pending is not None else "?"
        try:
            if pending is not None and hashlib.sha256(data).hexdigest() != pending.sha256:
                raise DeployFailure(
                    f"the artefact on the broker ({len(data)} bytes) does not match the "
                    "notice's SHA-256 (tampered, truncated or replaced)"
                )
            artefact = self._verify(data)
            version = artefact.manifest.version
            if pending is not None and version != pending.version:
                raise DeployFailure(
                    f"the artefact is version {version!r}, the notice announced {pending.version!r}"
                )
            self._event(deployment_id, DeployState.VERIFIED, version)
            self.store.write(version, data)
            model, measured = build(
                artefact, cached_plan=self.store.read_plan(version), store=self.store
            )
            if measured is not None:
                self.store.write_plan(version, measured)
            metrics = self._selftest(model)
            state = self.store.activate(
                version, artefact.sha256.hex(), deployment_id=deployment_id, sequence=sequence
            )
        except (SparseFleetError, ValueError, RuntimeError, OSError) as exc:
            self.store.update(pending=None, last_sequence=max(sequence, self._last_sequence()))
            self._event(
                deployment_id,
                DeployState.FAILED,
                version,
                f"{exc}; still serving " + (self._serving() or "no model (none was active before)"),
            )
            return
        assert state.active is not None
        model.count_as(state.active)  # its predictions count for this activation
        with self._model_lock:
            old, self._model = self._model, model
        if old is not None:
            old.close()
        self._event(deployment_id, DeployState.ACTIVE, version, metrics=metrics)

    def _last_sequence(self) -> int:
        return self.store.state().last_sequence

    def _serving(self) -> str:
        active = self.store.state().active
        return f"version {active.version!r}" if active is not None else ""

    def _verify(self, data: bytes) -> Artefact:
        """Every check of step 3 but the notice's (``device.deploy_checks``)."""
        return verify_artefact(data, self.options.trusted, self.options.classes, self._sample())

    def _sample(self) -> LocalSample | None:
        return self.options.local_data() if self.options.local_data is not None else None

    def _selftest(self, model: InferenceModel) -> dict[str, float]:
        return selftest(model, self._sample(), self.options.selftest_examples)

    def _load_active(self) -> None:
        state = self.store.state()
        if state.active is None:
            return
        try:
            artefact = read_artefact(self.store.read(state.active.version))
            if artefact.sha256.hex() != state.active.sha256:
                raise DeployFailure("its file changed since it was installed")
            self.options.trusted.verify(artefact)
            model, measured = build(
                artefact,
                cached_plan=self.store.read_plan(state.active.version),
                store=self.store,
                active=state.active,
            )
            if measured is not None:
                self.store.write_plan(state.active.version, measured)
        except (SparseFleetError, ValueError, OSError) as exc:
            log.error("%s: cannot load model %s: %s", self.device_id, state.active.version, exc)
            return
        with self._model_lock:
            self._model = model

    # -- status and inference --------------------------------------------------------------------

    def _maybe_refresh_status(self) -> None:
        now = time.monotonic()
        if now < self._next_status:
            return
        self._next_status = now + self.options.status_interval_s
        active = self.store.state().active
        if active is None:
            return
        model = self.model
        if model is not None:
            model.flush()
        usage = self.store.usage(active)  # every process's predictions (fleet-device predict too)
        if usage != self._reported_usage:
            self._reported_usage = usage
            self._changed()

    def _changed(self) -> None:
        """Recompute what this device serves and have the agent republish its status."""
        self._deployed = self._compute_deployed()
        self._status_changed()

    def _on_infer(self, message: Message) -> None:
        try:
            env = envelope.decode(message.payload)
        except DecodeError as exc:
            log.warning("%s: undecodable inference request: %s", self.device_id, exc)
            return
        if not isinstance(env.body, InferenceRequest):
            return
        model = self.model
        if model is None:
            reply = InferenceReply(logits=None, error="no model is deployed on this device")
        else:
            try:
                reply = InferenceReply(logits=model.logits(env.body.inputs), version=model.version)
            except SparseFleetError as exc:
                reply = InferenceReply(logits=None, version=model.version, error=str(exc))
        payload = envelope.encode(
            Envelope(body=reply, device_id=self.device_id, correlation_id=env.correlation_id)
        )
        self.transport.publish(
            self.topics.dev_infer_reply(self.device_id), payload, qos=1, wait=False
        )

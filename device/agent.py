"""The device agent: connect, announce, take commands, train, publish.

Threads: the transport's network thread only enqueues; the agent's *dispatcher* thread drains the
transport (commands, model snapshots) and never trains; one *worker* thread runs jobs from a queue.
So a cancel or a new model is seen while a job trains, and a slow job never blocks the network.

Job lifecycle events go to ``dev/{d}/events``: accepted -> training -> uploaded, or failed /
rejected / cancelled with a reason. Commands are idempotent per (run, round, kind): a redelivered
command is ignored.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from device import __version__
from device.data import Dataset
from device.deploy import Deployer, DeployOptions
from device.errors import DataError, DecodeError, SparseFleetError
from device.feedback import ErrorFeedback
from device.job import (
    job_seed,
    kernel_plan_for,
    run_evaluate_job,
    run_initial_prune_job,
    run_round_job,
)
from device.local_data import DataCounts, DeviceData, data_for_job
from device.model_feed import DEFAULT_LINGER_S, ModelFeed
from device.model_id import ArchitectureCheck
from device.torch_setup import physical_memory_bytes
from device.wire import envelope
from device.wire.codec import KnownMask
from device.wire.messages import (
    CancelCommand,
    DeployEvent,
    DeviceProfile,
    DeviceStatus,
    DeviceUpdate,
    Envelope,
    EvaluateCommand,
    Hardware,
    InitialPruneCommand,
    InitialPruneResult,
    JobEvent,
    JobState,
    ModelOffer,
    ModelSnapshot,
    RoundCommand,
    ValueDType,
)
from device.wire.topics import TopicKind, Topics
from device.wire.transport import Message, Transport, Will

log = logging.getLogger(__name__)

DataSource = Callable[[str], Dataset]
"""Returns the local dataset; the argument is the command's partition ("" on a real device)."""


@dataclass(frozen=True)
class AgentOptions:
    device_id: str
    topics: Topics = field(default_factory=Topics)
    tags: tuple[str, ...] = ()
    session_epoch: int = 0  # 0 = derive from the clock at start (monotonic across restarts)
    model_wait_s: float = 60.0  # how long to wait for the retained model of a command
    # Seconds a run's models keep arriving after its last job ended (device.model_feed).
    model_linger_s: float = DEFAULT_LINGER_S
    torch_threads: int = 0  # 0 = leave torch's default
    profile: DeviceProfile | None = None
    dataset_size: int = 0  # training examples at start (DeviceData: refreshed before each job)
    eval_examples: int = 0  # examples an evaluation reads, likewise
    # The models this device can build, announced in its status (device.model_id.offers); empty:
    # announce none (the fleet manager then assumes the built-ins, as for an older agent).
    models: tuple[ModelOffer, ...] = ()
    deploy: DeployOptions | None = None  # model deployments (device.deploy); None: not followed
    hardware: Hardware | None = None  # what the birth reports; None: this machine's (simulations)


@dataclass
class _Job:
    run_id: str
    round: int
    correlation_id: str
    command: RoundCommand | EvaluateCommand | InitialPruneCommand
    cancelled: threading.Event = field(default_factory=threading.Event)


def hardware() -> Hardware:
    """What this machine is, for the birth message."""
    return Hardware(
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 0,
        memory_bytes=physical_memory_bytes(),
        python_version=platform.python_version(),
        torch_version=torch.__version__,
    )


def refusal_for(
    payload: bytes, exc: DecodeError, device_id: str
) -> tuple[str, int, str, JobEvent] | None:
    """(run id, round, correlation id, REJECTED event) answering a command this build cannot
    decode (an unknown value precision, say), so that the round goes on without the device
    instead of waiting for its deadline; None when not even its routing fields can be read or
    it is no command for ``device_id``."""
    try:
        head = envelope.peek(payload)
    except DecodeError:
        return None
    if not head.kind.endswith("_command") or not head.run_id:
        return None
    if head.device_id and head.device_id != device_id:
        return None
    reason = f"cannot decode the {head.kind}: {exc}"
    event = JobEvent(state=JobState.REJECTED, reason=reason, timestamp_unix_s=time.time())
    return head.run_id, head.round, f"{head.run_id}/{head.round}/{device_id}", event


class DeviceAgent:
    """A device: one transport connection, one dispatcher thread, one worker thread."""

    def __init__(
        self, transport: Transport, data_source: DataSource | DeviceData, options: AgentOptions
    ):
        self.transport = transport
        self.data_source = data_source
        self.options = options
        self.device_id = options.device_id
        self.topics = options.topics
        # Session epochs: one per connection, increasing across restarts (milliseconds of the
        # wall clock at start, then +1 per reconnect).
        self.epoch = options.session_epoch or time.time_ns() // 1_000_000
        self._connection_epoch = self.epoch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._seen: set[tuple[str, int, str]] = set()
        self._pending: dict[tuple[str, int], _Job] = {}  # queued or running round jobs
        self._current: _Job | None = None
        self.models = ModelFeed(self.transport, self.topics, linger_s=options.model_linger_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.uploaded_bytes = 0
        self.feedback = ErrorFeedback()  # quantisation residuals per run, in memory only
        self._counts = DataCounts(options.dataset_size, options.eval_examples)
        self._architecture = ArchitectureCheck()  # refuses a snapshot this device builds otherwise
        self.deployer = (
            None
            if options.deploy is None
            else Deployer(
                transport,
                self.topics,
                self.device_id,
                options.deploy,
                publish_event=self._deploy_event,
                status_changed=self._refresh_status,
            )
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _status(self, online: bool, epoch: int | None = None) -> bytes:
        status = DeviceStatus(
            online=online,
            session_epoch=self.epoch if epoch is None else epoch,
            agent_version=__version__,
            hardware=self.options.hardware or hardware(),
            dataset_size=self._counts.train,
            eval_examples=self._counts.evaluation,
            profile=self.options.profile,
            tags=self.options.tags,
            timestamp_unix_s=time.time(),
            models=self.options.models,
            deployed=self.deployer.deployed() if self.deployer is not None else None,
        )
        return envelope.encode(Envelope(body=status, device_id=self.device_id))

    def _on_connect(self) -> None:
        """Birth after every (re)connect, then arm the will of the next connection.

        Each connection is one session epoch: its birth and its will carry the same epoch, and
        the next connection's birth a larger one, so the registry orders them even though the
        broker may publish a will while the device is reconnecting. Runs on the network thread:
        it only enqueues.
        """
        topic = self.topics.dev_status(self.device_id)
        self.transport.publish(topic, self._status(True), qos=1, retain=True, wait=False)
        self._connection_epoch = self.epoch
        self.epoch += 1
        self.transport.set_will(Will(topic, self._status(False)))

    def start(self) -> None:
        """Connect with a last will, subscribe to our commands, start the threads.

        The birth is published by ``_on_connect`` after this and every later reconnect.
        """
        if self.options.torch_threads:
            torch.set_num_threads(self.options.torch_threads)
        self.transport.set_will(Will(self.topics.dev_status(self.device_id), self._status(False)))
        self.transport.set_on_connect(self._on_connect)
        self.transport.subscribe(self.topics.dev_cmd(self.device_id), qos=1)
        self.transport.connect()
        for target, name in ((self._dispatch_loop, "dispatch"), (self._work_loop, "worker")):
            thread = threading.Thread(target=target, name=f"{self.device_id}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.deployer is not None:
            self.deployer.start()

    def stop(self, *, abandon: bool = True, timeout_s: float = 30.0) -> None:
        """Stop cleanly: cancel (or finish) the current job, publish offline, disconnect."""
        if abandon and self._current is not None:
            self._current.cancelled.set()
        self._jobs.put(None)
        self._stop.set()
        self.models.wake()
        for thread in self._threads:
            thread.join(timeout_s)
        if self.deployer is not None:
            self.deployer.stop()
        self.epoch = self._connection_epoch  # the offline status closes the current session
        try:
            self.transport.publish(
                self.topics.dev_status(self.device_id), self._status(False), qos=1, retain=True
            )
        except SparseFleetError as exc:  # the broker may already be gone; the will covers it
            log.warning("%s: could not publish offline status: %s", self.device_id, exc)
        self.transport.close()

    def wait(self) -> None:
        """Block until ``stop`` is called from another thread (or a signal handler)."""
        self._stop.wait()

    # -- dispatcher ------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.models.expire()
                message = self.transport.get(timeout_s=0.2)
            except SparseFleetError as exc:  # the transport gave up for good (id taken over)
                log.error("%s: stopped receiving: %s", self.device_id, exc)
                return
            if message is None:
                continue
            try:
                self._dispatch(message)
            except DecodeError as exc:
                log.warning(
                    "%s: dropped undecodable message on %s: %s", self.device_id, message.topic, exc
                )
            except Exception:  # a bad message must never kill the agent
                log.exception("%s: error handling message on %s", self.device_id, message.topic)
            finally:
                self.transport.ack(message)

    def _dispatch(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        if self.deployer is not None and self.deployer.handles(parsed):
            self.deployer.dispatch(message)  # deployments and inference: its own thread
            return
        if parsed.kind in (TopicKind.RUN_MODEL, TopicKind.RUN_PATCH):
            # Kept until the next version: weights as received, dense only while a job loads them.
            self.models.receive(parsed.kind, parsed.run_id, message.payload)
            return
        if parsed.kind != TopicKind.DEV_CMD:
            return
        if not message.payload:
            return  # a cleared retained command topic (runs clear theirs when they end)
        if message.retain:
            # The fleet manager never retains a command; a retained one was left by someone else
            # and would be replayed at every reconnect.
            log.warning("%s: retained message on %s ignored", self.device_id, message.topic)
            return
        try:
            env = envelope.decode(message.payload)
        except DecodeError as exc:
            refusal = refusal_for(message.payload, exc, self.device_id)
            if refusal is not None:
                self._publish_event(*refusal)
            raise
        if env.device_id and env.device_id != self.device_id:
            log.warning("%s: command addressed to %r ignored", self.device_id, env.device_id)
            return
        body = env.body
        if isinstance(body, CancelCommand):
            pending = self._pending.get((env.run_id, env.round))
            if pending is not None:
                pending.cancelled.set()
            # A later duplicate of the cancelled command stays ignored.
            self._seen.add((env.run_id, env.round, RoundCommand.__name__))
            return
        if isinstance(body, RoundCommand | EvaluateCommand | InitialPruneCommand):
            kind = type(body).__name__
            key = (env.run_id, env.round, kind)
            if key in self._seen:
                log.info(
                    "%s: duplicate %s command for %s/%d ignored",
                    self.device_id,
                    kind,
                    env.run_id,
                    env.round,
                )
                return
            self._seen.add(key)
            self.models.watch(env.run_id, body.model_version)
            self._event(env, JobState.ACCEPTED)
            job = _Job(env.run_id, env.round, env.correlation_id, body)
            if not isinstance(body, EvaluateCommand):
                self._pending[(env.run_id, env.round)] = job
            self._jobs.put(job)
            return
        self._event(env, JobState.REJECTED, f"unsupported command {type(body).__name__}")

    # -- worker ----------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._current = job
            try:
                self._run(job)
            except DataError as exc:  # the user's data: one line names the file or setting
                log.error("%s: job %s/%d failed: %s", self.device_id, job.run_id, job.round, exc)
                self._event_for(job, JobState.FAILED, f"data error: {exc}")
            except Exception as exc:  # report, never die: the fleet manager needs to know why
                log.exception("%s: job %s/%d failed", self.device_id, job.run_id, job.round)
                self._event_for(job, JobState.FAILED, f"{type(exc).__name__}: {exc}")
            finally:
                self._current = None
                self._pending.pop((job.run_id, job.round), None)
                self.models.release(job.run_id)

    def _wait_model(self, job: _Job, version: int) -> tuple[ModelSnapshot | None, float]:
        command = job.command
        deadline = time.time() + self.options.model_wait_s
        if not isinstance(command, EvaluateCommand) and command.deadline_unix_s:
            deadline = min(deadline, command.deadline_unix_s)
        start = time.perf_counter()
        snap = self.models.wait(
            job.run_id,
            version,
            deadline,
            give_up=lambda: self._stop.is_set() or job.cancelled.is_set(),
        )
        return snap, time.perf_counter() - start

    def _run(self, job: _Job) -> None:
        command = job.command
        snapshot, download_s = self._wait_model(job, command.model_version)
        if job.cancelled.is_set() or self._stop.is_set():
            self._event_for(job, JobState.CANCELLED, "cancelled before training")
            return
        if snapshot is None or snapshot.digest != command.model_digest:
            have = self.models.held(job.run_id)
            self._event_for(
                job,
                JobState.REJECTED,
                f"model version {command.model_version} not available "
                f"(have {have.version if have is not None else None})",
            )
            return
        refusal = self._architecture.problem(snapshot)  # before any data is read or trained
        if refusal is not None:
            self._event_for(job, JobState.REJECTED, refusal)
            return
        data, counts = data_for_job(self.data_source, command, snapshot.classes)  # DataError: fails
        if counts is not None:
            self._report_counts(counts)
        if isinstance(command, EvaluateCommand):
            metrics = run_evaluate_job(snapshot, command, data)
            self._event_for(job, JobState.EVALUATED, metrics=dict(metrics))
            return
        self._event_for(job, JobState.TRAINING)
        seed = job_seed(job.run_id, job.round, self.device_id)
        if isinstance(command, InitialPruneCommand):
            result = run_initial_prune_job(snapshot, command, data, seed=seed)
            self._upload(job, result, book=None, dtype=None)
            return
        plan = kernel_plan_for(self.options.profile, snapshot, command.density_budget)
        if plan:
            log.debug("round %d: sparse kernels for %s", job.round, ", ".join(sorted(plan)))
        update = run_round_job(
            snapshot, command, data, seed=seed, kernel_plan=plan, download_s=download_s
        )
        book = {
            name: KnownMask(version=snapshot.mask_version, mask=mask)
            for name, mask in snapshot.masks.items()
        }
        update = self.feedback.apply(job.run_id, job.round, update, command.upload_dtype)
        self._upload(job, update, book=book, dtype=command.upload_dtype)

    def _refresh_status(self) -> None:
        """The deployed model changed (or its counters did): publish the status again, with
        the current session epoch (a refresh of the birth, as for new data counts)."""
        payload = self._status(True, epoch=self._connection_epoch)
        try:
            self.transport.publish(
                self.topics.dev_status(self.device_id), payload, qos=1, retain=True, wait=False
            )
        except SparseFleetError as exc:  # the next birth carries it anyway
            log.warning("%s: could not publish the deployed model: %s", self.device_id, exc)

    def _deploy_event(self, deployment_id: str, event: DeployEvent) -> None:
        """A deployment's progress on the events topic (correlation id: the deployment)."""
        payload = envelope.encode(
            Envelope(body=event, device_id=self.device_id, correlation_id=deployment_id)
        )
        try:
            self.transport.publish(
                self.topics.dev_events(self.device_id), payload, qos=1, wait=False
            )
        except SparseFleetError as exc:  # best effort, as job events; the status tells the rest
            log.warning("%s: could not publish deployment event: %s", self.device_id, exc)

    def _report_counts(self, counts: DataCounts) -> None:
        """The data changed size since the last status: publish the status again (same
        session epoch, so the registry takes it as a refresh of the current birth), before the
        job's result, which the fleet manager checks against these counts."""
        if counts == self._counts:
            return
        self._counts = counts
        topic = self.topics.dev_status(self.device_id)
        payload = self._status(True, epoch=self._connection_epoch)
        try:
            self.transport.publish(topic, payload, qos=1, retain=True, wait=False)
        except SparseFleetError as exc:  # the next birth carries the counts anyway
            log.warning("%s: could not publish the new data counts: %s", self.device_id, exc)

    def _upload(
        self,
        job: _Job,
        body: DeviceUpdate | InitialPruneResult,
        *,
        book: dict[str, KnownMask] | None,
        dtype: ValueDType | None,
    ) -> None:
        if job.cancelled.is_set():
            self._event_for(job, JobState.CANCELLED, "cancelled during training; nothing uploaded")
            return
        env = Envelope(
            body=body,
            run_id=job.run_id,
            round=job.round,
            device_id=self.device_id,
            correlation_id=job.correlation_id,
        )
        payload = envelope.encode(env, book=book, dtype=dtype)
        self.uploaded_bytes += self.transport.publish(
            self.topics.dev_update(self.device_id, job.run_id, job.round), payload, qos=1
        )
        self._event_for(job, JobState.UPLOADED)

    # -- events ----------------------------------------------------------------------------

    def _event(self, env: Envelope, state: JobState, reason: str = "") -> None:
        self._publish_event(
            env.run_id,
            env.round,
            env.correlation_id,
            JobEvent(state=state, reason=reason, timestamp_unix_s=time.time()),
        )

    def _event_for(
        self,
        job: _Job,
        state: JobState,
        reason: str = "",
        metrics: dict[str, float] | None = None,
    ) -> None:
        event = JobEvent(
            state=state, reason=reason, timestamp_unix_s=time.time(), metrics=dict(metrics or {})
        )
        self._publish_event(job.run_id, job.round, job.correlation_id, event)

    def _publish_event(
        self, run_id: str, round_: int, correlation_id: str, event: JobEvent
    ) -> None:
        payload = envelope.encode(
            Envelope(
                body=event,
                run_id=run_id,
                round=round_,
                device_id=self.device_id,
                correlation_id=correlation_id,
            )
        )
        try:
            self.transport.publish(
                self.topics.dev_events(self.device_id), payload, qos=1, wait=False
            )
        except SparseFleetError as exc:  # events are best effort; the job's fate is elsewhere
            log.warning("%s: could not publish %s event: %s", self.device_id, event.state, exc)

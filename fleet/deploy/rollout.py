"""Publishing a deployment (canary first), waiting for the devices, and rolling back.

A deployment is published once for the whole fleet, whatever its size: the artefact retained on
``{prefix}/deploy/{id}/artefact`` (chunked by the transport above the broker's packet limit),
then a small retained notice on ``{prefix}/deploy/{id}/notice`` naming the devices (or all).
The broker hands both to every device, now or when it next connects; devices report their
progress on their events topic and in their retained status (``fleet.deploy.tracking``).

With canaries, the notice first names only them; the rollout goes on once every canary reported
``active`` (installed, self-tested, switched) and is online, within ``canary_timeout_s``. A
canary that fails, goes offline or stays silent stops it: the notice and the artefact are
withdrawn (empty retained messages), so no other device installs the version, the deployment is
``stopped`` with the reason, and ``CanaryFailedError`` says which device and why (devices that
did switch keep it: ``fleet model rollback`` brings them back).

Every step is recorded in the store first (``fleet.state.deployments``), so ``fleet model
status`` tells the story however the command ended.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from device.errors import NotFoundError, SparseFleetError
from device.wire import envelope
from device.wire.artefact import Artefact, read_artefact
from device.wire.messages import DeployArtefact, DeployNotice, Envelope
from device.wire.topics import Topics
from device.wire.transport import Transport
from fleet.deploy.targets import Targets, pick_canaries
from fleet.deploy.tracking import apply_message
from fleet.ops.registry import DeviceRegistry
from fleet.state.deployments import DeploymentDevice, DeploymentRecord, DeploymentStatus
from fleet.state.store import Store

__all__ = ["CanaryFailedError", "Rollout", "RolloutOptions", "RolloutResult"]

log = logging.getLogger(__name__)

DONE_STATES = frozenset({"active", "failed"})


class CanaryFailedError(SparseFleetError):
    """A canary device failed, went offline or did not report in time: the rollout stopped."""


@dataclass(frozen=True)
class RolloutOptions:
    """``canary_percent``: share of the addressed devices installed first (0: none);
    ``canary_timeout_s``: how long the canaries have; ``wait_s``: how long to wait afterwards
    for the devices that are online (0: publish and return); ``min_selftest_accuracy``: a
    canary whose self-test accuracy (0..1) is lower counts as failed (None: not checked)."""

    canary_percent: float = 0.0
    canary_timeout_s: float = 300.0
    wait_s: float = 120.0
    min_selftest_accuracy: float | None = None


@dataclass(frozen=True)
class RolloutResult:
    """The deployment as recorded, and each addressed device's state when the command ended."""

    record: DeploymentRecord
    devices: tuple[DeploymentDevice, ...]

    def count(self, state: str) -> int:
        return sum(1 for d in self.devices if d.state == state)


Progress = Callable[[str], None]


class Rollout:
    """Deployments over one connected ``transport`` (the fleet manager's account).

    ``listen()`` must have subscribed before anything is published, so that no event is
    missed; ``progress`` gets one line per step for a person watching.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        topics: Topics | None = None,
        *,
        progress: Progress | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.store = store
        self.transport = transport
        self.topics = topics or Topics()
        self._progress = progress or (lambda line: None)
        self._poll_s = poll_s
        self._listening = False

    def listen(self) -> None:
        """Subscribe to every device's status and events (statuses arrive retained at once)."""
        if not self._listening:
            self.transport.subscribe(self.topics.all_status(), qos=1)
            self.transport.subscribe(self.topics.all_events(), qos=1)
            self._listening = True

    def pump(self, duration_s: float) -> None:
        """Apply what devices send for ``duration_s`` seconds."""
        deadline = time.monotonic() + duration_s
        while True:
            remaining = deadline - time.monotonic()
            if self._apply_next(max(0.0, min(remaining, self._poll_s))) is None and remaining <= 0:
                return

    def _apply_next(self, timeout_s: float) -> str | None:
        """Apply the next device message, waiting up to ``timeout_s`` seconds for one; the
        device whose deployment record it changed ("" when it changed none), None when no
        message came."""
        message = self.transport.get(timeout_s=timeout_s)
        if message is None:
            return None
        try:
            return apply_message(self.store, self.topics, message) or ""
        finally:
            self.transport.ack(message)

    # -- deploy ----------------------------------------------------------------------------------

    def deploy(
        self, data: bytes, targets: Targets, options: RolloutOptions | None = None
    ) -> RolloutResult:
        """Publish the artefact ``data`` to ``targets``; see the module docstring.

        The artefact is checked as a device would check its structure and digests first (a
        corrupt file is never published). Raises ``CanaryFailedError`` when a canary fails.
        """
        options = options or RolloutOptions()
        artefact = read_artefact(data)
        self.listen()
        self.pump(0.5)  # retained statuses: who is online now
        online = {d.device_id for d in DeviceRegistry(self.store).devices(online=True)}
        canaries = pick_canaries(targets, online, options.canary_percent)
        roles = {d: ("canary" if d in canaries else "target") for d in targets.devices}
        record = self._record("deploy", artefact, data, targets, roles, options.canary_percent)
        if canaries:
            self._progress(
                f"{record.deployment_id}: version {record.version} to {len(canaries)} canary "
                f"device(s) first: {', '.join(canaries)}"
            )
            self._publish(record, data, canaries, all_devices=False)
            self._canary(record, canaries, options)
            self.store.deployments.set_status(record.deployment_id, DeploymentStatus.ROLLING_OUT)
            self._progress(f"{record.deployment_id}: canaries active; to every target now")
        self._publish(record, data if not canaries else None, targets.devices, targets.all_devices)
        return self._finish(record, online, options.wait_s)

    def _record(
        self,
        kind: str,
        artefact: Artefact,
        data: bytes,
        targets: Targets,
        roles: Mapping[str, str],
        canary_percent: float,
    ) -> DeploymentRecord:
        digest = self.store.write_blob(data)  # the artefact's bytes, for a later rollback
        deployment_id = f"d{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return self.store.deployments.create(
            deployment_id,
            kind=kind,
            version=artefact.manifest.version,
            artefact_sha256=digest,
            artefact_bytes=len(data),
            manifest=artefact.manifest.to_json(),
            target=targets.label,
            all_devices=targets.all_devices,
            devices=roles,
            status=DeploymentStatus.CANARY if canary_percent > 0 else DeploymentStatus.ROLLING_OUT,
            canary_percent=canary_percent,
        )

    def _publish(
        self,
        record: DeploymentRecord,
        data: bytes | None,
        devices: Iterable[str],
        all_devices: bool,
    ) -> int:
        """The artefact (unless None: published already), then the notice; both retained.
        Returns the bytes handed to the broker."""
        sent = 0
        if data is not None:
            payload = envelope.encode(Envelope(body=DeployArtefact(data)))
            sent += self.transport.publish(
                self.topics.deploy_artefact(record.deployment_id), payload, qos=1, retain=True
            )
        notice = DeployNotice(
            sequence=record.sequence,
            version=record.version,
            artefact_sha256=bytes.fromhex(record.artefact_sha256),
            artefact_bytes=record.artefact_bytes,
            devices=tuple(sorted(devices)),
            all_devices=all_devices,
            created_unix_s=record.created_at,
        )
        sent += self.transport.publish(
            self.topics.deploy_notice(record.deployment_id),
            envelope.encode(Envelope(body=notice, correlation_id=record.deployment_id)),
            qos=1,
            retain=True,
        )
        return sent

    def withdraw(self, deployment_id: str) -> None:
        """Clear the deployment's retained notice and artefact (devices that switched keep it)."""
        for topic in (
            self.topics.deploy_notice(deployment_id),
            self.topics.deploy_artefact(deployment_id),
        ):
            self.transport.publish(topic, b"", qos=1, retain=True)

    def _canary(
        self, record: DeploymentRecord, canaries: tuple[str, ...], options: RolloutOptions
    ) -> None:
        states = self.wait(record.deployment_id, canaries, options.canary_timeout_s)
        problem = self._canary_problem(states, canaries, options)
        if problem is None:
            return
        self.withdraw(record.deployment_id)
        reason = f"canary {problem}; the rollout stopped and was withdrawn"
        self.store.deployments.set_status(record.deployment_id, DeploymentStatus.STOPPED, reason)
        raise CanaryFailedError(
            f"deployment {record.deployment_id} of version {record.version}: {reason}; the "
            "other devices keep their model (`fleet model status`, `fleet model rollback`)"
        )

    def _canary_problem(
        self,
        states: Mapping[str, DeploymentDevice],
        canaries: tuple[str, ...],
        options: RolloutOptions,
    ) -> str | None:
        registry = DeviceRegistry(self.store)
        for device_id in canaries:
            entry = states.get(device_id)
            if entry is None or entry.state not in DONE_STATES:
                state = entry.state if entry is not None else "pending"
                return (
                    f"{device_id} did not report active within {options.canary_timeout_s:.0f} s "
                    f"(last state: {state})"
                )
            if entry.state == "failed":
                return f"{device_id} failed: {entry.reason}"
            info = registry.find(device_id)
            if info is not None and not info.online:
                return f"{device_id} went offline after switching"
            accuracy = entry.metrics.get("selftest_accuracy")
            floor = options.min_selftest_accuracy
            if floor is not None and accuracy is not None and accuracy < floor:
                return f"{device_id} self-test accuracy {accuracy:.3f} is below {floor:.3f}"
        return None

    def wait(
        self, deployment_id: str, devices: Iterable[str], timeout_s: float
    ) -> dict[str, DeploymentDevice]:
        """Apply device messages until every one of ``devices`` is active or failed, or
        ``timeout_s`` passes; their rows as they are then. A device's row is read again right
        after a message changed it, so the wait ends as soon as the last device reports (not
        at the next poll) and costs one row read per event."""
        wanted = set(devices)
        rows = {
            d.device_id: d
            for d in self.store.deployments.devices(deployment_id)
            if d.device_id in wanted
        }
        open_ = {d for d in wanted if d not in rows or rows[d].state not in DONE_STATES}
        deadline = time.monotonic() + timeout_s
        while open_:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed = self._apply_next(min(remaining, self._poll_s))
            if changed in open_:
                for row in self.store.deployments.devices(deployment_id, changed):
                    rows[row.device_id] = row
                    if row.state in DONE_STATES:
                        open_.discard(row.device_id)
        return rows

    def _finish(self, record: DeploymentRecord, online: set[str], wait_s: float) -> RolloutResult:
        waiting = [d for d in record_devices(self.store, record) if d in online]
        if wait_s > 0 and waiting:
            self._progress(
                f"{record.deployment_id}: waiting up to {wait_s:.0f} s for {len(waiting)} "
                "online device(s)"
            )
            self.wait(record.deployment_id, waiting, wait_s)
        else:
            self.pump(0.2)
        rows = tuple(self.store.deployments.devices(record.deployment_id))
        failed = [d for d in rows if d.state == "failed"]
        if failed:
            reason = "; ".join(f"{d.device_id}: {d.reason}" for d in failed[:5])
            status, why = DeploymentStatus.FAILED, f"{len(failed)} device(s) failed: {reason}"
        elif rows and all(d.state == "active" for d in rows):
            status, why = DeploymentStatus.COMPLETED, ""
        else:
            status, why = DeploymentStatus.ROLLING_OUT, ""
        final = self.store.deployments.set_status(record.deployment_id, status, why)
        return RolloutResult(final, rows)

    # -- rollback --------------------------------------------------------------------------------

    def rollback(
        self, to_version: str | None = None, options: RolloutOptions | None = None
    ) -> RolloutResult:
        """Deploy an earlier version again to the devices of the newest deployment.

        ``to_version`` None: the version deployed before the newest deployment's. The artefact
        comes from the store (devices that kept it switch without downloading). ``NotFoundError``
        when there is nothing earlier, or ``to_version`` was never deployed."""
        options = options or RolloutOptions()
        history = self.store.deployments.list_deployments()
        if not history:
            raise NotFoundError("nothing was ever deployed: no version to roll back to")
        current = history[0]
        source = choose_rollback(history, to_version)
        data = self.store.read_blob(source.artefact_sha256)
        artefact = read_artefact(data)
        devices = tuple(record_devices(self.store, current))
        targets = Targets(devices, current.all_devices, f"rollback of {current.deployment_id}")
        self.listen()
        self.pump(0.5)
        online = {d.device_id for d in DeviceRegistry(self.store).devices(online=True)}
        roles = dict.fromkeys(devices, "target")
        record = self._record("rollback", artefact, data, targets, roles, 0.0)
        self._progress(
            f"{record.deployment_id}: rolling back from {current.version} to {record.version} "
            f"on {'every device' if targets.all_devices else f'{len(devices)} device(s)'}"
        )
        self._publish(record, data, devices, targets.all_devices)
        return self._finish(record, online, options.wait_s)


def record_devices(store: Store, record: DeploymentRecord) -> list[str]:
    """The devices a deployment addressed by name (and, for ``all``, every device that
    reported on it), sorted."""
    return sorted(d.device_id for d in store.deployments.devices(record.deployment_id))


def choose_rollback(history: list[DeploymentRecord], to_version: str | None) -> DeploymentRecord:
    """The deployment whose artefact a rollback publishes (``history`` newest first)."""
    current = history[0]
    if to_version is not None:
        for record in history:
            if record.version == to_version:
                return record
        known = ", ".join(sorted({r.version for r in history}))
        raise NotFoundError(f"version {to_version!r} was never deployed; deployed: {known}")
    for record in history[1:]:
        if record.version != current.version and record.status != DeploymentStatus.STOPPED:
            return record
    raise NotFoundError(
        f"no earlier version to roll back to: only {current.version!r} was deployed "
        "(give --to VERSION for a specific one)"
    )

"""What the runner publishes: the global model (retained), commands to devices, fleet status.

Every message is an ``envelope`` on a topic built by ``Topics``; commands carry the correlation
id ``{run}/{round}/{device}`` and go out with QoS 1 without waiting for the broker's
acknowledgement (the round's deadline covers a lost one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from device.wire import envelope
from device.wire.messages import (
    CancelCommand,
    Envelope,
    FleetStatus,
    InitialPruneCommand,
    ModelSnapshot,
    RoundCommand,
    ValueDType,
)
from device.wire.topics import Topics
from device.wire.transport import Transport, Will
from fleet.runtime.checkpoint import CurrentModel


class Commands:
    """The runner's outgoing messages for one run.

    ``snapshot_bytes`` is the size of the last model snapshot published (bytes), counted as
    download traffic of every device commanded to train on it. ``download_dtype`` is the value
    precision snapshots are published in (the strategy's ``download_values``; the runner sets it
    from each round's config).
    """

    def __init__(
        self,
        run_id: str,
        transport: Transport,
        topics: Topics,
        current: CurrentModel,
        *,
        partition_for: Callable[[str], str],
        clock: Callable[[], float],
    ) -> None:
        self.run_id = run_id
        self.transport = transport
        self.topics = topics
        self.current = current
        self.partition_for = partition_for
        self.clock = clock
        self.snapshot_bytes = 0
        self.download_dtype = ValueDType.FP32
        self._published: tuple[int, ValueDType] | None = None  # (version, precision)

    def will(self) -> Will:
        """The last will: the fleet status "offline", retained, should the connection drop."""
        payload = envelope.encode(Envelope(body=FleetStatus(online=False, run_id=self.run_id)))
        return Will(self.topics.fleet_status(), payload)

    def publish_model(self) -> None:
        """Publish the current model retained on the run's model topic, once per version."""
        model = self.current.model
        assert model is not None
        if self._published == (model.version, self.download_dtype):
            return
        snapshot = ModelSnapshot(
            model_name=model.model_name,
            version=model.version,
            digest=self.current.digest,
            mask_version=self.current.mask_version,
            weights=model.weights,
            masks=model.masks,
            model_ref=self.current.spec.model,
            architecture_digest=self.current.architecture_digest,
            classes=self.current.spec.classes,
        )
        payload = envelope.encode(
            Envelope(body=snapshot, run_id=self.run_id), dtype=self.download_dtype
        )
        self.transport.publish(self.topics.run_model(self.run_id), payload, qos=1, retain=True)
        self.snapshot_bytes = len(payload)
        self._published = (model.version, self.download_dtype)

    def send(
        self, device_id: str, round_: int, body: RoundCommand | CancelCommand | InitialPruneCommand
    ) -> int:
        """Send ``body`` to one device; returns the bytes published."""
        payload = envelope.encode(
            Envelope(
                body=body,
                run_id=self.run_id,
                round=round_,
                device_id=device_id,
                correlation_id=f"{self.run_id}/{round_}/{device_id}",
            )
        )
        self.transport.publish(self.topics.dev_cmd(device_id), payload, qos=1, wait=False)
        return len(payload)

    def send_round(self, device_id: str, round_: int, command: RoundCommand) -> int:
        """Send a round command, naming the device's data partition when it has one."""
        partition = self.partition_for(device_id)
        if partition:
            command = dataclasses.replace(command, partition=partition)
        return self.send(device_id, round_, command)

    def clear_retained(self, device_ids: Iterable[str]) -> None:
        """Clear the retained messages this run owns once it has ended: its model, and anything
        retained on the command topics of the devices it commanded (the fleet manager never
        retains a command, but on a broker where others may publish there, a retained command
        would be replayed to the device at every reconnect). An empty retained publish clears a
        topic; the agent ignores the empty message it is also delivered."""
        self.transport.publish(self.topics.run_model(self.run_id), b"", qos=1, retain=True)
        for device_id in sorted(set(device_ids)):
            self.transport.publish(
                self.topics.dev_cmd(device_id), b"", qos=1, retain=True, wait=False
            )

    def fleet_status(self, round_: int, selected: int, received: int) -> None:
        """Publish the retained fleet status: online, at ``round_`` with these counts."""
        payload = envelope.encode(
            Envelope(
                body=FleetStatus(
                    online=True,
                    run_id=self.run_id,
                    round=round_,
                    selected=selected,
                    received=received,
                    timestamp_unix_s=self.clock(),
                )
            )
        )
        self.transport.publish(self.topics.fleet_status(), payload, qos=1, retain=True, wait=False)

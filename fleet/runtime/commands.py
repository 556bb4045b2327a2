"""What the runner publishes: the global model (retained), commands to devices, fleet status.

Every version of the model goes out twice, both retained: self-contained on ``run_model`` and as
a patch on ``run_patch``, its pruned tensors' positions against the masks of the version
published before it (IMPLIED where a mask did not change, DIFF where it did) when that is
smaller. Values are absolute in both, so a device decodes the same model from either; one that
holds a model with the patch's base masks takes the patch (docs/protocol.md, "Models").

Every message is an ``envelope`` on a topic built by ``Topics``; commands carry the correlation
id ``{run}/{round}/{device}`` and go out with QoS 1 without waiting for the broker's
acknowledgement (the round's deadline covers a lost one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from device.wire import envelope
from device.wire.codec import KnownMask
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


class Download(NamedTuple):
    """Model bytes one command makes a device fetch: ``bytes`` as published (patches where the
    device can take them), ``whole`` without patches (self-contained snapshots only)."""

    bytes: int
    whole: int


class Commands:
    """The runner's outgoing messages for one run.

    ``snapshot_bytes`` / ``patch_bytes``: the sizes of the last self-contained snapshot and of
    its patch (bytes); ``patch_base``: the mask version the patch's positions refer to (None:
    the patch topic carries the self-contained snapshot, as for the first version published).
    ``model_download(device)`` counts, per command, what the device needs to fetch.
    ``download_dtype`` is the value precision snapshots are published in (the strategy's
    ``download_values``; the runner sets it from each round's config).
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
        self.patch_bytes = 0
        self.patch_base: int | None = None
        self.download_dtype = ValueDType.FP32
        self._published: tuple[int, ValueDType] | None = None  # (version, precision)
        self._published_book: Mapping[str, KnownMask] | None = None  # its masks
        # device -> (version, mask version) of the model it was last commanded on: what it holds
        self._holds: dict[str, tuple[int, int]] = {}

    def will(self) -> Will:
        """The last will: the fleet status "offline", retained, should the connection drop."""
        payload = envelope.encode(Envelope(body=FleetStatus(online=False, run_id=self.run_id)))
        return Will(self.topics.fleet_status(), payload)

    def publish_model(self) -> None:
        """Publish the current model retained on the run's model topic and its patch on the
        patch topic, once per version and precision."""
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
        env = Envelope(body=snapshot, run_id=self.run_id)
        payload = envelope.encode(env, dtype=self.download_dtype)
        self.transport.publish(self.topics.run_model(self.run_id), payload, qos=1, retain=True)
        self.snapshot_bytes = len(payload)
        patch, self.patch_base = payload, None
        base = self._published_book
        if base and model.masks:
            # Deterministic rounding: the patch's values are bit for bit the snapshot's.
            candidate = envelope.encode(env, dtype=self.download_dtype, book=base)
            if len(candidate) < len(payload):
                patch, self.patch_base = candidate, next(iter(base.values())).version
        self.transport.publish(self.topics.run_patch(self.run_id), patch, qos=1, retain=True)
        self.patch_bytes = len(patch)
        self._published = (model.version, self.download_dtype)
        self._published_book = self.current.book_for(model.version)

    def model_download(self, device_id: str) -> Download:
        """What ``device_id`` fetches to train on the model just published (call once per
        command): nothing when it holds this version already, the patch when it holds a model
        with the patch's base masks, else the self-contained snapshot; beside it, what it would
        fetch without patches. What a device holds is the model it was last commanded on here
        (after a fleet-manager restart: nothing)."""
        model = self.current.model
        assert model is not None
        held = self._holds.get(device_id)
        self._holds[device_id] = (model.version, self.current.mask_version)
        if held is not None and held[0] == model.version:
            return Download(0, 0)
        if held is not None and self.patch_base is not None and held[1] == self.patch_base:
            return Download(self.patch_bytes, self.snapshot_bytes)
        return Download(self.snapshot_bytes, self.snapshot_bytes)

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

    def send_round(self, device_id: str, round_: int, command: RoundCommand) -> Download:
        """Send a round command, naming the device's data partition when it has one; returns
        what it costs the device: the command's bytes plus ``model_download``."""
        partition = self.partition_for(device_id)
        if partition:
            command = dataclasses.replace(command, partition=partition)
        sent = self.send(device_id, round_, command)
        model = self.model_download(device_id)
        return Download(model.bytes + sent, model.whole + sent)

    def clear_retained(self, device_ids: Iterable[str]) -> None:
        """Clear the retained messages this run owns once it has ended: its model and patch, and
        anything retained on the command topics of the devices it commanded (the fleet manager never
        retains a command, but on a broker where others may publish there, a retained command
        would be replayed to the device at every reconnect). An empty retained publish clears a
        topic; the agent ignores the empty message it is also delivered."""
        self.transport.publish(self.topics.run_model(self.run_id), b"", qos=1, retain=True)
        self.transport.publish(self.topics.run_patch(self.run_id), b"", qos=1, retain=True)
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

"""The wire messages of model deployment and remote inference, as plain frozen dataclasses.

They travel in envelopes like every other body (``device.wire.envelope``; their protobuf
conversions are in ``device.wire.deploy_pb``). Topics (``device.wire.topics``):

- ``DeployNotice`` retained on ``{prefix}/deploy/{deployment}/notice``: which devices should
  serve which artefact. A device serves the artefact of the highest-``sequence`` notice that
  addresses it, so a later deployment or a rollback wins however the notices arrive.
- ``DeployArtefact`` retained on ``{prefix}/deploy/{deployment}/artefact``: the artefact file
  (``device.wire.artefact``), chunked by the transport above the broker's packet limit.
- ``DeployEvent`` on the device's events topic, the envelope's ``correlation_id`` being the
  deployment id: downloading -> verified -> active, or failed with a reason.
- ``DeployedModel`` inside ``DeviceStatus``: what the device serves now.
- ``InferenceRequest`` / ``InferenceReply`` on ``{prefix}/dev/{d}/infer/req`` and ``.../res``.

Times are Unix seconds; sizes are bytes; digests are 32-byte SHA-256.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "DeployArtefact",
    "DeployEvent",
    "DeployNotice",
    "DeployState",
    "DeployedModel",
    "InferenceReply",
    "InferenceRequest",
]

FloatArray = npt.NDArray[np.float32]


class DeployState(enum.StrEnum):
    """Where a device is with one deployment (``DeployEvent.state``)."""

    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass(frozen=True)
class DeployedModel:
    """The model a device serves (in its status; ``version`` empty: none yet). ``inferences``
    counts predicted examples and ``errors`` failed predictions, both since ``since_unix_s``
    (when it became active). ``last_*``: where it is with the newest deployment addressed to it
    (``last_state`` None: none yet), so the fleet learns a failure's reason from the retained
    status even when nobody listened to the event."""

    version: str
    artefact_sha256: bytes = b""
    deployment_id: str = ""
    since_unix_s: float = 0.0
    inferences: int = 0
    errors: int = 0
    previous_version: str = ""
    last_deployment_id: str = ""
    last_state: DeployState | None = None
    last_reason: str = ""
    last_event_unix_s: float = 0.0


@dataclass(frozen=True)
class DeployNotice:
    """Which devices should serve the artefact of one deployment.

    ``sequence`` >= 1 orders deployments and rollbacks (higher wins); ``devices`` names devices,
    ``all_devices`` addresses every device, also ones that first connect later.
    """

    sequence: int
    version: str
    artefact_sha256: bytes
    artefact_bytes: int
    devices: tuple[str, ...] = ()
    all_devices: bool = False
    created_unix_s: float = 0.0

    def addresses(self, device_id: str) -> bool:
        """Whether ``device_id`` should serve this notice's artefact."""
        return self.all_devices or device_id in self.devices


@dataclass(frozen=True)
class DeployArtefact:
    """An artefact file's bytes, exactly as exported (verified by the receiver)."""

    data: bytes


@dataclass(frozen=True)
class DeployEvent:
    """A device's progress with one deployment; ``reason`` says why for ``FAILED``."""

    state: DeployState
    version: str
    reason: str = ""
    timestamp_unix_s: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceRequest:
    """Examples to predict: float32 ``[N, *input_shape]``."""

    inputs: FloatArray


@dataclass(frozen=True)
class InferenceReply:
    """Logits ``[N, classes]`` (float32) from model ``version``, or ``error`` (then ``logits``
    is None)."""

    logits: FloatArray | None
    version: str = ""
    error: str = ""

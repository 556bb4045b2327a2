"""Plain, frozen dataclasses for every message on the wire.

Only ``device.wire.codec`` and ``device.wire.envelope`` convert between these and protobuf; the
rest of the code base uses these types. Arrays are numpy; weights are float32. Times are seconds
(wall clock, ``time.time()``) unless a name says otherwise; sizes are bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from device.model_ref import ModelOffer, ModelRef
from device.wire.codec import SparseTensor, ValueDType
from device.wire.deploy_messages import (
    DeployArtefact,
    DeployedModel,
    DeployEvent,
    DeployNotice,
    DeployState,
    InferenceReply,
    InferenceRequest,
)

__all__ = [  # re-exported: they travel in messages (deployment: device.wire.deploy_messages)
    "DeployArtefact",
    "DeployEvent",
    "DeployNotice",
    "DeployState",
    "DeployedModel",
    "InferenceReply",
    "InferenceRequest",
    "ModelOffer",
    "ModelRef",
    "SparseTensor",
    "ValueDType",
]

SCHEMA_VERSION = 1

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


class JobState(enum.StrEnum):
    ACCEPTED = "accepted"
    TRAINING = "training"
    UPLOADED = "uploaded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EVALUATED = "evaluated"


class GrowPolicy(enum.StrEnum):
    GRADIENT = "gradient"  # RigL
    RANDOM = "random"  # SET


@dataclass(frozen=True)
class LocalTraining:
    """Local SGD settings of one round (FedDST defaults)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    prox_mu: float = 0.0  # FedProx proximal coefficient; 0 disables it
    max_steps: int = 0  # cap on local SGD steps; 0 = no cap


@dataclass(frozen=True)
class Readjust:
    """FedDST prune-and-regrow for this round.

    ``alpha`` is alpha_r, the fraction of each layer's active weights dropped and regrown (0..1);
    ``at_fraction`` is where in local training it happens (0..1 of the steps; 1.0 = after the last
    step, as in the reference code); ``grad_window`` is the number of minibatches whose gradients
    are accumulated for growth (0 = the whole last local epoch).
    """

    alpha: float
    at_fraction: float = 0.5
    grad_window: int = 0
    grow: GrowPolicy = GrowPolicy.GRADIENT


@dataclass(frozen=True)
class RoundCommand:
    model_version: int
    model_digest: bytes
    training: LocalTraining = field(default_factory=LocalTraining)
    readjust: Readjust | None = None
    report_importance: bool = False
    upload_dtype: ValueDType = ValueDType.FP32
    deadline_unix_s: float = 0.0
    partition: str = ""  # simulation only
    # The precision of the model values in this round's snapshot (the device needs no setting).
    download_dtype: ValueDType = ValueDType.FP32
    # Kept fraction of the pruned tensors this device trains: a nested subset of the global mask
    # (device.sparse.nested); 0.0 = the whole global mask (no budget).
    density_budget: float = 0.0


@dataclass(frozen=True)
class InitialPruneCommand:
    model_version: int
    model_digest: bytes
    training: LocalTraining = field(default_factory=LocalTraining)
    rounds_per_reconfig: int = 5
    max_reconfigs: int = 20
    stable_change: float = 0.1
    stable_count: int = 5
    deadline_unix_s: float = 0.0
    partition: str = ""
    # PruneFL's time model, computed by the server from this device's profile:
    cost_per_param_s: Mapping[str, float] = field(default_factory=dict)  # c_l per pruned tensor
    fixed_cost_s: float = 0.0  # c_0
    protect_fraction: float = 0.3  # d


@dataclass(frozen=True)
class ProfileCommand:
    densities: tuple[float, ...] = (1.0, 0.5, 0.2, 0.1, 0.05)


@dataclass(frozen=True)
class EvaluateCommand:
    model_version: int
    model_digest: bytes


@dataclass(frozen=True)
class CancelCommand:
    reason: str = ""


@dataclass(frozen=True)
class ModelSnapshot:
    """A global model: dense float32 weights (zero outside masks) plus masks of pruned tensors.

    Invariant: for every name in ``masks``, ``weights[name][~masks[name]] == 0`` and the shapes
    match.
    ``digest`` is ``codec.model_digest(weights, masks)``. ``model_name`` is the text of the
    model's reference (``device.model_ref``); ``model_ref`` is the reference itself (None from
    an older sender: read ``model_name``) and ``architecture_digest`` the digest of the run's
    build of it (``device.model_id``; empty: not checked). ``classes`` is the run's label space
    in order (class ``i`` is logit ``i``; distinct names; empty: the run declares none).
    """

    model_name: str
    version: int
    digest: bytes
    mask_version: int
    weights: Mapping[str, FloatArray]
    masks: Mapping[str, BoolArray]
    model_ref: ModelRef | None = None
    architecture_digest: bytes = b""
    classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceUpdate:
    """A device's result of one round.

    ``deltas[name]`` has the device's mask after training as its mask (for dense tensors, all
    true) and ``trained - global`` at those positions as its values. ``importance`` (PruneFL)
    holds dense summed squared gradients for every pruned tensor, pruned positions included.
    """

    model_version: int
    model_digest: bytes
    deltas: Mapping[str, SparseTensor]
    num_examples: int
    importance: Mapping[str, FloatArray] = field(default_factory=dict)
    local_steps: int = 0
    train_s: float = 0.0
    download_s: float = 0.0
    encode_s: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InitialPruneResult:
    model: ModelSnapshot
    reconfigs: int
    densities: tuple[float, ...]
    train_s: float


@dataclass(frozen=True)
class ProfilePoint:
    """Seconds of one training step (forward, backward, update) of a layer on one minibatch at
    ``density`` (kept fraction, in (0, 1]): masked dense, and with the sparse kernel."""

    density: float
    dense_s: float
    sparse_s: float = 0.0  # 0 = no sparse kernel for this layer


@dataclass(frozen=True)
class LayerProfile:
    name: str
    numel: int
    points: tuple[ProfilePoint, ...]


@dataclass(frozen=True)
class DeviceProfile:
    """A device's measured speed; travels in its birth message.

    ``step_overhead_s`` is PruneFL's c_0 per minibatch; per-layer costs come from ``layers``.
    """

    model_name: str
    batch_size: int
    step_overhead_s: float
    layers: tuple[LayerProfile, ...]
    uplink_bytes_per_s: float = 0.0
    downlink_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class Hardware:
    machine: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    python_version: str = ""
    torch_version: str = ""


@dataclass(frozen=True)
class DeviceStatus:
    online: bool
    session_epoch: int
    agent_version: str
    hardware: Hardware = field(default_factory=Hardware)
    dataset_size: int = 0
    profile: DeviceProfile | None = None
    tags: tuple[str, ...] = ()
    timestamp_unix_s: float = 0.0
    deployed: DeployedModel | None = None  # the deployed model it serves (docs/deployment.md)
    models: tuple[ModelOffer, ...] = ()  # what it can build; () = an older agent: the built-ins
    eval_examples: int = 0  # examples it evaluates on: the most an evaluation reply may claim

    @property
    def model_version(self) -> str:
        """Version label of the deployed model it serves; empty before the first deployment."""
        return "" if self.deployed is None else self.deployed.version


@dataclass(frozen=True)
class JobEvent:
    state: JobState
    reason: str = ""
    timestamp_unix_s: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetStatus:
    online: bool
    run_id: str = ""
    round: int = 0
    selected: int = 0
    received: int = 0
    timestamp_unix_s: float = 0.0


@dataclass(frozen=True)
class ChunkManifest:
    sha256: bytes
    total_bytes: int
    chunk_count: int
    chunk_bytes: int


@dataclass(frozen=True)
class Chunk:
    sha256: bytes
    index: int
    data: bytes


class ErrorCode(enum.StrEnum):
    BAD_MESSAGE = "bad_message"
    WRONG_VERSION = "wrong_version"
    NO_DATA = "no_data"
    INTERNAL = "internal"
    BUSY = "busy"


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode
    reason: str


Body = (
    RoundCommand
    | InitialPruneCommand
    | ProfileCommand
    | EvaluateCommand
    | CancelCommand
    | ModelSnapshot
    | DeviceUpdate
    | InitialPruneResult
    | DeviceStatus
    | JobEvent
    | FleetStatus
    | ChunkManifest
    | Chunk
    | ErrorInfo
    | DeployNotice
    | DeployArtefact
    | DeployEvent
    | InferenceRequest
    | InferenceReply
)


@dataclass(frozen=True)
class Envelope:
    """One message: routing fields plus exactly one body."""

    body: Body
    run_id: str = ""
    round: int = 0
    device_id: str = ""
    correlation_id: str = ""
    schema_version: int = SCHEMA_VERSION

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_DTYPE_UNSPECIFIED: _ClassVar[ValueDType]
    VALUE_DTYPE_FP32: _ClassVar[ValueDType]
    VALUE_DTYPE_FP16: _ClassVar[ValueDType]
    VALUE_DTYPE_BF16: _ClassVar[ValueDType]
    VALUE_DTYPE_INT8: _ClassVar[ValueDType]
    VALUE_DTYPE_INT4: _ClassVar[ValueDType]

class PositionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_MODE_UNSPECIFIED: _ClassVar[PositionMode]
    POSITION_MODE_IMPLIED: _ClassVar[PositionMode]
    POSITION_MODE_DIFF: _ClassVar[PositionMode]
    POSITION_MODE_ABSOLUTE: _ClassVar[PositionMode]
    POSITION_MODE_DENSE: _ClassVar[PositionMode]

class SetCoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SET_CODING_UNSPECIFIED: _ClassVar[SetCoding]
    SET_CODING_BITMAP: _ClassVar[SetCoding]
    SET_CODING_RICE_GAPS: _ClassVar[SetCoding]

class GrowPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROW_POLICY_UNSPECIFIED: _ClassVar[GrowPolicy]
    GROW_POLICY_GRADIENT: _ClassVar[GrowPolicy]
    GROW_POLICY_RANDOM: _ClassVar[GrowPolicy]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_ACCEPTED: _ClassVar[JobState]
    JOB_STATE_TRAINING: _ClassVar[JobState]
    JOB_STATE_UPLOADED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_REJECTED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_EVALUATED: _ClassVar[JobState]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_MESSAGE: _ClassVar[ErrorCode]
    ERROR_CODE_WRONG_VERSION: _ClassVar[ErrorCode]
    ERROR_CODE_NO_DATA: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
    ERROR_CODE_BUSY: _ClassVar[ErrorCode]

class DeployState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOY_STATE_UNSPECIFIED: _ClassVar[DeployState]
    DEPLOY_STATE_DOWNLOADING: _ClassVar[DeployState]
    DEPLOY_STATE_VERIFIED: _ClassVar[DeployState]
    DEPLOY_STATE_ACTIVE: _ClassVar[DeployState]
    DEPLOY_STATE_FAILED: _ClassVar[DeployState]
VALUE_DTYPE_UNSPECIFIED: ValueDType
VALUE_DTYPE_FP32: ValueDType
VALUE_DTYPE_FP16: ValueDType
VALUE_DTYPE_BF16: ValueDType
VALUE_DTYPE_INT8: ValueDType
VALUE_DTYPE_INT4: ValueDType
POSITION_MODE_UNSPECIFIED: PositionMode
POSITION_MODE_IMPLIED: PositionMode
POSITION_MODE_DIFF: PositionMode
POSITION_MODE_ABSOLUTE: PositionMode
POSITION_MODE_DENSE: PositionMode
SET_CODING_UNSPECIFIED: SetCoding
SET_CODING_BITMAP: SetCoding
SET_CODING_RICE_GAPS: SetCoding
GROW_POLICY_UNSPECIFIED: GrowPolicy
GROW_POLICY_GRADIENT: GrowPolicy
GROW_POLICY_RANDOM: GrowPolicy
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_ACCEPTED: JobState
JOB_STATE_TRAINING: JobState
JOB_STATE_UPLOADED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_REJECTED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_EVALUATED: JobState
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_BAD_MESSAGE: ErrorCode
ERROR_CODE_WRONG_VERSION: ErrorCode
ERROR_CODE_NO_DATA: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
ERROR_CODE_BUSY: ErrorCode
DEPLOY_STATE_UNSPECIFIED: DeployState
DEPLOY_STATE_DOWNLOADING: DeployState
DEPLOY_STATE_VERIFIED: DeployState
DEPLOY_STATE_ACTIVE: DeployState
DEPLOY_STATE_FAILED: DeployState

class PositionSet(_message.Message):
    __slots__ = ("coding", "data", "rice_k", "count")
    CODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RICE_K_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    coding: SetCoding
    data: bytes
    rice_k: int
    count: int
    def __init__(self, coding: _Optional[_Union[SetCoding, str]] = ..., data: _Optional[bytes] = ..., rice_k: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class MaskRef(_message.Message):
    __slots__ = ("version", "digest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    digest: bytes
    def __init__(self, version: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class SparseTensor(_message.Message):
    __slots__ = ("shape", "dtype", "values", "scale", "mode", "mask_ref", "positions", "nnz")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MASK_REF_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: ValueDType
    values: bytes
    scale: float
    mode: PositionMode
    mask_ref: MaskRef
    positions: PositionSet
    nnz: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[ValueDType, str]] = ..., values: _Optional[bytes] = ..., scale: _Optional[float] = ..., mode: _Optional[_Union[PositionMode, str]] = ..., mask_ref: _Optional[_Union[MaskRef, _Mapping]] = ..., positions: _Optional[_Union[PositionSet, _Mapping]] = ..., nnz: _Optional[int] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: SparseTensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[SparseTensor, _Mapping]] = ...) -> None: ...

class ModelSnapshot(_message.Message):
    __slots__ = ("model_name", "version", "digest", "mask_version", "tensors", "pruned", "model_ref", "architecture_digest", "classes")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    digest: bytes
    mask_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    pruned: _containers.RepeatedScalarFieldContainer[str]
    model_ref: ModelRef
    architecture_digest: bytes
    classes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[bytes] = ..., mask_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., pruned: _Optional[_Iterable[str]] = ..., model_ref: _Optional[_Union[ModelRef, _Mapping]] = ..., architecture_digest: _Optional[bytes] = ..., classes: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "factory", "kwargs_json", "input_shape", "num_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    factory: str
    kwargs_json: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, name: _Optional[str] = ..., factory: _Optional[str] = ..., kwargs_json: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class ModelOffer(_message.Message):
    __slots__ = ("model", "architecture_digest")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    architecture_digest: bytes
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., architecture_digest: _Optional[bytes] = ...) -> None: ...

class LocalTraining(_message.Message):
    __slots__ = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "prox_mu", "max_steps")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    prox_mu: float
    max_steps: int
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., prox_mu: _Optional[float] = ..., max_steps: _Optional[int] = ...) -> None: ...

class Readjust(_message.Message):
    __slots__ = ("alpha", "at_fraction", "grad_window", "grow")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    AT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GRAD_WINDOW_FIELD_NUMBER: _ClassVar[int]
    GROW_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    at_fraction: float
    grad_window: int
    grow: GrowPolicy
    def __init__(self, alpha: _Optional[float] = ..., at_fraction: _Optional[float] = ..., grad_window: _Optional[int] = ..., grow: _Optional[_Union[GrowPolicy, str]] = ...) -> None: ...

class RoundCommand(_message.Message):
    __slots__ = ("model_version", "model_digest", "training", "readjust", "report_importance", "upload_dtype", "deadline_unix_s", "partition", "download_dtype", "density_budget")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    READJUST_FIELD_NUMBER: _ClassVar[int]
    REPORT_IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_digest: bytes
    training: LocalTraining
    readjust: Readjust
    report_importance: bool
    upload_dtype: ValueDType
    deadline_unix_s: float
    partition: str
    download_dtype: ValueDType
    density_budget: float
    def __init__(self, model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., training: _Optional[_Union[LocalTraining, _Mapping]] = ..., readjust: _Optional[_Union[Readjust, _Mapping]] = ..., report_importance: _Optional[bool] = ..., upload_dtype: _Optional[_Union[ValueDType, str]] = ..., deadline_unix_s: _Optional[float] = ..., partition: _Optional[str] = ..., download_dtype: _Optional[_Union[ValueDType, str]] = ..., density_budget: _Optional[float] = ...) -> None: ...

class InitialPruneCommand(_message.Message):
    __slots__ = ("model_version", "model_digest", "training", "rounds_per_reconfig", "max_reconfigs", "stable_change", "stable_count", "deadline_unix_s", "partition", "cost_per_param_s", "fixed_cost_s", "protect_fraction")
    class CostPerParamSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PER_RECONFIG_FIELD_NUMBER: _ClassVar[int]
    MAX_RECONFIGS_FIELD_NUMBER: _ClassVar[int]
    STABLE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    STABLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    COST_PER_PARAM_S_FIELD_NUMBER: _ClassVar[int]
    FIXED_COST_S_FIELD_NUMBER: _ClassVar[int]
    PROTECT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_digest: bytes
    training: LocalTraining
    rounds_per_reconfig: int
    max_reconfigs: int
    stable_change: float
    stable_count: int
    deadline_unix_s: float
    partition: str
    cost_per_param_s: _containers.ScalarMap[str, float]
    fixed_cost_s: float
    protect_fraction: float
    def __init__(self, model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., training: _Optional[_Union[LocalTraining, _Mapping]] = ..., rounds_per_reconfig: _Optional[int] = ..., max_reconfigs: _Optional[int] = ..., stable_change: _Optional[float] = ..., stable_count: _Optional[int] = ..., deadline_unix_s: _Optional[float] = ..., partition: _Optional[str] = ..., cost_per_param_s: _Optional[_Mapping[str, float]] = ..., fixed_cost_s: _Optional[float] = ..., protect_fraction: _Optional[float] = ...) -> None: ...

class ProfileCommand(_message.Message):
    __slots__ = ("densities",)
    DENSITIES_FIELD_NUMBER: _ClassVar[int]
    densities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, densities: _Optional[_Iterable[float]] = ...) -> None: ...

class EvaluateCommand(_message.Message):
    __slots__ = ("model_version", "model_digest")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_digest: bytes
    def __init__(self, model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ...) -> None: ...

class CancelCommand(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class DeviceUpdate(_message.Message):
    __slots__ = ("model_version", "model_digest", "deltas", "importance", "num_examples", "local_steps", "train_s", "download_s", "encode_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_digest: bytes
    deltas: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    importance: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    num_examples: int
    local_steps: int
    train_s: float
    download_s: float
    encode_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, model_version: _Optional[int] = ..., model_digest: _Optional[bytes] = ..., deltas: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., importance: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., num_examples: _Optional[int] = ..., local_steps: _Optional[int] = ..., train_s: _Optional[float] = ..., download_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class InitialPruneResult(_message.Message):
    __slots__ = ("model", "reconfigs", "densities", "train_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECONFIGS_FIELD_NUMBER: _ClassVar[int]
    DENSITIES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    model: ModelSnapshot
    reconfigs: int
    densities: _containers.RepeatedScalarFieldContainer[float]
    train_s: float
    def __init__(self, model: _Optional[_Union[ModelSnapshot, _Mapping]] = ..., reconfigs: _Optional[int] = ..., densities: _Optional[_Iterable[float]] = ..., train_s: _Optional[float] = ...) -> None: ...

class ProfilePoint(_message.Message):
    __slots__ = ("density", "dense_s", "sparse_s")
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    DENSE_S_FIELD_NUMBER: _ClassVar[int]
    SPARSE_S_FIELD_NUMBER: _ClassVar[int]
    density: float
    dense_s: float
    sparse_s: float
    def __init__(self, density: _Optional[float] = ..., dense_s: _Optional[float] = ..., sparse_s: _Optional[float] = ...) -> None: ...

class LayerProfile(_message.Message):
    __slots__ = ("name", "numel", "points")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    numel: int
    points: _containers.RepeatedCompositeFieldContainer[ProfilePoint]
    def __init__(self, name: _Optional[str] = ..., numel: _Optional[int] = ..., points: _Optional[_Iterable[_Union[ProfilePoint, _Mapping]]] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("batch_size", "step_overhead_s", "layers", "uplink_bytes_per_s", "downlink_bytes_per_s", "model_name")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    step_overhead_s: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerProfile]
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    model_name: str
    def __init__(self, batch_size: _Optional[int] = ..., step_overhead_s: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerProfile, _Mapping]]] = ..., uplink_bytes_per_s: _Optional[float] = ..., downlink_bytes_per_s: _Optional[float] = ..., model_name: _Optional[str] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("machine", "cpu_count", "memory_bytes", "python_version", "torch_version")
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    machine: str
    cpu_count: int
    memory_bytes: int
    python_version: str
    torch_version: str
    def __init__(self, machine: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., python_version: _Optional[str] = ..., torch_version: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("online", "session_epoch", "agent_version", "hardware", "dataset_size", "profile", "tags", "timestamp_unix_s", "models", "eval_examples", "deployed")
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    SESSION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DATASET_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_FIELD_NUMBER: _ClassVar[int]
    online: bool
    session_epoch: int
    agent_version: str
    hardware: Hardware
    dataset_size: int
    profile: DeviceProfile
    tags: _containers.RepeatedScalarFieldContainer[str]
    timestamp_unix_s: float
    models: _containers.RepeatedCompositeFieldContainer[ModelOffer]
    eval_examples: int
    deployed: DeployedModel
    def __init__(self, online: _Optional[bool] = ..., session_epoch: _Optional[int] = ..., agent_version: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., dataset_size: _Optional[int] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ..., timestamp_unix_s: _Optional[float] = ..., models: _Optional[_Iterable[_Union[ModelOffer, _Mapping]]] = ..., eval_examples: _Optional[int] = ..., deployed: _Optional[_Union[DeployedModel, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("state", "reason", "timestamp_unix_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    timestamp_unix_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., timestamp_unix_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class FleetStatus(_message.Message):
    __slots__ = ("online", "run_id", "round", "selected", "received", "timestamp_unix_s")
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    online: bool
    run_id: str
    round: int
    selected: int
    received: int
    timestamp_unix_s: float
    def __init__(self, online: _Optional[bool] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., selected: _Optional[int] = ..., received: _Optional[int] = ..., timestamp_unix_s: _Optional[float] = ...) -> None: ...

class ChunkManifest(_message.Message):
    __slots__ = ("sha256", "total_bytes", "chunk_count", "chunk_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    total_bytes: int
    chunk_count: int
    chunk_bytes: int
    def __init__(self, sha256: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., chunk_count: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("sha256", "index", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    index: int
    data: bytes
    def __init__(self, sha256: _Optional[bytes] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    reason: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("schema_version", "run_id", "round", "device_id", "correlation_id", "round_command", "initial_prune_command", "profile_command", "evaluate_command", "cancel_command", "model", "update", "initial_prune_result", "status", "event", "fleet_status", "chunk_manifest", "chunk", "error", "deploy_notice", "deploy_artefact", "deploy_event", "inference_request", "inference_reply")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_COMMAND_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PRUNE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    PROFILE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    CANCEL_COMMAND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PRUNE_RESULT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    FLEET_STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_NOTICE_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_ARTEFACT_FIELD_NUMBER: _ClassVar[int]
    DEPLOY_EVENT_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_REPLY_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    run_id: str
    round: int
    device_id: str
    correlation_id: str
    round_command: RoundCommand
    initial_prune_command: InitialPruneCommand
    profile_command: ProfileCommand
    evaluate_command: EvaluateCommand
    cancel_command: CancelCommand
    model: ModelSnapshot
    update: DeviceUpdate
    initial_prune_result: InitialPruneResult
    status: DeviceStatus
    event: JobEvent
    fleet_status: FleetStatus
    chunk_manifest: ChunkManifest
    chunk: Chunk
    error: Error
    deploy_notice: DeployNotice
    deploy_artefact: DeployArtefact
    deploy_event: DeployEvent
    inference_request: InferenceRequest
    inference_reply: InferenceReply
    def __init__(self, schema_version: _Optional[int] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., device_id: _Optional[str] = ..., correlation_id: _Optional[str] = ..., round_command: _Optional[_Union[RoundCommand, _Mapping]] = ..., initial_prune_command: _Optional[_Union[InitialPruneCommand, _Mapping]] = ..., profile_command: _Optional[_Union[ProfileCommand, _Mapping]] = ..., evaluate_command: _Optional[_Union[EvaluateCommand, _Mapping]] = ..., cancel_command: _Optional[_Union[CancelCommand, _Mapping]] = ..., model: _Optional[_Union[ModelSnapshot, _Mapping]] = ..., update: _Optional[_Union[DeviceUpdate, _Mapping]] = ..., initial_prune_result: _Optional[_Union[InitialPruneResult, _Mapping]] = ..., status: _Optional[_Union[DeviceStatus, _Mapping]] = ..., event: _Optional[_Union[JobEvent, _Mapping]] = ..., fleet_status: _Optional[_Union[FleetStatus, _Mapping]] = ..., chunk_manifest: _Optional[_Union[ChunkManifest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., deploy_notice: _Optional[_Union[DeployNotice, _Mapping]] = ..., deploy_artefact: _Optional[_Union[DeployArtefact, _Mapping]] = ..., deploy_event: _Optional[_Union[DeployEvent, _Mapping]] = ..., inference_request: _Optional[_Union[InferenceRequest, _Mapping]] = ..., inference_reply: _Optional[_Union[InferenceReply, _Mapping]] = ...) -> None: ...

class DeployedModel(_message.Message):
    __slots__ = ("version", "artefact_sha256", "deployment_id", "since_unix_s", "inferences", "errors", "previous_version", "last_deployment_id", "last_state", "last_reason", "last_event_unix_s")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    INFERENCES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    version: str
    artefact_sha256: bytes
    deployment_id: str
    since_unix_s: float
    inferences: int
    errors: int
    previous_version: str
    last_deployment_id: str
    last_state: DeployState
    last_reason: str
    last_event_unix_s: float
    def __init__(self, version: _Optional[str] = ..., artefact_sha256: _Optional[bytes] = ..., deployment_id: _Optional[str] = ..., since_unix_s: _Optional[float] = ..., inferences: _Optional[int] = ..., errors: _Optional[int] = ..., previous_version: _Optional[str] = ..., last_deployment_id: _Optional[str] = ..., last_state: _Optional[_Union[DeployState, str]] = ..., last_reason: _Optional[str] = ..., last_event_unix_s: _Optional[float] = ...) -> None: ...

class DeployNotice(_message.Message):
    __slots__ = ("sequence", "version", "artefact_sha256", "artefact_bytes", "devices", "all_devices", "created_unix_s")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ALL_DEVICES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    version: str
    artefact_sha256: bytes
    artefact_bytes: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    all_devices: bool
    created_unix_s: float
    def __init__(self, sequence: _Optional[int] = ..., version: _Optional[str] = ..., artefact_sha256: _Optional[bytes] = ..., artefact_bytes: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ..., all_devices: _Optional[bool] = ..., created_unix_s: _Optional[float] = ...) -> None: ...

class DeployArtefact(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class DeployEvent(_message.Message):
    __slots__ = ("state", "version", "reason", "timestamp_unix_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    state: DeployState
    version: str
    reason: str
    timestamp_unix_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, state: _Optional[_Union[DeployState, str]] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ..., timestamp_unix_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: SparseTensor
    def __init__(self, inputs: _Optional[_Union[SparseTensor, _Mapping]] = ...) -> None: ...

class InferenceReply(_message.Message):
    __slots__ = ("logits", "version", "error")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    logits: SparseTensor
    version: str
    error: str
    def __init__(self, logits: _Optional[_Union[SparseTensor, _Mapping]] = ..., version: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

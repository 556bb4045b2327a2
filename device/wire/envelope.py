"""Envelopes: the one module that turns every message dataclass into protobuf bytes and back.

``encode(Envelope) -> bytes`` and ``decode(bytes) -> Envelope`` cover every body type of
``device.wire.messages``; ``peek(bytes)`` reads only the routing fields, without parsing the
tensors, so that a receiver can route or drop a message before paying for a full decode.

Decoding raises only ``EnvelopeDecodeError`` (not protobuf, wrong schema version, no body, an
unknown enum value, duplicate or inconsistent tensor names, too many bytes) and
``TensorDecodeError`` (a tensor's own inconsistencies, see ``codec.decode_tensor``). It checks
the form of a message, not its meaning: NaN values, stale rounds or foreign device ids are
decoded faithfully and left to the fleet manager's validation.

Tensor positions: a DeviceUpdate's deltas refer to the masks of the model they were trained
from (IMPLIED when unchanged, DIFF when the device's mask changed), so the sender passes that
model's mask book and the receiver supplies it through ``book_for(model_version)``. Model
snapshots are self-contained (ABSOLUTE or DENSE positions) so that a device joining late
needs nothing else, except a patch: the same snapshot encoded against the masks of a version
its receiver holds (``encode(..., book=)``, decoded with ``decode(..., held=)``; values are
absolute, so a patch decodes to exactly what the self-contained snapshot does). Importance
tensors are dense fp32.

Float fields declared ``float`` (32-bit) in the schema are decoded to the shortest decimal
that rounds to the same float32, so ``lr=0.01`` comes back as ``0.01``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from typing import Any, NamedTuple, TypeVar

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError

from device.errors import EnvelopeDecodeError
from device.wire import deploy_pb, model_pb
from device.wire import messages as m
from device.wire.codec import (
    Chunk,
    EncodedTensor,
    KnownMask,
    Rounding,
    SparseTensor,
    decode_tensor,
    encode_tensor_parts,
    length_delimited,
)
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.sparse_weights import SparseWeights

MaskBook = Mapping[str, KnownMask]
BookFor = Callable[[int], MaskBook | None]

#: The oneof field name of each body type (also the ``kind`` that ``peek`` returns).
KIND_OF_TYPE: dict[type, str] = {
    m.RoundCommand: "round_command",
    m.InitialPruneCommand: "initial_prune_command",
    m.ProfileCommand: "profile_command",
    m.EvaluateCommand: "evaluate_command",
    m.CancelCommand: "cancel_command",
    m.ModelSnapshot: "model",
    m.DeviceUpdate: "update",
    m.InitialPruneResult: "initial_prune_result",
    m.DeviceStatus: "status",
    m.JobEvent: "event",
    m.FleetStatus: "fleet_status",
    m.ChunkManifest: "chunk_manifest",
    m.Chunk: "chunk",
    m.ErrorInfo: "error",
    **deploy_pb.KINDS,  # deployment and inference bodies (device.wire.deploy_pb)
}

_KIND_BY_FIELD: dict[int, str] = {
    f.number: f.name for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["kind"].fields
}

_E = TypeVar("_E")
_C = TypeVar("_C", bound=Sized)

#: Most entries of any repeated or map field (tensors, metrics, tags, profile points, ...).
MAX_ITEMS = 10_000
#: Most protobuf fields ``peek`` walks through (envelope and body together).
MAX_PEEK_FIELDS = 65_536


def kind_of(body: m.Body) -> str:
    """The oneof name of a body, e.g. ``"update"`` for a DeviceUpdate."""
    try:
        return KIND_OF_TYPE[type(body)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in KIND_OF_TYPE))
        raise ValueError(f"unknown body type {type(body).__name__!r}; known: {known}") from None


# ---------------------------------------------------------------------------------------------
# Small conversions
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    m.ValueDType.FP32: pb.VALUE_DTYPE_FP32,
    m.ValueDType.FP16: pb.VALUE_DTYPE_FP16,
    m.ValueDType.BF16: pb.VALUE_DTYPE_BF16,
    m.ValueDType.INT8: pb.VALUE_DTYPE_INT8,
    m.ValueDType.INT4: pb.VALUE_DTYPE_INT4,
}
_GROW = {m.GrowPolicy.GRADIENT: pb.GROW_POLICY_GRADIENT, m.GrowPolicy.RANDOM: pb.GROW_POLICY_RANDOM}
_JOB_STATES = {
    m.JobState.ACCEPTED: pb.JOB_STATE_ACCEPTED,
    m.JobState.TRAINING: pb.JOB_STATE_TRAINING,
    m.JobState.UPLOADED: pb.JOB_STATE_UPLOADED,
    m.JobState.FAILED: pb.JOB_STATE_FAILED,
    m.JobState.REJECTED: pb.JOB_STATE_REJECTED,
    m.JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
    m.JobState.EVALUATED: pb.JOB_STATE_EVALUATED,
}
_ERROR_CODES = {
    m.ErrorCode.BAD_MESSAGE: pb.ERROR_CODE_BAD_MESSAGE,
    m.ErrorCode.WRONG_VERSION: pb.ERROR_CODE_WRONG_VERSION,
    m.ErrorCode.NO_DATA: pb.ERROR_CODE_NO_DATA,
    m.ErrorCode.INTERNAL: pb.ERROR_CODE_INTERNAL,
    m.ErrorCode.BUSY: pb.ERROR_CODE_BUSY,
}


def _enum_from_pb(table: Mapping[_E, int], value: int, field: str) -> _E:
    """The dataclass enum member for a protobuf enum number; UNSPECIFIED (0) and unknown
    numbers (proto3 enums are open) are errors."""
    for member, number in table.items():
        if number == value:
            return member
    raise EnvelopeDecodeError(f"{field}: unknown enum value {value}", reason="bad_enum")


def _precision(value: int, field: str) -> m.ValueDType:
    """A value precision (``ValueDType``) field; an unknown number is refused by name."""
    for member, number in _DTYPES.items():
        if number == value:
            return member
    known = ", ".join(member.value for member in _DTYPES)
    raise EnvelopeDecodeError(
        f"{field}: unknown value precision {value} (known: {known})", reason="bad_precision"
    )


def _f32(x: float) -> float:
    """A float32 field's value as the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(x)))


def _items(container: _C, where: str) -> _C:
    """A repeated or map field, refused when it has more than MAX_ITEMS entries: decoding
    costs Python work per entry, and a payload of millions of tiny entries must not buy
    minutes of it."""
    if len(container) > MAX_ITEMS:
        raise EnvelopeDecodeError(
            f"{where}: {len(container)} entries (at most {MAX_ITEMS})", reason="too_large"
        )
    return container


def _f32s(xs: Any, where: str) -> tuple[float, ...]:
    return tuple(_f32(x) for x in _items(xs, where))


def _check_sha256(digest: bytes, field: str) -> bytes:
    if len(digest) != 32:
        raise EnvelopeDecodeError(f"{field}: {len(digest)} bytes, not 32", reason="bad_field")
    return digest


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------


class _Out:
    """Encoding options shared by the body encoders."""

    def __init__(
        self,
        book: MaskBook | None,
        dtype: m.ValueDType | None,
        rounding: Rounding,
        rng: np.random.Generator | None,
    ) -> None:
        self.book = book
        self.dtype = dtype if dtype is not None else m.ValueDType.FP32
        self.rounding: Rounding = rounding
        self.rng = rng


def _put_training(msg: pb.LocalTraining, t: m.LocalTraining) -> None:
    msg.epochs = t.epochs
    msg.batch_size = t.batch_size
    msg.lr = t.lr
    msg.momentum = t.momentum
    msg.weight_decay = t.weight_decay
    msg.prox_mu = t.prox_mu
    msg.max_steps = t.max_steps


def _get_training(msg: pb.LocalTraining) -> m.LocalTraining:
    return m.LocalTraining(
        epochs=msg.epochs,
        batch_size=msg.batch_size,
        lr=_f32(msg.lr),
        momentum=_f32(msg.momentum),
        weight_decay=_f32(msg.weight_decay),
        prox_mu=_f32(msg.prox_mu),
        max_steps=msg.max_steps,
    )


def _named_chunks(field: int, name: str, encoded: EncodedTensor) -> list[Chunk]:
    """A NamedTensor as field ``field`` of its parent, in chunks."""
    return length_delimited(
        field,
        [*length_delimited(1, [name.encode("utf-8")]), *length_delimited(2, encoded.chunks())],
    )


def _snapshot_chunks(s: m.ModelSnapshot, out: _Out, base: MaskBook | None = None) -> list[Chunk]:
    """A ModelSnapshot message in chunks: tensors self-contained (ABSOLUTE or DENSE), or with a
    ``base`` (the masks of a version the receiver holds) a patch: a pruned tensor's positions
    IMPLIED or DIFF against its base mask where that is smaller."""
    unknown = sorted(set(s.masks) - set(s.weights))
    if unknown:
        raise ValueError(f"ModelSnapshot masks without weights: {unknown}")
    head = pb.ModelSnapshot(
        model_name=s.model_name, version=s.version, digest=s.digest, mask_version=s.mask_version
    )
    if s.model_ref is not None:
        model_pb.put_ref(head.model_ref, s.model_ref)
    head.architecture_digest = s.architecture_digest
    head.classes.extend(s.classes)
    head.pruned.extend(name for name in s.weights if name in s.masks)
    chunks: list[Chunk] = [head.SerializeToString()]
    for name, weight in s.weights.items():
        mask = s.masks.get(name)
        tensor = SparseTensor.from_dense(weight, mask)
        entry = base.get(name) if base is not None and mask is not None else None
        encoded = encode_tensor_parts(
            tensor, out.dtype, base=entry, rounding=out.rounding, rng=out.rng
        )
        chunks += _named_chunks(5, name, encoded)
    return chunks


def _named(tensors: Any, where: str, book: MaskBook | None = None) -> dict[str, SparseTensor]:
    """Decode a repeated NamedTensor into a dict, rejecting duplicate names."""
    result: dict[str, SparseTensor] = {}
    for nt in _items(tensors, where):
        name = nt.name
        if name in result:
            raise EnvelopeDecodeError(f"{where}: tensor {name!r} appears twice", reason="duplicate")
        entry = book.get(name) if book is not None else None
        result[name] = decode_tensor(nt.tensor, book_entry=entry, where=f"{where}[{name!r}]")
    return result


def _get_snapshot(
    msg: pb.ModelSnapshot, where: str, sparse_weights: bool = False, held: MaskBook | None = None
) -> m.ModelSnapshot:
    tensors = _named(msg.tensors, f"{where}.tensors", held)
    pruned = list(_items(msg.pruned, f"{where}.pruned"))
    if len(set(pruned)) != len(pruned):
        raise EnvelopeDecodeError(f"{where}.pruned names a tensor twice", reason="duplicate")
    missing = sorted(set(pruned) - set(tensors))
    if missing:
        raise EnvelopeDecodeError(
            f"{where}.pruned names tensors that are not in the snapshot: {missing}",
            reason="bad_field",
        )
    pruned_set = set(pruned)
    for name, t in tensors.items():
        if name not in pruned_set and t.nnz != t.numel:
            raise EnvelopeDecodeError(
                f"{where}.tensors[{name!r}] has positions but is not listed as pruned",
                reason="bad_field",
            )
    ref = (
        model_pb.get_ref(msg.model_ref, f"{where}.model_ref") if msg.HasField("model_ref") else None
    )
    if ref is not None and ref.text != msg.model_name:
        raise EnvelopeDecodeError(
            f"{where}.model_name {msg.model_name!r} is not its model_ref {ref.text!r}",
            reason="bad_field",
        )
    classes = tuple(_items(msg.classes, f"{where}.classes"))
    if len(set(classes)) != len(classes) or "" in classes:
        raise EnvelopeDecodeError(
            f"{where}.classes must be distinct, non-empty names", reason="bad_field"
        )
    return m.ModelSnapshot(
        model_name=msg.model_name,
        version=msg.version,
        digest=msg.digest,
        mask_version=msg.mask_version,
        weights=(
            SparseWeights(tensors)
            if sparse_weights
            else {name: t.to_dense() for name, t in tensors.items()}
        ),
        masks={name: tensors[name].mask for name in pruned},
        model_ref=ref,
        architecture_digest=model_pb.get_digest(
            msg.architecture_digest, f"{where}.architecture_digest"
        ),
        classes=classes,
    )


def _update_chunks(u: m.DeviceUpdate, out: _Out) -> list[Chunk]:
    """A DeviceUpdate message in chunks: deltas against ``out.book``, importance dense fp32."""
    head = pb.DeviceUpdate(
        model_version=u.model_version,
        model_digest=u.model_digest,
        num_examples=u.num_examples,
        local_steps=u.local_steps,
        train_s=u.train_s,
        download_s=u.download_s,
        encode_s=u.encode_s,
    )
    head.metrics.update(u.metrics)
    chunks: list[Chunk] = [head.SerializeToString()]
    for name, delta in u.deltas.items():
        base = out.book.get(name) if out.book is not None else None
        encoded = encode_tensor_parts(
            delta, out.dtype, base=base, rounding=out.rounding, rng=out.rng
        )
        chunks += _named_chunks(3, name, encoded)
    for name, importance in u.importance.items():
        encoded = encode_tensor_parts(SparseTensor.from_dense(importance), "fp32")
        chunks += _named_chunks(4, name, encoded)
    return chunks


def _body_chunks(body: m.Body, out: _Out) -> tuple[int, list[Chunk]] | None:
    """(oneof field number, serialised body in chunks) for the bodies that carry tensors."""
    if isinstance(body, m.DeviceUpdate):
        return 16, _update_chunks(body, out)
    if isinstance(body, m.ModelSnapshot):
        return 15, _snapshot_chunks(body, out, out.book)
    if isinstance(body, m.InitialPruneResult):
        head = pb.InitialPruneResult(reconfigs=body.reconfigs, train_s=body.train_s)
        head.densities.extend(body.densities)
        chunks = [head.SerializeToString(), *length_delimited(1, _snapshot_chunks(body.model, out))]
        return 17, chunks
    return None


def _get_update(msg: pb.DeviceUpdate, book_for: BookFor | None) -> m.DeviceUpdate:
    book = book_for(msg.model_version) if book_for is not None else None
    deltas = _named(msg.deltas, "update.deltas", book)
    importance = _named(msg.importance, "update.importance")
    return m.DeviceUpdate(
        model_version=msg.model_version,
        model_digest=msg.model_digest,
        deltas=deltas,
        num_examples=msg.num_examples,
        importance={name: t.to_dense() for name, t in importance.items()},
        local_steps=msg.local_steps,
        train_s=msg.train_s,
        download_s=msg.download_s,
        encode_s=msg.encode_s,
        metrics=dict(_items(msg.metrics, "update.metrics")),
    )


def _put_profile(msg: pb.DeviceProfile, p: m.DeviceProfile) -> None:
    msg.model_name = p.model_name
    msg.batch_size = p.batch_size
    msg.step_overhead_s = p.step_overhead_s
    msg.uplink_bytes_per_s = p.uplink_bytes_per_s
    msg.downlink_bytes_per_s = p.downlink_bytes_per_s
    for layer in p.layers:
        lm = msg.layers.add(name=layer.name, numel=layer.numel)
        for point in layer.points:
            lm.points.add(density=point.density, dense_s=point.dense_s, sparse_s=point.sparse_s)


def _get_profile(msg: pb.DeviceProfile) -> m.DeviceProfile:
    return m.DeviceProfile(
        model_name=msg.model_name,
        batch_size=msg.batch_size,
        step_overhead_s=msg.step_overhead_s,
        layers=tuple(
            m.LayerProfile(
                name=layer.name,
                numel=layer.numel,
                points=tuple(
                    m.ProfilePoint(density=_f32(p.density), dense_s=p.dense_s, sparse_s=p.sparse_s)
                    for p in _items(layer.points, "status.profile.layers.points")
                ),
            )
            for layer in _items(msg.layers, "status.profile.layers")
        ),
        uplink_bytes_per_s=msg.uplink_bytes_per_s,
        downlink_bytes_per_s=msg.downlink_bytes_per_s,
    )


def _put_body(env: pb.Envelope, body: m.Body) -> None:
    """Fill the envelope's oneof for the bodies without tensors."""
    if isinstance(body, m.RoundCommand):
        rc = env.round_command
        rc.model_version = body.model_version
        rc.model_digest = body.model_digest
        _put_training(rc.training, body.training)
        if body.readjust is not None:
            r = body.readjust
            rc.readjust.alpha = r.alpha
            rc.readjust.at_fraction = r.at_fraction
            rc.readjust.grad_window = r.grad_window
            rc.readjust.grow = _GROW[r.grow]
        rc.report_importance = body.report_importance
        rc.upload_dtype = _DTYPES[body.upload_dtype]
        rc.deadline_unix_s = body.deadline_unix_s
        rc.partition = body.partition
        rc.download_dtype = _DTYPES[body.download_dtype]
        rc.density_budget = body.density_budget
    elif isinstance(body, m.InitialPruneCommand):
        ic = env.initial_prune_command
        ic.model_version = body.model_version
        ic.model_digest = body.model_digest
        _put_training(ic.training, body.training)
        ic.rounds_per_reconfig = body.rounds_per_reconfig
        ic.max_reconfigs = body.max_reconfigs
        ic.stable_change = body.stable_change
        ic.stable_count = body.stable_count
        ic.deadline_unix_s = body.deadline_unix_s
        ic.partition = body.partition
        ic.cost_per_param_s.update(body.cost_per_param_s)
        ic.fixed_cost_s = body.fixed_cost_s
        ic.protect_fraction = body.protect_fraction
    elif isinstance(body, m.ProfileCommand):
        env.profile_command.SetInParent()
        env.profile_command.densities.extend(body.densities)
    elif isinstance(body, m.EvaluateCommand):
        env.evaluate_command.model_version = body.model_version
        env.evaluate_command.model_digest = body.model_digest
    elif isinstance(body, m.CancelCommand):
        env.cancel_command.SetInParent()
        env.cancel_command.reason = body.reason
    elif isinstance(body, m.DeviceStatus):
        st = env.status
        st.online = body.online
        st.session_epoch = body.session_epoch
        st.agent_version = body.agent_version
        hw = body.hardware
        st.hardware.machine = hw.machine
        st.hardware.cpu_count = hw.cpu_count
        st.hardware.memory_bytes = hw.memory_bytes
        st.hardware.python_version = hw.python_version
        st.hardware.torch_version = hw.torch_version
        st.dataset_size = body.dataset_size
        st.eval_examples = body.eval_examples
        if body.profile is not None:
            _put_profile(st.profile, body.profile)
        st.tags.extend(body.tags)
        st.timestamp_unix_s = body.timestamp_unix_s
        model_pb.put_offers(st, body.models)
        if body.deployed is not None:
            deploy_pb.put_deployed(st.deployed, body.deployed)
    elif isinstance(body, m.JobEvent):
        ev = env.event
        ev.state = _JOB_STATES[body.state]
        ev.reason = body.reason
        ev.timestamp_unix_s = body.timestamp_unix_s
        ev.metrics.update(body.metrics)
    elif isinstance(body, m.FleetStatus):
        fs = env.fleet_status
        fs.online = body.online
        fs.run_id = body.run_id
        fs.round = body.round
        fs.selected = body.selected
        fs.received = body.received
        fs.timestamp_unix_s = body.timestamp_unix_s
    elif isinstance(body, m.ChunkManifest):
        cm = env.chunk_manifest
        cm.sha256 = body.sha256
        cm.total_bytes = body.total_bytes
        cm.chunk_count = body.chunk_count
        cm.chunk_bytes = body.chunk_bytes
    elif isinstance(body, m.Chunk):
        env.chunk.sha256 = body.sha256
        env.chunk.index = body.index
        env.chunk.data = body.data
    elif isinstance(body, m.ErrorInfo):
        env.error.code = _ERROR_CODES[body.code]
        env.error.reason = body.reason
    elif isinstance(body, deploy_pb.DeployBody):
        deploy_pb.put_body(env, body)
    else:
        kind_of(body)  # raises the registry-style ValueError


def _get_body(
    env: pb.Envelope,
    kind: str,
    book_for: BookFor | None,
    sparse_weights: bool = False,
    held: MaskBook | None = None,
) -> m.Body:
    if kind == "round_command":
        rc = env.round_command
        readjust = None
        if rc.HasField("readjust"):
            r = rc.readjust
            readjust = m.Readjust(
                alpha=_f32(r.alpha),
                at_fraction=_f32(r.at_fraction),
                grad_window=r.grad_window,
                grow=_enum_from_pb(_GROW, r.grow, "round_command.readjust.grow"),
            )
        return m.RoundCommand(
            model_version=rc.model_version,
            model_digest=rc.model_digest,
            training=_get_training(rc.training),
            readjust=readjust,
            report_importance=rc.report_importance,
            upload_dtype=_precision(rc.upload_dtype, "round_command.upload_dtype"),
            deadline_unix_s=rc.deadline_unix_s,
            partition=rc.partition,
            # UNSPECIFIED: a sender from before the field existed, whose snapshots are fp32.
            download_dtype=_precision(
                rc.download_dtype or _DTYPES[m.ValueDType.FP32], "round_command.download_dtype"
            ),
            density_budget=_f32(rc.density_budget),
        )
    if kind == "initial_prune_command":
        ic = env.initial_prune_command
        return m.InitialPruneCommand(
            model_version=ic.model_version,
            model_digest=ic.model_digest,
            training=_get_training(ic.training),
            rounds_per_reconfig=ic.rounds_per_reconfig,
            max_reconfigs=ic.max_reconfigs,
            stable_change=_f32(ic.stable_change),
            stable_count=ic.stable_count,
            deadline_unix_s=ic.deadline_unix_s,
            partition=ic.partition,
            cost_per_param_s=dict(ic.cost_per_param_s),
            fixed_cost_s=ic.fixed_cost_s,
            protect_fraction=_f32(ic.protect_fraction),
        )
    if kind == "profile_command":
        densities = _f32s(env.profile_command.densities, "profile_command.densities")
        return m.ProfileCommand(densities=densities)
    if kind == "evaluate_command":
        ec = env.evaluate_command
        return m.EvaluateCommand(model_version=ec.model_version, model_digest=ec.model_digest)
    if kind == "cancel_command":
        return m.CancelCommand(reason=env.cancel_command.reason)
    if kind == "model":
        return _get_snapshot(env.model, "model", sparse_weights, held)
    if kind == "update":
        return _get_update(env.update, book_for)
    if kind == "initial_prune_result":
        ir = env.initial_prune_result
        return m.InitialPruneResult(
            model=_get_snapshot(ir.model, "initial_prune_result.model"),
            reconfigs=ir.reconfigs,
            densities=_f32s(ir.densities, "initial_prune_result.densities"),
            train_s=ir.train_s,
        )
    if kind == "status":
        st = env.status
        hw = st.hardware
        return m.DeviceStatus(
            online=st.online,
            session_epoch=st.session_epoch,
            agent_version=st.agent_version,
            hardware=m.Hardware(
                machine=hw.machine,
                cpu_count=hw.cpu_count,
                memory_bytes=hw.memory_bytes,
                python_version=hw.python_version,
                torch_version=hw.torch_version,
            ),
            dataset_size=st.dataset_size,
            eval_examples=st.eval_examples,
            profile=_get_profile(st.profile) if st.HasField("profile") else None,
            tags=tuple(_items(st.tags, "status.tags")),
            timestamp_unix_s=st.timestamp_unix_s,
            deployed=deploy_pb.get_deployed(st.deployed) if st.HasField("deployed") else None,
            models=model_pb.get_offers(st),
        )
    if kind == "event":
        ev = env.event
        return m.JobEvent(
            state=_enum_from_pb(_JOB_STATES, ev.state, "event.state"),
            reason=ev.reason,
            timestamp_unix_s=ev.timestamp_unix_s,
            metrics=dict(_items(ev.metrics, "event.metrics")),
        )
    if kind == "fleet_status":
        fs = env.fleet_status
        return m.FleetStatus(
            online=fs.online,
            run_id=fs.run_id,
            round=fs.round,
            selected=fs.selected,
            received=fs.received,
            timestamp_unix_s=fs.timestamp_unix_s,
        )
    if kind == "chunk_manifest":
        cm = env.chunk_manifest
        return m.ChunkManifest(
            sha256=_check_sha256(cm.sha256, "chunk_manifest.sha256"),
            total_bytes=cm.total_bytes,
            chunk_count=cm.chunk_count,
            chunk_bytes=cm.chunk_bytes,
        )
    if kind == "chunk":
        ch = env.chunk
        return m.Chunk(
            sha256=_check_sha256(ch.sha256, "chunk.sha256"), index=ch.index, data=ch.data
        )
    if kind == "error":
        return m.ErrorInfo(
            code=_enum_from_pb(_ERROR_CODES, env.error.code, "error.code"),
            reason=env.error.reason,
        )
    if kind in _DEPLOY_KINDS:
        return deploy_pb.get_body(env, kind)
    raise EnvelopeDecodeError(f"unknown message kind {kind!r}", reason="bad_kind")


_DEPLOY_KINDS = frozenset(deploy_pb.KINDS.values())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def encode(
    env: m.Envelope,
    *,
    book: MaskBook | None = None,
    dtype: m.ValueDType | None = None,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> bytes:
    """Serialise an envelope.

    ``book``: the masks of the model a DeviceUpdate was trained from, keyed by tensor name;
    deltas whose mask equals the book's travel with IMPLIED positions, changed ones as DIFF
    (or ABSOLUTE when smaller). For a ModelSnapshot, the masks of a version the receiver holds:
    the snapshot becomes a patch, its pruned tensors' positions encoded the same way.
    ``dtype``: value dtype of DeviceUpdate deltas and of snapshot tensors (ModelSnapshot,
    InitialPruneResult); None means fp32. ``rounding``/``rng``: for
    int8/int4. Importance tensors always travel dense in fp32. Raises ``ValueError`` for
    values protobuf cannot hold (negative counts, ...) or non-finite values with int dtypes.
    """
    msg = pb.Envelope(
        schema_version=env.schema_version,
        run_id=env.run_id,
        round=env.round,
        device_id=env.device_id,
        correlation_id=env.correlation_id,
    )
    spliced = _body_chunks(env.body, _Out(book, dtype, rounding, rng))
    if spliced is None:
        _put_body(msg, env.body)
        return msg.SerializeToString()
    field, chunks = spliced
    return b"".join([msg.SerializeToString(), *length_delimited(field, chunks)])


def decode(
    data: bytes,
    *,
    book_for: BookFor | None = None,
    max_bytes: int | None = None,
    sparse_weights: bool = False,
    held: MaskBook | None = None,
) -> m.Envelope:
    """Parse and validate an envelope (see the module docstring for what is checked).

    ``book_for(model_version)`` returns the receiver's mask book for a DeviceUpdate's model
    version (or None when that version is unknown: then only self-contained positions decode).
    ``max_bytes`` rejects larger payloads before parsing. ``sparse_weights``: a ModelSnapshot's
    weights stay as received, dense on access (``SparseWeights``), for a receiver that keeps it.
    ``held``: the masks of the snapshot the receiver holds, for a patch's IMPLIED and DIFF
    positions (a patch against other masks fails with reason ``unknown_mask`` or
    ``mask_mismatch``).
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise EnvelopeDecodeError(
            f"message of {len(data)} bytes exceeds the limit of {max_bytes}", reason="too_large"
        )
    msg = pb.Envelope()
    try:
        msg.ParseFromString(data)
    except ProtobufDecodeError as exc:
        raise EnvelopeDecodeError(f"not a valid Envelope: {exc}", reason="not_protobuf") from exc
    if msg.schema_version != m.SCHEMA_VERSION:
        raise EnvelopeDecodeError(
            f"schema version {msg.schema_version}; this build speaks {m.SCHEMA_VERSION}",
            reason="wrong_schema",
        )
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise EnvelopeDecodeError("envelope has no body", reason="no_body")
    body = _get_body(msg, kind, book_for, sparse_weights, held)
    return m.Envelope(
        body=body,
        run_id=msg.run_id,
        round=msg.round,
        device_id=msg.device_id,
        correlation_id=msg.correlation_id,
        schema_version=msg.schema_version,
    )


# ---------------------------------------------------------------------------------------------
# Peek: routing fields without a full parse
# ---------------------------------------------------------------------------------------------


class Peek(NamedTuple):
    """The routing fields of an envelope. ``model_version`` is the model a round command,
    initial-prune command, evaluate command or update refers to, or a snapshot's version;
    None for other kinds."""

    kind: str
    run_id: str
    round: int
    device_id: str
    model_version: int | None


# Bodies whose model version is a top-level varint field of the body: field number.
_VERSION_FIELD = {
    "round_command": 1,
    "initial_prune_command": 1,
    "evaluate_command": 1,
    "update": 1,
    "model": 2,
}


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise EnvelopeDecodeError("truncated or overlong varint", reason="not_protobuf")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7


def _fields(
    buf: memoryview, pos: int, end: int, budget: int
) -> list[tuple[int, int, int | tuple[int, int]]]:
    """Top-level fields of one message as (number, wire type, varint value or (start, end)).

    Length-delimited fields are skipped by their length, so the cost is per field, not per
    byte: a 50 MB update with a dozen tensors takes a few dozen steps. At most ``budget``
    fields are walked (``EnvelopeDecodeError`` beyond).
    """
    fields: list[tuple[int, int, int | tuple[int, int]]] = []
    while pos < end:
        if len(fields) >= budget:
            raise EnvelopeDecodeError(
                f"more than {MAX_PEEK_FIELDS} fields to walk", reason="too_large"
            )
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise EnvelopeDecodeError("field number 0", reason="not_protobuf")
        value: int | tuple[int, int]
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise EnvelopeDecodeError("field runs past the end", reason="not_protobuf")
            value = (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise EnvelopeDecodeError("field runs past the end", reason="not_protobuf")
            value = 0
        else:
            raise EnvelopeDecodeError(f"unsupported wire type {wire}", reason="not_protobuf")
        fields.append((number, wire, value))
    return fields


def _text(buf: memoryview, span: int | tuple[int, int], field: str) -> str:
    assert isinstance(span, tuple)
    try:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeDecodeError(f"{field} is not UTF-8", reason="not_protobuf") from exc


def peek(data: bytes) -> Peek:
    """Routing fields of an encoded envelope without parsing its tensors.

    Reads the envelope's top-level fields and, for the kinds in ``Peek``'s docstring, the
    body's version field; it checks the schema version and that a body is present
    (``EnvelopeDecodeError`` otherwise), not the rest of the message. Later occurrences of a
    field win, as in protobuf.
    """
    buf = memoryview(data)
    schema = 0
    run_id = device_id = ""
    round_ = 0
    kind: str | None = None
    body_spans: list[tuple[int, int]] = []
    top = _fields(buf, 0, len(buf), MAX_PEEK_FIELDS)
    budget = MAX_PEEK_FIELDS - len(top)
    for number, wire, value in top:
        if number == 1 and wire == 0:
            assert isinstance(value, int)
            schema = value
        elif number == 2 and wire == 2:
            run_id = _text(buf, value, "run_id")
        elif number == 3 and wire == 0:
            assert isinstance(value, int)
            round_ = value
        elif number == 4 and wire == 2:
            device_id = _text(buf, value, "device_id")
        elif number in _KIND_BY_FIELD and wire == 2:
            assert isinstance(value, tuple)
            name = _KIND_BY_FIELD[number]
            if name != kind:
                body_spans = []  # a different oneof member replaces the previous one
            kind = name
            body_spans.append(value)
    if schema != m.SCHEMA_VERSION:
        raise EnvelopeDecodeError(
            f"schema version {schema}; this build speaks {m.SCHEMA_VERSION}",
            reason="wrong_schema",
        )
    if kind is None:
        raise EnvelopeDecodeError("envelope has no body", reason="no_body")
    version: int | None = None
    if kind in _VERSION_FIELD:
        version = 0  # proto3 default when the field is absent
        for start, end in body_spans:  # repeated occurrences of a message field merge
            fields = _fields(buf, start, end, budget)
            budget -= len(fields)
            for number, wire, value in fields:
                if number == _VERSION_FIELD[kind] and wire == 0:
                    assert isinstance(value, int)
                    version = value
    return Peek(kind, run_id, round_, device_id, version)

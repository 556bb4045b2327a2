"""Envelope tests: every message kind round-trips, peek routes without parsing tensors, and
malformed envelopes raise named DecodeErrors."""

from __future__ import annotations

import typing
from typing import Any

import numpy as np
import pytest

from device.errors import EnvelopeDecodeError, TensorDecodeError
from device.wire import codec, envelope
from device.wire import messages as m
from device.wire.codec import KnownMask, SparseTensor
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.sparse_weights import SparseWeights

RNG = np.random.default_rng(42)


def _weights_and_masks() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    mask = RNG.random((60, 50)) < 0.3
    weights = {
        "fc.weight": np.where(mask, RNG.standard_normal((60, 50)), 0).astype(np.float32),
        "fc.bias": RNG.standard_normal(60).astype(np.float32),
    }
    return weights, {"fc.weight": mask}


WEIGHTS, MASKS = _weights_and_masks()
SNAPSHOT = m.ModelSnapshot(
    model_name="mnist_cnn",
    version=4,
    digest=codec.model_digest(WEIGHTS, MASKS),
    mask_version=3,
    weights=WEIGHTS,
    masks=MASKS,
)
BOOK = {"fc.weight": KnownMask(3, MASKS["fc.weight"].copy())}
UPDATE = m.DeviceUpdate(
    model_version=4,
    model_digest=SNAPSHOT.digest,
    deltas={
        "fc.weight": SparseTensor.from_dense(RNG.standard_normal((60, 50)), MASKS["fc.weight"]),
        "fc.bias": SparseTensor.from_dense(RNG.standard_normal(60)),
    },
    num_examples=120,
    importance={"fc.weight": np.abs(RNG.standard_normal((60, 50))).astype(np.float32)},
    local_steps=4,
    train_s=1.5,
    download_s=0.25,
    encode_s=0.01,
    metrics={"train_loss": 0.5, "train_accuracy": 0.875},
)
PROFILE = m.DeviceProfile(
    model_name="mnist_cnn",
    batch_size=32,
    step_overhead_s=0.002,
    layers=(
        m.LayerProfile(
            "fc.weight", 3000, (m.ProfilePoint(1.0, 0.01, 0.0), m.ProfilePoint(0.1, 0.01, 0.004))
        ),
    ),
    uplink_bytes_per_s=1e6,
    downlink_bytes_per_s=2e6,
)

BODIES: dict[str, m.Body] = {
    "round_command": m.RoundCommand(
        model_version=4,
        model_digest=SNAPSHOT.digest,
        training=m.LocalTraining(epochs=2, batch_size=16, lr=0.05, prox_mu=0.01, max_steps=9),
        readjust=m.Readjust(alpha=0.25, at_fraction=1.0, grad_window=3, grow=m.GrowPolicy.RANDOM),
        report_importance=True,
        upload_dtype=m.ValueDType.INT8,
        deadline_unix_s=1_700_000_000.5,
        partition="shard-3",
    ),
    "initial_prune_command": m.InitialPruneCommand(
        model_version=1, model_digest=b"\x01" * 32, max_reconfigs=7, partition="p"
    ),
    "profile_command": m.ProfileCommand(densities=(1.0, 0.3, 0.05)),
    "evaluate_command": m.EvaluateCommand(model_version=9, model_digest=b"\x02" * 32),
    "cancel_command": m.CancelCommand(reason="operator stopped the run"),
    "model": SNAPSHOT,
    "update": UPDATE,
    "initial_prune_result": m.InitialPruneResult(
        model=SNAPSHOT, reconfigs=6, densities=(0.8, 0.5, 0.45), train_s=12.5
    ),
    "status": m.DeviceStatus(
        online=True,
        session_epoch=17,
        agent_version="0.1.0",
        hardware=m.Hardware("aarch64", 4, 8 << 30, "3.11.2", "2.13.0"),
        dataset_size=600,
        profile=PROFILE,
        tags=("site=berlin", "pi4"),
        timestamp_unix_s=1_700_000_001.25,
    ),
    "event": m.JobEvent(
        state=m.JobState.FAILED, reason="out of memory", timestamp_unix_s=3.5, metrics={"a": 1.0}
    ),
    "fleet_status": m.FleetStatus(
        online=True, run_id="run-1", round=5, selected=10, received=7, timestamp_unix_s=9.0
    ),
    "chunk_manifest": m.ChunkManifest(
        sha256=b"\x03" * 32, total_bytes=10_000_000, chunk_count=3, chunk_bytes=4 << 20
    ),
    "chunk": m.Chunk(sha256=b"\x04" * 32, index=2, data=b"\x00\xff" * 100),
    "error": m.ErrorInfo(code=m.ErrorCode.WRONG_VERSION, reason="model 3 is gone"),
    # Deployment and inference (device.wire.deploy_messages; the protocol: tests/deploy/).
    "deploy_notice": m.DeployNotice(
        sequence=3, version="r30", artefact_sha256=b"\x05" * 32, artefact_bytes=9, devices=("a",)
    ),
    "deploy_artefact": m.DeployArtefact(data=b"PK\x03\x04"),
    "deploy_event": m.DeployEvent(state=m.DeployState.ACTIVE, version="r30", metrics={"x": 1.0}),
    "inference_request": m.InferenceRequest(inputs=np.ones((2, 1, 8, 8), dtype=np.float32)),
    "inference_reply": m.InferenceReply(logits=np.zeros((2, 10), dtype=np.float32), version="v"),
}


def _same(a: Any, b: Any) -> bool:
    """Structural equality that compares numpy arrays and SparseTensors by content."""
    if isinstance(a, SparseTensor):
        return isinstance(b, SparseTensor) and a.equal(b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, typing.Mapping):
        return (
            isinstance(b, typing.Mapping)
            and a.keys() == b.keys()
            and all(_same(a[k], b[k]) for k in a)
        )
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return bool(a == b)


def test_examples_cover_every_body_type() -> None:
    """A new message kind without a round-trip example fails here."""
    assert {type(b) for b in BODIES.values()} == set(typing.get_args(m.Body))
    assert set(envelope.KIND_OF_TYPE.values()) == set(BODIES)


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_every_kind_round_trips(kind: str) -> None:
    """What one side encodes, the other side decodes to an equal dataclass."""
    env = m.Envelope(BODIES[kind], run_id="run-1", round=5, device_id="pi-07", correlation_id="c-9")
    data = envelope.encode(env, book=BOOK)
    back = envelope.decode(data, book_for=lambda version: BOOK if version == 4 else None, held=BOOK)
    assert _same(back, env)
    assert envelope.kind_of(back.body) == kind


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_peek_reads_routing_fields_of_every_kind(kind: str) -> None:
    """Routing must not need the mask book or a full parse."""
    env = m.Envelope(BODIES[kind], run_id="run-1", round=5, device_id="pi-07")
    expected_version = {
        "round_command": 4,
        "initial_prune_command": 1,
        "evaluate_command": 9,
        "model": 4,
        "update": 4,
    }.get(kind)
    peeked = envelope.peek(envelope.encode(env, book=BOOK))
    assert peeked == envelope.Peek(kind, "run-1", 5, "pi-07", expected_version)


def test_float32_fields_come_back_as_the_decimals_that_were_sent() -> None:
    """lr=0.01 travels as float32 and must not come back as 0.009999999776."""
    env = m.Envelope(m.ProfileCommand(densities=(0.1, 0.3)))
    assert envelope.decode(envelope.encode(env)).body == m.ProfileCommand(densities=(0.1, 0.3))


def test_update_deltas_use_implied_positions_when_the_mask_is_known() -> None:
    """An unchanged mask costs no index bytes; without the book the same update sends them."""
    env = m.Envelope(UPDATE)
    with_book = envelope.encode(env, book=BOOK)
    without = envelope.encode(env)
    msg = pb.Envelope.FromString(with_book)
    modes = {nt.name: nt.tensor.mode for nt in msg.update.deltas}
    assert modes == {"fc.weight": pb.POSITION_MODE_IMPLIED, "fc.bias": pb.POSITION_MODE_DENSE}
    assert len(with_book) < len(without)
    with pytest.raises(TensorDecodeError) as excinfo:
        envelope.decode(with_book)  # the receiver does not know the mask
    assert excinfo.value.reason == "unknown_mask"
    assert _same(envelope.decode(without).body, UPDATE)


def test_changed_device_mask_travels_as_a_diff_against_the_book() -> None:
    """FedDST readjustment: the delta's mask differs from the global one in a few places."""
    mask = MASKS["fc.weight"].copy()
    mask[0, 0] = not mask[0, 0]
    delta = SparseTensor.from_dense(RNG.standard_normal((60, 50)), mask)
    update = m.DeviceUpdate(4, SNAPSHOT.digest, {"fc.weight": delta}, num_examples=3)
    data = envelope.encode(m.Envelope(update), book=BOOK)
    tensor = pb.Envelope.FromString(data).update.deltas[0].tensor
    assert tensor.mode == pb.POSITION_MODE_DIFF and tensor.positions.count == 1
    back = envelope.decode(data, book_for=lambda _v: BOOK).body
    assert isinstance(back, m.DeviceUpdate) and back.deltas["fc.weight"].equal(delta)


def test_upload_dtype_applies_to_deltas_but_importance_stays_exact() -> None:
    data = envelope.encode(m.Envelope(UPDATE), book=BOOK, dtype=m.ValueDType.INT8)
    msg = pb.Envelope.FromString(data).update
    assert {nt.tensor.dtype for nt in msg.deltas} == {pb.VALUE_DTYPE_INT8}
    back = envelope.decode(data, book_for=lambda _v: BOOK).body
    assert isinstance(back, m.DeviceUpdate)
    assert np.array_equal(back.importance["fc.weight"], UPDATE.importance["fc.weight"])
    err = np.abs(back.deltas["fc.weight"].values - UPDATE.deltas["fc.weight"].values)
    assert err.max() <= np.abs(UPDATE.deltas["fc.weight"].values).max() / 254 * 1.0001


def test_snapshot_is_self_contained_and_keeps_its_digest() -> None:
    """A device joining late decodes the model with no mask book and verifies the digest."""
    data = envelope.encode(m.Envelope(SNAPSHOT))
    back = envelope.decode(data).body
    assert isinstance(back, m.ModelSnapshot)
    assert codec.model_digest(back.weights, back.masks) == SNAPSHOT.digest
    modes = {nt.name: nt.tensor.mode for nt in pb.Envelope.FromString(data).model.tensors}
    assert modes == {"fc.weight": pb.POSITION_MODE_ABSOLUTE, "fc.bias": pb.POSITION_MODE_DENSE}


@pytest.mark.parametrize("dtype", [m.ValueDType.FP32, m.ValueDType.INT8])
def test_a_patch_decodes_to_exactly_the_self_contained_snapshot(dtype: m.ValueDType) -> None:
    """A snapshot encoded against the masks a receiver holds: IMPLIED where the mask did not
    change, DIFF where a few positions did; fewer bytes, and the very same model decoded."""
    changed = MASKS["fc.weight"].copy()
    changed[0, :6] = ~changed[0, :6]  # a readjustment moved six positions
    weights = dict(WEIGHTS, **{"fc.weight": np.where(changed, 0.5, 0).astype(np.float32)})
    for masks, mode in (
        (MASKS, pb.POSITION_MODE_IMPLIED),
        ({"fc.weight": changed}, pb.POSITION_MODE_DIFF),
    ):
        body = m.ModelSnapshot("mnist_cnn", 5, b"d" * 32, 3, dict(WEIGHTS), masks)
        if masks is not MASKS:
            body = m.ModelSnapshot("mnist_cnn", 5, b"d" * 32, 5, weights, masks)
        env = m.Envelope(body, run_id="r")
        full = envelope.encode(env, dtype=dtype)
        patch = envelope.encode(env, dtype=dtype, book=BOOK)
        assert len(patch) < len(full)
        tensors = pb.Envelope.FromString(patch).model.tensors
        assert {nt.name: nt.tensor.mode for nt in tensors}["fc.weight"] == mode
        a, b = envelope.decode(full).body, envelope.decode(patch, held=BOOK).body
        assert isinstance(a, m.ModelSnapshot) and isinstance(b, m.ModelSnapshot)
        assert a.version == b.version and a.mask_version == b.mask_version
        for name in WEIGHTS:
            assert np.array_equal(a.weights[name], b.weights[name]), name
        assert np.array_equal(a.masks["fc.weight"], b.masks["fc.weight"])


def test_a_patch_without_its_base_masks_is_refused_by_name() -> None:
    """A receiver that holds no masks, or other masks, cannot decode a patch: the reason says
    so, and it fetches the self-contained snapshot instead (device.model_feed)."""
    patch = envelope.encode(m.Envelope(SNAPSHOT, run_id="r"), book=BOOK)
    with pytest.raises(TensorDecodeError) as nothing:
        envelope.decode(patch)
    assert nothing.value.reason == "unknown_mask"
    other = ~MASKS["fc.weight"]
    with pytest.raises(TensorDecodeError) as wrong:
        envelope.decode(patch, held={"fc.weight": KnownMask(3, other)})
    assert wrong.value.reason == "mask_mismatch"
    with pytest.raises(TensorDecodeError) as old:
        envelope.decode(patch, held={"fc.weight": KnownMask(2, MASKS["fc.weight"])})
    assert old.value.reason == "mask_mismatch"


def test_nan_deltas_decode_faithfully_for_the_fleet_to_reject() -> None:
    delta = SparseTensor.from_dense(np.array([np.nan, 1.0], dtype=np.float32))
    update = m.DeviceUpdate(4, SNAPSHOT.digest, {"b": delta}, num_examples=1)
    back = envelope.decode(envelope.encode(m.Envelope(update))).body
    assert isinstance(back, m.DeviceUpdate) and np.isnan(back.deltas["b"].values[0])


# ---------------------------------------------------------------------------------------------
# Malformed envelopes
# ---------------------------------------------------------------------------------------------


def _reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(EnvelopeDecodeError) as excinfo:
        envelope.decode(data, **kwargs)
    return excinfo.value.reason


def test_garbage_is_not_protobuf() -> None:
    assert _reason_of(b"\xff\xff\xff\xff") == "not_protobuf"
    with pytest.raises(EnvelopeDecodeError):
        envelope.peek(b"\xff\xff\xff\xff")


def test_wrong_schema_version_is_rejected_by_decode_and_peek() -> None:
    data = envelope.encode(m.Envelope(m.CancelCommand(), schema_version=2))
    assert _reason_of(data) == "wrong_schema"
    with pytest.raises(EnvelopeDecodeError):
        envelope.peek(data)


def test_envelope_without_body_is_rejected() -> None:
    data = pb.Envelope(schema_version=1, run_id="r").SerializeToString()
    assert _reason_of(data) == "no_body"


def test_unspecified_and_unknown_enum_values_are_rejected() -> None:
    """proto3 enums are open: 0 and numbers from a newer schema must not become a state."""
    for state in (pb.JOB_STATE_UNSPECIFIED, typing.cast(pb.JobState, 99)):
        msg = pb.Envelope(schema_version=1)
        msg.event.state = state
        assert _reason_of(msg.SerializeToString()) == "bad_enum"


def test_duplicate_tensor_names_are_rejected() -> None:
    """Two deltas for one tensor would be aggregated twice."""
    msg = pb.Envelope.FromString(envelope.encode(m.Envelope(UPDATE)))
    msg.update.deltas.add().CopyFrom(msg.update.deltas[0])
    assert _reason_of(msg.SerializeToString()) == "duplicate"


def test_snapshot_tensor_with_positions_must_be_listed_as_pruned() -> None:
    msg = pb.Envelope.FromString(envelope.encode(m.Envelope(SNAPSHOT)))
    del msg.model.pruned[:]
    assert _reason_of(msg.SerializeToString()) == "bad_field"


def test_short_sha256_in_a_chunk_is_rejected() -> None:
    data = envelope.encode(m.Envelope(m.Chunk(sha256=b"\x01" * 31, index=0, data=b"x")))
    assert _reason_of(data) == "bad_field"


def test_oversized_payload_is_rejected_before_parsing() -> None:
    data = envelope.encode(m.Envelope(UPDATE))
    assert _reason_of(data, max_bytes=len(data) - 1) == "too_large"
    assert envelope.decode(data, max_bytes=len(data)).body is not None


def test_unknown_body_type_is_a_registry_error() -> None:
    with pytest.raises(ValueError, match="unknown body type 'str'; known: "):
        envelope.encode(m.Envelope("hello"))  # type: ignore[arg-type]


def test_huge_repeated_fields_are_refused_before_the_python_work() -> None:
    """Millions of tiny entries in one payload must not buy minutes of decoding."""
    msg = pb.Envelope(schema_version=1)
    msg.event.state = pb.JOB_STATE_EVALUATED
    for i in range(envelope.MAX_ITEMS + 1):
        msg.event.metrics[str(i)] = 0.0
    assert _reason_of(msg.SerializeToString()) == "too_large"


def test_peek_walks_a_bounded_number_of_fields() -> None:
    """peek costs per field: a payload made of tiny fields is refused, not walked for seconds."""
    header = pb.Envelope(schema_version=1, run_id="r").SerializeToString()
    body = pb.Envelope(cancel_command=pb.CancelCommand()).SerializeToString()
    repeated = b"\x18\x01" * (envelope.MAX_PEEK_FIELDS + 1)  # field 3 (round) over and over
    with pytest.raises(EnvelopeDecodeError) as excinfo:
        envelope.peek(header + repeated + body)
    assert excinfo.value.reason == "too_large"
    assert envelope.peek(header + b"\x18\x07" * 100 + body).round == 7


def test_a_snapshot_decoded_with_sparse_weights_reads_as_the_dense_one() -> None:
    """``sparse_weights``: the same arrays on access, the fully kept ones as read-only views,
    the pruned ones built anew each time (nothing dense is kept), shapes without building."""
    payload = envelope.encode(m.Envelope(body=SNAPSHOT, run_id="r"))
    kept = envelope.decode(payload, sparse_weights=True).body
    assert isinstance(kept, m.ModelSnapshot) and isinstance(kept.weights, SparseWeights)
    assert list(kept.weights) == list(WEIGHTS) and len(kept.weights) == len(WEIGHTS)
    for name, array in WEIGHTS.items():
        assert np.array_equal(kept.weights[name], array)
        assert kept.weights.shape(name) == array.shape
    assert kept.weights["fc.weight"] is not kept.weights["fc.weight"]
    assert list(kept.weights.views()) == ["fc.bias"]
    view = kept.weights.views()["fc.bias"]
    assert not view.flags.writeable
    assert kept.digest == codec.model_digest(dict(kept.weights), MASKS)

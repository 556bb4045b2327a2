"""Protobuf conversions of the deployment and inference bodies (``device.wire.deploy_messages``).

``device.wire.envelope`` calls ``put_body`` and ``get_body`` for these kinds (and
``put_deployed`` / ``get_deployed`` for the ``DeviceStatus.deployed`` field), so envelopes stay
the one entry point; this module only keeps their conversions out of that already long file.
Decoding raises ``EnvelopeDecodeError`` (a ``DecodeError``) or ``TensorDecodeError``.
"""

from __future__ import annotations

import numpy as np

from device.errors import EnvelopeDecodeError
from device.wire import deploy_messages as d
from device.wire.codec import SparseTensor, decode_tensor, encode_tensor
from device.wire.pb import sparsefleet_pb2 as pb

__all__ = ["KINDS", "DeployBody", "get_body", "get_deployed", "put_body", "put_deployed"]

DeployBody = (
    d.DeployNotice | d.DeployArtefact | d.DeployEvent | d.InferenceRequest | d.InferenceReply
)

#: Body type -> its oneof name in the Envelope.
KINDS: dict[type, str] = {
    d.DeployNotice: "deploy_notice",
    d.DeployArtefact: "deploy_artefact",
    d.DeployEvent: "deploy_event",
    d.InferenceRequest: "inference_request",
    d.InferenceReply: "inference_reply",
}

#: Most device ids one notice may name (a larger fleet is addressed with ``all_devices``).
MAX_NOTICE_DEVICES = 100_000

_STATES = {
    d.DeployState.DOWNLOADING: pb.DEPLOY_STATE_DOWNLOADING,
    d.DeployState.VERIFIED: pb.DEPLOY_STATE_VERIFIED,
    d.DeployState.ACTIVE: pb.DEPLOY_STATE_ACTIVE,
    d.DeployState.FAILED: pb.DEPLOY_STATE_FAILED,
}


def _sha256(value: bytes, where: str) -> bytes:
    if len(value) != 32:
        raise EnvelopeDecodeError(f"{where}: {len(value)} bytes, not 32", reason="bad_field")
    return bytes(value)


def _dense(array: np.ndarray, where: str) -> SparseTensor:
    values = np.ascontiguousarray(array, dtype=np.float32)
    if values.ndim < 1:
        raise ValueError(f"{where} must have a batch dimension, got shape {values.shape}")
    return SparseTensor.from_dense(values)


def _batch(msg: pb.SparseTensor, where: str) -> np.ndarray:
    tensor = decode_tensor(msg, where=where)
    if tensor.nnz != tensor.numel or not tensor.shape:
        raise EnvelopeDecodeError(
            f"{where}: expected a dense tensor with a batch dimension", reason="bad_field"
        )
    return tensor.to_dense()


def put_deployed(msg: pb.DeployedModel, model: d.DeployedModel) -> None:
    msg.version = model.version
    msg.artefact_sha256 = model.artefact_sha256
    msg.deployment_id = model.deployment_id
    msg.since_unix_s = model.since_unix_s
    msg.inferences = model.inferences
    msg.errors = model.errors
    msg.previous_version = model.previous_version
    msg.last_deployment_id = model.last_deployment_id
    if model.last_state is not None:
        msg.last_state = _STATES[model.last_state]
    msg.last_reason = model.last_reason
    msg.last_event_unix_s = model.last_event_unix_s


def _state(value: int, where: str) -> d.DeployState:
    state = next((s for s, v in _STATES.items() if v == value), None)
    if state is None:
        raise EnvelopeDecodeError(f"{where}: unknown enum value {value}", reason="bad_enum")
    return state


def get_deployed(msg: pb.DeployedModel) -> d.DeployedModel:
    last = msg.last_state
    return d.DeployedModel(
        version=msg.version,
        artefact_sha256=bytes(msg.artefact_sha256),
        deployment_id=msg.deployment_id,
        since_unix_s=msg.since_unix_s,
        inferences=msg.inferences,
        errors=msg.errors,
        previous_version=msg.previous_version,
        last_deployment_id=msg.last_deployment_id,
        last_state=None if last == 0 else _state(last, "status.deployed.last_state"),
        last_reason=msg.last_reason,
        last_event_unix_s=msg.last_event_unix_s,
    )


def put_body(env: pb.Envelope, body: DeployBody) -> None:
    """Fill the envelope's oneof with ``body``."""
    if isinstance(body, d.DeployNotice):
        n = env.deploy_notice
        n.sequence = body.sequence
        n.version = body.version
        n.artefact_sha256 = body.artefact_sha256
        n.artefact_bytes = body.artefact_bytes
        n.devices.extend(body.devices)
        n.all_devices = body.all_devices
        n.created_unix_s = body.created_unix_s
    elif isinstance(body, d.DeployArtefact):
        env.deploy_artefact.data = body.data
    elif isinstance(body, d.DeployEvent):
        e = env.deploy_event
        e.state = _STATES[body.state]
        e.version = body.version
        e.reason = body.reason
        e.timestamp_unix_s = body.timestamp_unix_s
        e.metrics.update(body.metrics)
    elif isinstance(body, d.InferenceRequest):
        env.inference_request.inputs.CopyFrom(
            encode_tensor(_dense(body.inputs, "inference inputs"))
        )
    else:
        r = env.inference_reply
        r.SetInParent()
        if body.logits is not None:
            r.logits.CopyFrom(encode_tensor(_dense(body.logits, "inference logits")))
        r.version = body.version
        r.error = body.error


def get_body(env: pb.Envelope, kind: str) -> DeployBody:
    """The body of oneof ``kind`` (one of ``KINDS``' values)."""
    if kind == "deploy_notice":
        n = env.deploy_notice
        if len(n.devices) > MAX_NOTICE_DEVICES:
            raise EnvelopeDecodeError(
                f"deploy_notice.devices: {len(n.devices)} entries (at most {MAX_NOTICE_DEVICES})",
                reason="too_large",
            )
        return d.DeployNotice(
            sequence=n.sequence,
            version=n.version,
            artefact_sha256=_sha256(n.artefact_sha256, "deploy_notice.artefact_sha256"),
            artefact_bytes=n.artefact_bytes,
            devices=tuple(n.devices),
            all_devices=n.all_devices,
            created_unix_s=n.created_unix_s,
        )
    if kind == "deploy_artefact":
        return d.DeployArtefact(data=bytes(env.deploy_artefact.data))
    if kind == "deploy_event":
        e = env.deploy_event
        state = _state(e.state, "deploy_event.state")
        if len(e.metrics) > 10_000:
            raise EnvelopeDecodeError("deploy_event.metrics: too many entries", reason="too_large")
        return d.DeployEvent(
            state=state,
            version=e.version,
            reason=e.reason,
            timestamp_unix_s=e.timestamp_unix_s,
            metrics=dict(e.metrics),
        )
    if kind == "inference_request":
        request = env.inference_request
        if not request.HasField("inputs"):
            raise EnvelopeDecodeError("inference_request has no inputs", reason="bad_field")
        return d.InferenceRequest(inputs=_batch(request.inputs, "inference_request.inputs"))
    if kind == "inference_reply":
        r = env.inference_reply
        logits = _batch(r.logits, "inference_reply.logits") if r.HasField("logits") else None
        return d.InferenceReply(logits=logits, version=r.version, error=r.error)
    raise EnvelopeDecodeError(f"unknown message kind {kind!r}", reason="bad_kind")

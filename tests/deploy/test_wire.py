"""Deployment bodies on the wire: the deployed model in a status round-trips, and malformed
deployment messages are refused as decode errors, never crashes."""

from __future__ import annotations

import numpy as np
import pytest

from device.errors import DecodeError
from device.wire import envelope
from device.wire import messages as m
from device.wire.pb import sparsefleet_pb2 as pb


def test_a_status_carries_the_deployed_model_and_the_last_deployment() -> None:
    deployed = m.DeployedModel(
        version="lab-r3-int8",
        artefact_sha256=b"\x01" * 32,
        deployment_id="d1",
        since_unix_s=12.5,
        inferences=40,
        errors=2,
        previous_version="lab-r2-int8",
        last_deployment_id="d2",
        last_state=m.DeployState.FAILED,
        last_reason="unknown architecture",
        last_event_unix_s=13.0,
    )
    status = m.DeviceStatus(online=True, session_epoch=3, agent_version="0.1.0", deployed=deployed)
    back = envelope.decode(envelope.encode(m.Envelope(body=status))).body
    assert isinstance(back, m.DeviceStatus)
    assert back.deployed == deployed and back.model_version == "lab-r3-int8"
    plain = m.DeviceStatus(online=True, session_epoch=3, agent_version="0.1.0")
    decoded = envelope.decode(envelope.encode(m.Envelope(body=plain))).body
    assert isinstance(decoded, m.DeviceStatus) and decoded.deployed is None
    assert decoded.model_version == ""


def test_an_unknown_deploy_state_is_a_decode_error() -> None:
    env = pb.Envelope(schema_version=m.SCHEMA_VERSION)
    env.deploy_event.state = 42
    with pytest.raises(DecodeError, match="unknown enum value"):
        envelope.decode(env.SerializeToString())


def test_a_notice_with_a_short_digest_is_a_decode_error() -> None:
    env = pb.Envelope(schema_version=m.SCHEMA_VERSION)
    env.deploy_notice.artefact_sha256 = b"\x00" * 5
    with pytest.raises(DecodeError, match="not 32"):
        envelope.decode(env.SerializeToString())


def test_inference_inputs_must_be_a_dense_batch() -> None:
    request = m.InferenceRequest(inputs=np.ones((2, 3), dtype=np.float32))
    back = envelope.decode(envelope.encode(m.Envelope(body=request))).body
    assert isinstance(back, m.InferenceRequest) and back.inputs.shape == (2, 3)
    env = pb.Envelope(schema_version=m.SCHEMA_VERSION)
    env.inference_request.SetInParent()
    with pytest.raises(DecodeError, match="no inputs"):
        envelope.decode(env.SerializeToString())

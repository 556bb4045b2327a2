"""The model reference, architecture digest and offers on the wire (device.wire.model_pb).

A snapshot must carry what a device needs to build a user's model (the reference, kwargs
included) and the digest it is checked against; a status carries the models a device offers.
Messages of an older sender (no reference, no offers) must still decode, and malformed fields
must be a ``DecodeError``, never a crash of the receiver.
"""

from __future__ import annotations

import numpy as np
import pytest

from device.errors import EnvelopeDecodeError
from device.model_ref import ModelOffer, ModelRef
from device.wire import envelope
from device.wire.messages import DeviceStatus, Envelope, ModelSnapshot
from device.wire.pb import sparsefleet_pb2 as pb

REF = ModelRef(
    factory="my_pkg.models:build",
    kwargs={"width": 32, "drop": 0.25, "names": ["a", "b"]},
    input_shape=(1, 28, 28),
    num_classes=10,
)


def _snapshot(**fields: object) -> ModelSnapshot:
    values: dict[str, object] = {
        "model_name": REF.text,
        "version": 3,
        "digest": b"\1" * 32,
        "mask_version": 2,
        "weights": {"w": np.arange(4, dtype=np.float32)},
        "masks": {},
        "model_ref": REF,
        "architecture_digest": b"\2" * 32,
    }
    values.update(fields)
    return ModelSnapshot(**values)  # type: ignore[arg-type]


def test_a_snapshot_carries_its_model_reference_and_architecture_digest() -> None:
    decoded = envelope.decode(envelope.encode(Envelope(_snapshot(), run_id="r"))).body
    assert isinstance(decoded, ModelSnapshot)
    assert decoded.model_ref == REF
    assert decoded.model_ref.kwargs == {"width": 32, "drop": 0.25, "names": ["a", "b"]}
    assert decoded.architecture_digest == b"\2" * 32


def test_a_snapshot_of_an_older_fleet_manager_decodes_without_them() -> None:
    decoded = envelope.decode(
        envelope.encode(
            Envelope(_snapshot(model_name="mlp", model_ref=None, architecture_digest=b""))
        )
    ).body
    assert isinstance(decoded, ModelSnapshot)
    assert (decoded.model_name, decoded.model_ref, decoded.architecture_digest) == (
        "mlp",
        None,
        b"",
    )


def test_a_snapshot_carries_the_runs_classes_in_order() -> None:
    classes = ("zebra", "ant", "moth")  # not sorted: the order is the logits'
    decoded = envelope.decode(envelope.encode(Envelope(_snapshot(classes=classes)))).body
    assert isinstance(decoded, ModelSnapshot) and decoded.classes == classes
    plain = envelope.decode(envelope.encode(Envelope(_snapshot()))).body
    assert isinstance(plain, ModelSnapshot) and plain.classes == ()


def _tampered(edit: str) -> bytes:
    env = pb.Envelope()
    env.ParseFromString(envelope.encode(Envelope(_snapshot(), run_id="r")))
    if edit == "name":
        env.model.model_name = "mlp"
    elif edit == "digest":
        env.model.architecture_digest = b"\2" * 31
    elif edit == "kwargs":
        env.model.model_ref.kwargs_json = "[1, 2]"
    elif edit == "empty_ref":
        env.model.model_ref.factory = ""
    elif edit == "twice":
        env.model.classes.extend(["cat", "dog", "cat"])
    elif edit == "blank":
        env.model.classes.extend(["cat", ""])
    return env.SerializeToString()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("name", "is not its model_ref"),
        ("digest", "31 bytes, not 32"),
        ("kwargs", "not a JSON object"),
        ("empty_ref", "exactly one of name"),
        ("twice", "classes must be distinct, non-empty names"),
        ("blank", "classes must be distinct, non-empty names"),
    ],
)
def test_inconsistent_model_fields_are_decode_errors(edit: str, message: str) -> None:
    with pytest.raises(EnvelopeDecodeError, match=message):
        envelope.decode(_tampered(edit))


def test_a_status_carries_the_models_a_device_offers() -> None:
    offers = (
        ModelOffer(ModelRef(name="mlp"), b"\3" * 32),
        ModelOffer(REF, b""),
    )
    status = DeviceStatus(online=True, session_epoch=1, agent_version="1", models=offers)
    decoded = envelope.decode(envelope.encode(Envelope(status, device_id="d"))).body
    assert isinstance(decoded, DeviceStatus)
    assert decoded.models == offers
    plain = DeviceStatus(online=True, session_epoch=1, agent_version="1")
    assert envelope.decode(envelope.encode(Envelope(plain, device_id="d"))).body.models == ()

"""Protobuf conversions of model references and offers (``device.model_ref``).

``device.wire.envelope`` calls these for ``ModelSnapshot.model_ref`` /
``architecture_digest`` and ``DeviceStatus.models``, so envelopes stay the one entry point;
this module only keeps the conversions out of that already long file. Decoding raises
``EnvelopeDecodeError`` (a ``DecodeError``) naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from device.errors import EnvelopeDecodeError
from device.model_ref import ARCHITECTURE_DIGEST_BYTES, ModelOffer, ModelRef, canonical_json
from device.wire.pb import sparsefleet_pb2 as pb

__all__ = ["MAX_OFFERS", "get_digest", "get_offers", "get_ref", "put_offers", "put_ref"]

#: Most models one status message may offer.
MAX_OFFERS = 1_000
#: Most bytes of one reference's kwargs JSON (the kwargs are settings, not data).
MAX_KWARGS_BYTES = 64 * 1024


def put_ref(msg: pb.ModelRef, ref: ModelRef) -> None:
    msg.name = ref.name
    msg.factory = ref.factory
    msg.kwargs_json = canonical_json(ref.kwargs) if ref.kwargs else ""
    if ref.input_shape is not None:
        msg.input_shape.extend(ref.input_shape)
    msg.num_classes = ref.num_classes or 0


def get_ref(msg: pb.ModelRef, where: str) -> ModelRef:
    if len(msg.kwargs_json) > MAX_KWARGS_BYTES:
        raise EnvelopeDecodeError(
            f"{where}.kwargs_json: {len(msg.kwargs_json)} bytes (at most {MAX_KWARGS_BYTES})",
            reason="too_large",
        )
    try:
        kwargs = json.loads(msg.kwargs_json) if msg.kwargs_json else {}
        if not isinstance(kwargs, dict):
            raise ValueError("kwargs_json is not a JSON object")
        return ModelRef(
            name=msg.name,
            factory=msg.factory,
            kwargs=kwargs,
            input_shape=tuple(msg.input_shape) if len(msg.input_shape) else None,
            num_classes=msg.num_classes or None,
        )
    except (ValueError, RecursionError) as exc:
        raise EnvelopeDecodeError(f"{where}: {exc}", reason="bad_field") from None


def get_digest(value: bytes, where: str) -> bytes:
    """An architecture digest: 32 bytes, or empty (not given)."""
    if value and len(value) != ARCHITECTURE_DIGEST_BYTES:
        raise EnvelopeDecodeError(
            f"{where}: {len(value)} bytes, not {ARCHITECTURE_DIGEST_BYTES}", reason="bad_field"
        )
    return bytes(value)


def put_offers(msgs: pb.DeviceStatus, offers: Iterable[ModelOffer]) -> None:
    for offer in offers:
        item = msgs.models.add()
        put_ref(item.model, offer.model)
        item.architecture_digest = offer.architecture_digest


def get_offers(status: pb.DeviceStatus) -> tuple[ModelOffer, ...]:
    if len(status.models) > MAX_OFFERS:
        raise EnvelopeDecodeError(
            f"status.models: {len(status.models)} entries (at most {MAX_OFFERS})",
            reason="too_large",
        )
    return tuple(
        ModelOffer(
            get_ref(item.model, f"status.models[{i}].model"),
            get_digest(item.architecture_digest, f"status.models[{i}].architecture_digest"),
        )
        for i, item in enumerate(status.models)
    )

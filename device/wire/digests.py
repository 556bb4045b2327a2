"""Digests that name masks and models on the wire: SHA-256 over a canonical byte form.

A mask digest (16 bytes) names a mask both sides hold (``MaskRef``); a model digest (32 bytes)
names a whole model (weights and masks) in every ``ModelSnapshot``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["MASK_DIGEST_BYTES", "mask_digest", "model_digest"]

BoolArray = npt.NDArray[np.bool_]

#: Length of a mask digest in bytes.
MASK_DIGEST_BYTES = 16

_MASK_DOMAIN = b"sparsefleet.mask.v1\x00"
_MODEL_DOMAIN = b"sparsefleet.model.v1\x00"


def _shape_header(shape: tuple[int, ...]) -> bytes:
    """uint32 ndim then ndim uint64 dimensions, little-endian."""
    return struct.pack(f"<I{len(shape)}Q", len(shape), *shape)


def mask_digest(mask: npt.NDArray[np.bool_]) -> bytes:
    """16-byte digest of a mask: SHA-256 truncated to 16 bytes.

    Hashed bytes: ``b"sparsefleet.mask.v1\\0"``, the shape header (uint32 ndim, then each
    dimension as uint64, little-endian), then ``np.packbits(mask.ravel(), bitorder="little")``
    (row-major, bit i of the mask is bit i % 8 of byte i // 8).
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise ValueError("mask_digest needs a numpy bool array")
    h = hashlib.sha256(_MASK_DOMAIN)
    h.update(_shape_header(mask.shape))
    h.update(np.packbits(mask.reshape(-1), bitorder="little").tobytes())
    return h.digest()[:MASK_DIGEST_BYTES]


def model_digest(
    weights: Mapping[str, npt.NDArray[np.floating]], masks: Mapping[str, BoolArray]
) -> bytes:
    """32-byte SHA-256 of a model in canonical form.

    Hashed bytes: ``b"sparsefleet.model.v1\\0"``, uint32 tensor count, then for each name in
    sorted order (code points, equal to UTF-8 byte order): uint32 length and UTF-8 bytes of the
    name, the shape header (as in ``mask_digest``), the weights as float32 little-endian in
    row-major order, then ``b"\\x01"`` plus the packed mask bits when the tensor has a mask,
    else ``b"\\x00"``. Every mask must name a weight of the same shape (``ValueError``).
    """
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise ValueError(f"masks without weights: {unknown}")
    h = hashlib.sha256(_MODEL_DOMAIN)
    h.update(struct.pack("<I", len(weights)))
    for name in sorted(weights):
        w = np.ascontiguousarray(weights[name], dtype="<f4")
        encoded = name.encode("utf-8")
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
        h.update(_shape_header(w.shape))
        h.update(w.tobytes())
        if name in masks:
            m = masks[name]
            if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != w.shape:
                raise ValueError(f"mask of {name!r} must be bool of shape {w.shape}")
            h.update(b"\x01")
            h.update(np.packbits(m.reshape(-1), bitorder="little").tobytes())
        else:
            h.update(b"\x00")
    return h.digest()

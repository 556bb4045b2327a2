"""Sparse tensor codec: ``SparseTensor`` <-> protobuf ``sparsefleet.v1.SparseTensor``.

A tensor travels as its shape, its values at the mask's positions (raw little-endian bytes in
one of five value dtypes) and its positions in the smallest of four modes:

- ``IMPLIED``: the receiver already holds the mask (named by version and 16-byte digest); no
  index bytes at all. This is the normal round.
- ``DIFF``: the coordinates where the mask differs from a known mask (a mask diff).
- ``ABSOLUTE``: the mask's coordinates.
- ``DENSE``: every coordinate (mask all true); no index bytes.

A set of coordinates (``PositionSet``) is a bitmap or Rice-coded gaps, whichever is smaller; the
Rice parameter is chosen from the set's density so that the size comes within a few percent of
the entropy bound ``N * H(count / N)`` bits. Every step is vectorised numpy: no per-element
Python loops, in encoding or in decoding.

``decode_tensor`` trusts nothing: it raises only ``TensorDecodeError`` (with a ``reason`` code)
and bounds every allocation by the payload size before allocating. The exact byte layouts are
documented in ``docs/wire-format.md``.

This module is the tensor and its protobuf form; the parts it composes are pure and live beside
it: ``device.wire.positions`` (coordinate sets and their entropy bound), ``device.wire.precision``
(the value dtypes) and ``device.wire.digests`` (mask and model digests). Their public names are
importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from device.errors import TensorDecodeError
from device.wire.digests import MASK_DIGEST_BYTES, mask_digest, model_digest
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.positions import (
    MAX_RICE_K,
    binary_entropy,
    code_set,
    decode_bitmap,
    decode_rice,
    max_rice_parameter,
    position_bound_bits,
    rice_bytes,
    rice_parameter,
)
from device.wire.precision import (
    QMAX,
    Rounding,
    ValueDType,
    bf16_bits,
    bf16_values,
    decode_values,
    dtype_key,
    encode_values,
    fp16_bits,
    fp16_values,
    quantise,
    value_bits,
    value_bytes,
)

__all__ = [
    "ELEMENTS_PER_PAYLOAD_BYTE",
    "FREE_ELEMENTS",
    "MASK_DIGEST_BYTES",
    "MAX_ELEMENTS",
    "MAX_NDIM",
    "MAX_RICE_K",
    "Chunk",
    "EncodedTensor",
    "KnownMask",
    "Rounding",
    "SparseTensor",
    "ValueDType",
    "bf16_bits",
    "bf16_values",
    "binary_entropy",
    "decode_positions",
    "decode_tensor",
    "dtype_of",
    "encode_positions",
    "encode_tensor",
    "encode_tensor_parts",
    "fp16_bits",
    "fp16_values",
    "length_delimited",
    "mask_digest",
    "max_rice_parameter",
    "model_digest",
    "position_bound_bits",
    "quantise",
    "rice_bytes",
    "rice_parameter",
    "tensor_bound_bits",
    "value_bits",
    "varint",
]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]


#: Largest element count of any tensor the decoder accepts (2**31, i.e. a 2 GiB boolean mask).
MAX_ELEMENTS = 2**31
#: Most dimensions a shape may have.
MAX_NDIM = 32
#: A tensor of up to this many elements may be decoded from any payload, however small.
FREE_ELEMENTS = 2**24
#: Above FREE_ELEMENTS, a tensor whose mask is built from coded positions (ABSOLUTE) may have at
#: most this many elements per payload byte: a 100-byte message never allocates more than
#: max(FREE_ELEMENTS, 100 * 1024) mask bytes. Honest encodings need fewer than 1024 elements per
#: byte down to densities of about 5e-4 (N * H(d) / 8 + nnz bytes >= N / 1024).
ELEMENTS_PER_PAYLOAD_BYTE = 1024


# ---------------------------------------------------------------------------------------------
# The tensor and the known masks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A tensor given by its shape, a boolean mask and the values at the mask's positions.

    Invariants (checked on construction, ``ValueError`` otherwise): ``shape`` is a tuple of
    non-negative ints; ``mask`` is a bool ndarray of that shape; ``values`` is a 1-D float32
    ndarray with ``values.size == count_nonzero(mask)``, in increasing flat (row-major)
    coordinate order. Arrays are not copied and must not be mutated afterwards; decoded tensors
    may hold read-only arrays (a mask shared with the mask book, values viewing the payload).
    """

    shape: tuple[int, ...]
    mask: BoolArray
    values: FloatArray

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"SparseTensor shape {shape} has a negative dimension")
        mask, values = self.mask, self.values
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise ValueError("SparseTensor mask must be a numpy bool array")
        if mask.shape != shape:
            raise ValueError(f"SparseTensor mask shape {mask.shape} != shape {shape}")
        if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
            raise ValueError("SparseTensor values must be a 1-D numpy float32 array")
        nnz = int(np.count_nonzero(mask))
        if values.size != nnz:
            raise ValueError(f"SparseTensor has {values.size} values for a mask of {nnz} positions")
        object.__setattr__(self, "shape", shape)

    @classmethod
    def _checked(cls, shape: tuple[int, ...], mask: BoolArray, values: FloatArray) -> SparseTensor:
        """Construct without re-validating: for the decoder, which has checked the invariants
        already (recounting a large mask costs as much as the rest of an IMPLIED decode)."""
        tensor = object.__new__(cls)
        object.__setattr__(tensor, "shape", shape)
        object.__setattr__(tensor, "mask", mask)
        object.__setattr__(tensor, "values", values)
        return tensor

    @classmethod
    def from_dense(cls, array: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> SparseTensor:
        """The values of ``array`` (cast to float32) at ``mask`` (None: every position)."""
        dense = np.asarray(array, dtype=np.float32)
        if mask is None:
            keep = np.ones(dense.shape, dtype=np.bool_)
            values = dense.reshape(-1).copy()
        else:
            keep = np.asarray(mask)
            if keep.dtype != np.bool_ or keep.shape != dense.shape:
                raise ValueError(
                    f"mask must be bool of shape {dense.shape}, got {keep.dtype} {keep.shape}"
                )
            values = dense.reshape(-1)[keep.reshape(-1)]
        return cls(tuple(dense.shape), keep, values)

    def to_dense(self) -> FloatArray:
        """A new float32 array of ``shape``: the values at the mask, zero elsewhere."""
        if self.values.size == self.mask.size:
            return self.values.reshape(self.shape).copy()
        out = np.zeros(self.shape, dtype=np.float32)
        out.reshape(-1)[self.mask.reshape(-1)] = self.values
        return out

    @property
    def numel(self) -> int:
        """Number of elements N of the dense tensor (1 for a 0-d tensor)."""
        return int(self.mask.size)

    @property
    def nnz(self) -> int:
        """Number of mask positions (= number of values)."""
        return int(self.values.size)

    @property
    def density(self) -> float:
        """Kept fraction nnz / N in [0, 1]; 1.0 for an empty tensor (its mask is all true)."""
        return self.nnz / self.numel if self.numel else 1.0

    def equal(self, other: SparseTensor) -> bool:
        """Same shape, mask and values (bitwise equal floats; NaN equals NaN)."""
        return (
            self.shape == other.shape
            and np.array_equal(self.mask, other.mask)
            and np.array_equal(self.values, other.values, equal_nan=True)
        )


@dataclass(frozen=True, eq=False)
class KnownMask:
    """A mask both sides hold, named by ``version`` (the model version that introduced it).

    A mask book is a ``Mapping[str, KnownMask]`` keyed by state_dict name. The mask is stored as
    a read-only view; the digest and count are computed once.
    """

    version: int
    mask: BoolArray

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"KnownMask version must be >= 0, got {self.version}")
        if not isinstance(self.mask, np.ndarray) or self.mask.dtype != np.bool_:
            raise ValueError("KnownMask mask must be a numpy bool array")
        view = self.mask.view()
        view.flags.writeable = False
        object.__setattr__(self, "mask", view)

    @cached_property
    def digest(self) -> bytes:
        """``mask_digest(mask)``: 16 bytes."""
        return mask_digest(self.mask)

    @cached_property
    def count(self) -> int:
        """Number of true positions."""
        return int(np.count_nonzero(self.mask))


# ---------------------------------------------------------------------------------------------
# Value dtypes and position sets in protobuf
# ---------------------------------------------------------------------------------------------

_DTYPE_TO_PB = {
    "fp32": pb.VALUE_DTYPE_FP32,
    "fp16": pb.VALUE_DTYPE_FP16,
    "bf16": pb.VALUE_DTYPE_BF16,
    "int8": pb.VALUE_DTYPE_INT8,
    "int4": pb.VALUE_DTYPE_INT4,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}


def dtype_of(msg: pb.SparseTensor) -> str:
    """The value dtype name ("fp32", ...) of an encoded tensor; ``TensorDecodeError`` if unknown."""
    key = _PB_TO_DTYPE.get(msg.dtype)
    if key is None:
        raise TensorDecodeError(f"unknown value dtype {msg.dtype}", reason="bad_dtype")
    return key


_CODING_TO_PB = {"bitmap": pb.SET_CODING_BITMAP, "rice": pb.SET_CODING_RICE_GAPS}


def encode_positions(members: BoolArray, out: pb.PositionSet | None = None) -> pb.PositionSet:
    """Code the true coordinates of a bool array (any shape, taken row-major).

    Bitmap or Rice-coded gaps, whichever is fewer bytes (ties: bitmap). The Rice parameter is
    the best of ``rice_parameter(count, n)`` and its two neighbours for the actual gaps
    (k = 0 included: a bitmap cut after its last non-zero byte). ``out``, an empty message,
    is filled in place of a new one.
    """
    coded = code_set(members)
    if out is None:
        out = pb.PositionSet()
    out.count = coded.count
    out.coding = _CODING_TO_PB[coded.coding]
    out.rice_k = coded.rice_k
    out.data = coded.data
    return out


def decode_positions(ps: pb.PositionSet, n: int, *, where: str = "positions") -> BoolArray:
    """Decode a position set over ``n`` coordinates to a new flat bool array of length ``n``.

    The caller must have bounded ``n`` (see ``decode_tensor``); everything else is checked here
    and reported as ``TensorDecodeError``: unknown coding, wrong lengths, trailing bytes,
    non-zero padding bits, count mismatches, coordinates out of range (the gap code makes them
    strictly increasing by construction).
    """
    if ps.count > n:
        raise TensorDecodeError(f"{where}: count {ps.count} > {n} coordinates", reason="bad_count")
    if ps.coding == pb.SET_CODING_BITMAP:
        return decode_bitmap(ps.data, int(ps.rice_k), int(ps.count), n, where)
    if ps.coding == pb.SET_CODING_RICE_GAPS:
        return decode_rice(ps.data, int(ps.rice_k), int(ps.count), n, where)
    raise TensorDecodeError(f"{where}: unknown set coding {ps.coding}", reason="bad_coding")


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


Chunk = bytes | memoryview


def length_delimited(field: int, chunks: list[Chunk]) -> list[Chunk]:
    """A length-delimited protobuf field (wire type 2) whose content is ``chunks`` joined.

    Building messages as lists of chunks and joining once at the end avoids protobuf's own
    serialisation of large byte fields, which copies them several times (measured at about
    25 ms for 26 MB here, against 2 ms for one copy).
    """
    size = sum(len(c) for c in chunks)
    return [varint(field << 3 | 2) + varint(size), *chunks]


def _field_bytes(msg: pb.MaskRef | pb.PositionSet) -> int:
    """Bytes a sub-message costs as a field: tag, length and content."""
    size = msg.ByteSize()
    return 1 + len(varint(size)) + size


@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """An encoded tensor in two parts: ``header``, the SparseTensor message with every field
    but ``values``, and ``values``, the raw value bytes (possibly a view of the tensor's
    array, so use it before the tensor changes)."""

    header: pb.SparseTensor
    values: memoryview

    def chunks(self) -> list[Chunk]:
        """The serialised SparseTensor as chunks to join: the header's fields, then field 3
        (``values``). Protobuf parsers accept fields in any order."""
        return [self.header.SerializeToString(), *length_delimited(3, [self.values])]

    def message(self) -> pb.SparseTensor:
        """The whole SparseTensor message."""
        msg = pb.SparseTensor()
        msg.CopyFrom(self.header)
        msg.values = self.values.tobytes()
        return msg


def encode_tensor_parts(
    t: SparseTensor,
    dtype: ValueDType | str = "fp32",
    *,
    base: KnownMask | None = None,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> EncodedTensor:
    """``encode_tensor`` without joining the value bytes into the message (see EncodedTensor)."""
    key = dtype_key(dtype)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; known: nearest, stochastic")
    if base is not None and base.mask.shape != t.shape:
        raise ValueError(f"base mask shape {base.mask.shape} != tensor shape {t.shape}")
    data, scale = encode_values(t.values, key, rounding, rng)
    out = pb.SparseTensor(dtype=_DTYPE_TO_PB[key], nnz=t.nnz, scale=scale)
    out.shape.extend(t.shape)
    flat = t.mask.reshape(-1)
    if t.nnz == flat.size:
        out.mode = pb.POSITION_MODE_DENSE
    elif base is None:
        out.mode = pb.POSITION_MODE_ABSOLUTE
        encode_positions(flat, out=out.positions)
    elif not (flips := np.not_equal(flat, base.mask.reshape(-1))).any():
        ref = pb.MaskRef(version=base.version, digest=base.digest)
        absolute = None
        # The reference costs about 22 bytes; a tiny or nearly empty mask may cost less sent
        # outright (a set needs at least ceil(count / 8) bytes, plus a few for its fields).
        if (t.nnz + 7) // 8 + 4 < _field_bytes(ref):
            absolute = encode_positions(flat)
        if absolute is not None and _field_bytes(absolute) < _field_bytes(ref):
            out.mode = pb.POSITION_MODE_ABSOLUTE
            out.positions.CopyFrom(absolute)
        else:
            out.mode = pb.POSITION_MODE_IMPLIED
            out.mask_ref.CopyFrom(ref)
    else:
        ref = pb.MaskRef(version=base.version, digest=base.digest)
        diff = encode_positions(flips)
        absolute = encode_positions(flat)
        if _field_bytes(diff) + _field_bytes(ref) < _field_bytes(absolute):
            out.mode = pb.POSITION_MODE_DIFF
            out.mask_ref.CopyFrom(ref)
            out.positions.CopyFrom(diff)
        else:
            out.mode = pb.POSITION_MODE_ABSOLUTE
            out.positions.CopyFrom(absolute)
    return EncodedTensor(out, data)


def encode_tensor(
    t: SparseTensor,
    dtype: ValueDType | str = "fp32",
    *,
    base: KnownMask | None = None,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> pb.SparseTensor:
    """Encode ``t`` with its positions in the smallest mode.

    DENSE when the mask is all true; else, with a ``base`` mask (which must have ``t``'s shape),
    IMPLIED when the masks are equal (unless ABSOLUTE is smaller still, as for a tiny or
    nearly empty mask), otherwise the smaller of DIFF (``mask XOR base``) and ABSOLUTE;
    without a base, ABSOLUTE. ``rounding`` and ``rng`` apply to int8/int4 only
    (``ValueError`` for non-finite values there, or an unknown dtype or rounding).
    """
    return encode_tensor_parts(t, dtype, base=base, rounding=rounding, rng=rng).message()


def _element_count(msg: pb.SparseTensor, where: str) -> tuple[tuple[int, ...], int]:
    """The shape and its element count, rejecting more than MAX_NDIM dimensions and more than
    MAX_ELEMENTS elements in the tensor or along any dimension."""
    if len(msg.shape) > MAX_NDIM:
        raise TensorDecodeError(
            f"{where}: {len(msg.shape)} dimensions (at most {MAX_NDIM})", reason="bad_shape"
        )
    shape = tuple(int(d) for d in msg.shape)
    # Each dimension on its own too: (0, 2**63) has no elements but numpy cannot allocate it.
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise TensorDecodeError(
            f"{where}: shape {shape} has more than {MAX_ELEMENTS} elements", reason="too_large"
        )
    return shape, math.prod(shape)


def _check_ref(
    msg: pb.SparseTensor, entry: KnownMask | None, shape: tuple[int, ...], where: str
) -> KnownMask:
    if entry is None:
        raise TensorDecodeError(
            f"{where}: positions refer to mask version {msg.mask_ref.version}, which is not known",
            reason="unknown_mask",
        )
    if not msg.HasField("mask_ref"):
        raise TensorDecodeError(f"{where}: no mask_ref", reason="unknown_mask")
    if msg.mask_ref.version != entry.version:
        raise TensorDecodeError(
            f"{where}: mask version {msg.mask_ref.version} != known version {entry.version}",
            reason="mask_mismatch",
        )
    if msg.mask_ref.digest != entry.digest:
        raise TensorDecodeError(f"{where}: mask digest does not match", reason="mask_mismatch")
    if entry.mask.shape != shape:
        raise TensorDecodeError(
            f"{where}: shape {shape} != known mask shape {entry.mask.shape}", reason="mask_mismatch"
        )
    return entry


def decode_tensor(
    msg: pb.SparseTensor, *, book_entry: KnownMask | None = None, where: str = "tensor"
) -> SparseTensor:
    """Decode and validate; raise only ``TensorDecodeError`` (``where`` prefixes its message).

    ``book_entry`` is the receiver's mask for this tensor, needed for IMPLIED and DIFF positions.
    Checked: dimensions and element count (MAX_NDIM, MAX_ELEMENTS, and for ABSOLUTE positions
    at most ``max(FREE_ELEMENTS, ELEMENTS_PER_PAYLOAD_BYTE * payload bytes)`` elements), dtype,
    mode and coding known, value byte length, nnz equal to the values and the mask count, scale
    finite and >= 0 for int dtypes and 0 for float dtypes, int codes in range, mask reference
    (version, digest, shape), position set (see ``decode_positions``), fields that the mode
    does not use absent. NaN and inf values pass: finiteness is the fleet manager's check.
    """
    shape, n = _element_count(msg, where)
    key = dtype_of(msg)
    nnz = int(msg.nnz)
    if nnz > n:
        raise TensorDecodeError(f"{where}: nnz {nnz} > {n} elements", reason="bad_count")
    values_data = msg.values  # each access copies the bytes out of the message
    if len(values_data) != value_bytes(key, nnz):
        raise TensorDecodeError(
            f"{where}: {len(values_data)} value bytes for {nnz} {key} values "
            f"(need {value_bytes(key, nnz)})",
            reason="bad_length",
        )
    scale = float(msg.scale)
    if key in QMAX:
        if not (math.isfinite(scale) and scale >= 0.0):
            raise TensorDecodeError(
                f"{where}: scale {scale} must be finite and >= 0", reason="bad_scale"
            )
    elif scale != 0.0:
        raise TensorDecodeError(f"{where}: scale {scale} set for {key}", reason="bad_scale")
    mode = msg.mode
    has_ref, has_pos = msg.HasField("mask_ref"), msg.HasField("positions")
    if mode == pb.POSITION_MODE_DENSE:
        if has_ref or has_pos:
            raise TensorDecodeError(
                f"{where}: DENSE with positions or mask_ref", reason="bad_positions"
            )
        if nnz != n:
            raise TensorDecodeError(f"{where}: DENSE with nnz {nnz} != {n}", reason="bad_count")
        mask = np.ones(shape, dtype=np.bool_)  # n == nnz, bounded by the value bytes
    elif mode == pb.POSITION_MODE_IMPLIED:
        if has_pos:
            raise TensorDecodeError(f"{where}: IMPLIED with positions", reason="bad_positions")
        entry = _check_ref(msg, book_entry, shape, where)
        if entry.count != nnz:
            raise TensorDecodeError(
                f"{where}: nnz {nnz} != {entry.count} positions of the known mask",
                reason="bad_count",
            )
        mask = entry.mask
    elif mode == pb.POSITION_MODE_DIFF:
        entry = _check_ref(msg, book_entry, shape, where)
        if not has_pos:
            raise TensorDecodeError(f"{where}: DIFF without positions", reason="bad_positions")
        flips = decode_positions(msg.positions, n, where=f"{where} diff")
        flat = np.not_equal(entry.mask.reshape(-1), flips)
        mask = flat.reshape(shape)
    elif mode == pb.POSITION_MODE_ABSOLUTE:
        if has_ref:
            raise TensorDecodeError(f"{where}: ABSOLUTE with mask_ref", reason="bad_positions")
        if not has_pos:
            raise TensorDecodeError(f"{where}: ABSOLUTE without positions", reason="bad_positions")
        payload = len(values_data) + len(msg.positions.data)
        if n > max(FREE_ELEMENTS, ELEMENTS_PER_PAYLOAD_BYTE * payload):
            raise TensorDecodeError(
                f"{where}: {n} elements is absurd for a {payload}-byte payload", reason="too_large"
            )
        mask = decode_positions(msg.positions, n, where=f"{where} positions").reshape(shape)
    else:
        raise TensorDecodeError(f"{where}: unknown position mode {mode}", reason="bad_mode")
    if mode == pb.POSITION_MODE_DIFF or (
        mode == pb.POSITION_MODE_ABSOLUTE and msg.positions.count != nnz
    ):
        # (decode_positions checked that an ABSOLUTE set holds exactly `count` coordinates.)
        count = int(np.count_nonzero(mask))
        if count != nnz:
            raise TensorDecodeError(
                f"{where}: nnz {nnz} != {count} mask positions", reason="bad_count"
            )
    values = decode_values(values_data, key, nnz, scale, where)
    return SparseTensor._checked(shape, mask, values)


def tensor_bound_bits(t: SparseTensor, dtype: ValueDType | str, *, positions: bool) -> float:
    """The physical limit for ``t`` in bits: ``nnz * value_bits`` plus, when positions travel,
    ``N * H(nnz / N)``."""
    bits = t.nnz * value_bits(dtype)
    return bits + (position_bound_bits(t.numel, t.nnz) if positions else 0.0)

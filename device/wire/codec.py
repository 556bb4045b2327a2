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
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from device.errors import TensorDecodeError
from device.wire.pb import sparsefleet_pb2 as pb

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
Rounding = Literal["nearest", "stochastic"]


class ValueDType(enum.StrEnum):
    """How tensor values travel. ``int8``/``int4`` are symmetric per-tensor quantisation.

    Defined here, with the codec that implements each, and re-exported by ``messages``; a str
    of the same value is accepted wherever a ValueDType is.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"


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
#: Largest Rice parameter, in bits.
MAX_RICE_K = 40
#: Length of a mask digest in bytes.
MASK_DIGEST_BYTES = 16

_MASK_DOMAIN = b"sparsefleet.mask.v1\x00"
_MODEL_DOMAIN = b"sparsefleet.model.v1\x00"
_GOLDEN_LOG = math.log((math.sqrt(5.0) - 1.0) / 2.0)  # log(phi - 1), Gallager & van Voorhis


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


# ---------------------------------------------------------------------------------------------
# Value dtypes
# ---------------------------------------------------------------------------------------------

_VALUE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
_DTYPE_TO_PB = {
    "fp32": pb.VALUE_DTYPE_FP32,
    "fp16": pb.VALUE_DTYPE_FP16,
    "bf16": pb.VALUE_DTYPE_BF16,
    "int8": pb.VALUE_DTYPE_INT8,
    "int4": pb.VALUE_DTYPE_INT4,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}
_QMAX = {"int8": 127, "int4": 7}


def _dtype_key(dtype: ValueDType | str) -> str:
    key = str(dtype)
    if key not in _VALUE_BITS:
        raise ValueError(f"unknown value dtype {dtype!r}; known: {', '.join(_VALUE_BITS)}")
    return key


def value_bits(dtype: ValueDType | str) -> int:
    """Bits per value on the wire: 32 (fp32), 16 (fp16, bf16), 8 (int8), 4 (int4)."""
    return _VALUE_BITS[_dtype_key(dtype)]


def dtype_of(msg: pb.SparseTensor) -> str:
    """The value dtype name ("fp32", ...) of an encoded tensor; ``TensorDecodeError`` if unknown."""
    key = _PB_TO_DTYPE.get(msg.dtype)
    if key is None:
        raise TensorDecodeError(f"unknown value dtype {msg.dtype}", reason="bad_dtype")
    return key


_TORCH_GRAIN = 32768  # torch's at::internal::GRAIN_SIZE: smaller element-wise ops run serially
_torch_module: Any = None


def _torch() -> Any:
    """torch, imported on first use (it takes a second; most messages never need it)."""
    global _torch_module
    if _torch_module is None:
        import torch

        # torch warns once per process when it wraps a read-only numpy array (our decoded
        # payloads are); we only ever read those, so take the warning here, silently.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            frozen = np.zeros(1, dtype=np.float32)
            frozen.flags.writeable = False
            torch.from_numpy(frozen)
        _torch_module = torch
    return _torch_module


def _torch_cast(src: npt.NDArray[Any], dst_dtype: type[np.generic]) -> npt.NDArray[Any]:
    """IEEE float16 <-> float32 conversion of a 1-D array through torch.

    numpy's float16 casts are scalar loops (about 2 ns per value here); torch's use F16C and
    run five to ten times faster. Both round to nearest, ties to even, and keep NaN and inf.
    The copy goes in slices of torch's grain size so that torch never hands it to its
    OpenMP workers: when the other cores are busy, waking them cost about 8 ms per call here.
    """
    torch = _torch()
    out = np.empty(src.shape, dtype=dst_dtype)
    for dst_part, src_part in zip(
        torch.from_numpy(out).split(_TORCH_GRAIN),
        torch.from_numpy(src).split(_TORCH_GRAIN),
        strict=True,
    ):
        dst_part.copy_(src_part)
    return out


def fp16_bits(values: FloatArray) -> npt.NDArray[np.uint16]:
    """float32 -> IEEE binary16 bit patterns, rounding to nearest even (overflow gives inf)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.uint16)
    half = _torch_cast(np.ascontiguousarray(values, dtype=np.float32), np.float16)
    return half.view(np.uint16)


def fp16_values(bits: npt.NDArray[np.uint16]) -> FloatArray:
    """IEEE binary16 bit patterns -> float32 (exact)."""
    if bits.size == 0:
        return np.zeros(0, dtype=np.float32)
    return _torch_cast(np.ascontiguousarray(bits).view(np.float16), np.float32)


def bf16_bits(values: FloatArray) -> npt.NDArray[np.uint16]:
    """float32 -> bfloat16 bit patterns (upper 16 bits), rounding to nearest even.

    NaN stays NaN (the quiet bit is set so that a payload living only in the low half does not
    turn into inf); finite values beyond the bf16 range round to inf, as IEEE rounding does.
    """
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds the upper half to nearest, ties to even.
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> 16).astype(
        np.uint16
    )
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_values(bits: npt.NDArray[np.uint16]) -> FloatArray:
    """bfloat16 bit patterns -> float32 (exact)."""
    wide = bits.astype(np.uint32)
    wide <<= np.uint32(16)
    return wide.view(np.float32)


def quantise(
    values: FloatArray,
    qmax: int,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> tuple[npt.NDArray[np.int8], np.float32]:
    """Symmetric per-tensor quantisation: ``q`` in [-qmax, qmax], ``value ~= q * scale``.

    ``scale = max|v| / qmax`` (float32; 0 when every value is 0). Nearest rounding errs by at most
    scale / 2; stochastic rounding (``floor(v / scale + u)``, u uniform in [0, 1)) errs by less
    than one step and is unbiased: E[q * scale] = v. Non-finite values cannot be quantised
    (``ValueError``). Values whose magnitude is below about 1e-36 may flush to zero (the scale
    underflows float32).
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; known: nearest, stochastic")
    if values.size == 0:
        return np.zeros(0, dtype=np.int8), np.float32(0.0)
    amax = max(float(values.max()), -float(values.min()))
    if not math.isfinite(amax):
        raise ValueError(f"cannot quantise non-finite values to {qmax}-level integers")
    scale = np.float32(amax / qmax)
    if scale == 0.0:
        return np.zeros(values.size, dtype=np.int8), np.float32(0.0)
    if rounding == "nearest":
        x = values / scale
        np.rint(x, out=x)
    else:
        gen = rng if rng is not None else np.random.default_rng()
        # float64 so that adding the uniform draw does not round and bias the result.
        x64 = values.astype(np.float64) / float(scale)
        x64 += gen.random(values.size)
        np.floor(x64, out=x64)
        x = x64.astype(np.float32)
    np.clip(x, -qmax, qmax, out=x)
    return x.astype(np.int8), scale


def _encode_values(
    values: FloatArray, key: str, rounding: Rounding, rng: np.random.Generator | None
) -> tuple[memoryview, float]:
    """Values -> (little-endian bytes, scale). fp32 values are not copied."""
    if key == "fp32":
        raw: npt.NDArray[Any] = np.ascontiguousarray(values, dtype="<f4")
        scale = 0.0
    elif key == "fp16":
        raw, scale = fp16_bits(values).astype("<u2", copy=False), 0.0
    elif key == "bf16":
        raw, scale = bf16_bits(values).astype("<u2", copy=False), 0.0
    else:
        q, scale32 = quantise(values, _QMAX[key], rounding, rng)
        scale = float(scale32)
        if key == "int8":
            raw = q
        else:
            nibbles = (q & 0xF).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = nibbles[0::2] | (nibbles[1::2] << 4)
    return raw.data.cast("B"), scale


def _value_bytes(key: str, nnz: int) -> int:
    return (nnz * _VALUE_BITS[key] + 7) // 8


def _decode_values(data: bytes, key: str, nnz: int, scale: float, where: str) -> FloatArray:
    """Bytes (length already checked) -> float32 values."""
    if key == "fp32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32, copy=False)
    if key == "fp16":
        return fp16_values(np.frombuffer(data, dtype="<u2").astype(np.uint16, copy=False))
    if key == "bf16":
        return bf16_values(np.frombuffer(data, dtype="<u2").astype(np.uint16, copy=False))
    if key == "int8":
        q = np.frombuffer(data, dtype=np.int8)
    else:
        packed = np.frombuffer(data, dtype=np.uint8)
        nibbles = np.empty(2 * packed.size, dtype=np.uint8)
        nibbles[0::2] = packed & 0xF
        nibbles[1::2] = packed >> 4
        if nnz % 2 and nibbles[-1] != 0:
            raise TensorDecodeError(
                f"{where}: int4 padding nibble is not zero", reason="bad_values"
            )
        # Two's complement of a nibble: 0..7 stay, 8..15 become -8..-1.
        q = (nibbles[:nnz].astype(np.int8) ^ np.int8(8)) - np.int8(8)
    qmax = _QMAX[key]
    if q.size and (q == -qmax - 1).any():
        raise TensorDecodeError(
            f"{where}: {key} value {-qmax - 1} is outside [-{qmax}, {qmax}]", reason="bad_values"
        )
    return np.multiply(q, np.float32(scale), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Position sets: bitmap or Rice-coded gaps
# ---------------------------------------------------------------------------------------------


def binary_entropy(p: float) -> float:
    """H(p) in bits, for p in [0, 1]."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def position_bound_bits(n: int, k: int) -> float:
    """Entropy bound in bits for a set of ``k`` of ``n`` coordinates: ``n * H(k / n)``."""
    if n <= 0:
        return 0.0
    return n * binary_entropy(k / n)


def max_rice_parameter(n: int) -> int:
    """Largest Rice parameter allowed for sets over ``n`` coordinates: ``bit_length(n - 1)``,
    at most MAX_RICE_K. A larger one never helps (every remainder would be below 2**k anyway)
    and would let a forged message overflow 64-bit coordinate sums."""
    return min(MAX_RICE_K, max(n - 1, 0).bit_length())


def rice_parameter(count: int, n: int) -> int:
    """Rice parameter (bits) for ``count`` uniformly placed coordinates among ``n``.

    Gaps of a uniform set are close to geometric with p = count / n; the best Golomb power of
    two for a geometric source is ``max(0, 1 + floor(log2(log(phi - 1) / log(1 - p))))``
    (Kiely 2004), within a few percent of the entropy down to small p.
    """
    if count <= 0 or n <= 0 or 2 * count >= n:
        return 0
    p = count / n
    k = 1 + math.floor(math.log2(_GOLDEN_LOG / math.log1p(-p)))
    return min(max(k, 0), max_rice_parameter(n))


def rice_bytes(gaps: IntArray, k: int, scratch: IntArray | None = None) -> int:
    """Size in bytes of ``gaps`` Rice-coded with parameter ``k`` (layout of ``_rice_encode``).

    ``scratch``, an int64 array like ``gaps``, avoids allocating a temporary."""
    m = int(gaps.size)
    quotients = np.right_shift(gaps, k, out=scratch)
    return k * ((m + 7) // 8) + (m + int(quotients.sum()) + 7) // 8


def _field_dtype(k: int) -> type[np.unsignedinteger[Any]]:
    """Smallest unsigned dtype that holds k bits: fewer bytes to move per bit plane."""
    if k <= 8:
        return np.uint8
    if k <= 16:
        return np.uint16
    if k <= 32:
        return np.uint32
    return np.uint64


def _gaps(coords: IntArray) -> IntArray:
    """Gaps between increasing coordinates: g_0 = c_0, g_i = c_i - c_(i-1) - 1 (all >= 0)."""
    gaps = np.empty_like(coords)
    if coords.size:
        gaps[0] = coords[0]
        np.subtract(coords[1:], coords[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def _rice_encode(gaps: IntArray, k: int, scratch: IntArray | None = None) -> bytes:
    """Rice code of the gaps (m >= 1): k remainder bit planes, then the unary stream.

    Plane j (ceil(m / 8) bytes) holds bit j of every remainder ``g & (2**k - 1)``, gap i at
    bit i % 8 of byte i // 8. The unary stream holds, for each gap, ``g >> k`` zero bits and
    then a one bit, LSB first, zero-padded to a whole byte. Bit planes rather than packed
    k-bit fields keep encoding and decoding to k whole-array operations. (Fresh arrays cost
    page faults comparable to the arithmetic, hence the in-place operations.)
    """
    m = int(gaps.size)
    work = np.empty_like(gaps) if scratch is None else scratch
    planes = np.empty((k, (m + 7) // 8), dtype=np.uint8)
    if k:
        dt = _field_dtype(k)
        remainders = np.bitwise_and(gaps, (1 << k) - 1, out=work).astype(dt)
        for j in range(k):  # k <= 40 bit planes, each one vectorised over all gaps
            plane = remainders if k == 1 else (remainders >> dt(j)) & dt(1)
            planes[j] = np.packbits(plane, bitorder="little")
    # Position of gap i's terminating one bit: its quotient plus all earlier codes' bits.
    ends = np.right_shift(gaps, k, out=work)
    ends += 1
    np.cumsum(ends, out=ends)
    ends -= 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=np.bool_)
    bits[ends] = True
    return planes.tobytes() + np.packbits(bits, bitorder="little").tobytes()


def _rice_lower_bound_bytes(m: int, gap_sum: int, k_max: int) -> float:
    """A lower bound on the Rice size for any k in 1..k_max, from m and the gap sum alone.

    Since ``g >> k >= (g - 2**k + 1) / 2**k``, the unary stream holds at least
    ``m + (gap_sum - m * (2**k - 1)) / 2**k`` bits, and the planes ``m * k`` bits.
    """
    best = math.inf
    for k in range(1, k_max + 1):
        unary = m + max(0.0, (gap_sum - m * ((1 << k) - 1)) / (1 << k))
        best = min(best, (m * k + unary) / 8)
    return best


def encode_positions(members: BoolArray, out: pb.PositionSet | None = None) -> pb.PositionSet:
    """Code the true coordinates of a bool array (any shape, taken row-major).

    Bitmap or Rice-coded gaps, whichever is fewer bytes (ties: bitmap). The Rice parameter is
    the best of ``rice_parameter(count, n)`` and its two neighbours for the actual gaps
    (k = 0 included: a bitmap cut after its last non-zero byte). ``out``, an empty message,
    is filled in place of a new one.
    """
    flat = members.reshape(-1)
    n = int(flat.size)
    m = int(np.count_nonzero(flat))
    if out is None:
        out = pb.PositionSet()
    out.count = m
    if m == 0:
        # An empty Rice set is zero bytes; an empty bitmap is ceil(n / 8) bytes.
        out.coding = pb.SET_CODING_RICE_GAPS if n else pb.SET_CODING_BITMAP
        return out
    bitmap = np.packbits(flat, bitorder="little")
    # Rice with k = 0 is the bitmap cut after its last non-zero byte. Gaps are only worth
    # computing when some k >= 1 could beat that (densities below about 0.4).
    best_bytes = bitmap.size - int(np.argmax(bitmap[::-1] != 0))
    best_k = 0
    gaps = scratch = None
    gap_sum_at_least = 8 * (best_bytes - 1) + 1 - m  # the last coordinate is in the last byte
    if _rice_lower_bound_bytes(m, gap_sum_at_least, max_rice_parameter(n)) < best_bytes:
        gaps = _gaps(np.flatnonzero(flat))
        scratch = np.empty_like(gaps)
        k0 = max(rice_parameter(m, n), 1)
        for k in (k0 - 1, k0, k0 + 1):
            if 1 <= k <= max_rice_parameter(n):
                size = rice_bytes(gaps, k, scratch)
                if size < best_bytes:
                    best_bytes, best_k = size, k
    if best_bytes == bitmap.size:
        out.coding = pb.SET_CODING_BITMAP
        out.data = bitmap.tobytes()
    elif best_k == 0:
        out.coding = pb.SET_CODING_RICE_GAPS
        out.data = bitmap[:best_bytes].tobytes()
    else:
        assert gaps is not None
        out.coding = pb.SET_CODING_RICE_GAPS
        out.rice_k = best_k
        out.data = _rice_encode(gaps, best_k, scratch)
    return out


def _decode_bitmap(ps: pb.PositionSet, n: int, where: str) -> BoolArray:
    data = ps.data
    if ps.rice_k:
        raise TensorDecodeError(f"{where}: rice_k set on a bitmap", reason="bad_positions")
    if len(data) != (n + 7) // 8:
        raise TensorDecodeError(
            f"{where}: bitmap of {len(data)} bytes for {n} coordinates (need {(n + 7) // 8})",
            reason="bad_length",
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if n % 8 and raw[-1] >> (n % 8):
        raise TensorDecodeError(f"{where}: bitmap padding bits set", reason="bad_positions")
    flat = np.unpackbits(raw, count=n, bitorder="little").view(np.bool_)
    found = int(np.count_nonzero(flat))
    if found != ps.count:
        raise TensorDecodeError(
            f"{where}: bitmap holds {found} coordinates, count says {ps.count}", reason="bad_count"
        )
    return flat


def _decode_rice(ps: pb.PositionSet, n: int, where: str) -> BoolArray:
    m, k, data = int(ps.count), int(ps.rice_k), ps.data
    if k > max_rice_parameter(n):
        raise TensorDecodeError(
            f"{where}: rice_k {k} outside 0..{max_rice_parameter(n)} for {n} coordinates",
            reason="bad_positions",
        )
    plane = (m + 7) // 8
    rem_len = k * plane
    # Every code has a one bit in the unary stream, so the data bounds m (and with it every
    # allocation below) before anything is allocated.
    if len(data) < rem_len or 8 * (len(data) - rem_len) < m:
        raise TensorDecodeError(
            f"{where}: {len(data)} bytes cannot hold {m} Rice codes with k={k}",
            reason="bad_length",
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if m == 0:
        if raw.size:
            raise TensorDecodeError(f"{where}: data for an empty set", reason="bad_length")
        return np.zeros(n, dtype=np.bool_)
    ends = np.flatnonzero(np.unpackbits(raw[rem_len:], bitorder="little").view(np.bool_))
    if ends.size != m:
        raise TensorDecodeError(
            f"{where}: unary stream holds {ends.size} codes, count says {m}", reason="bad_count"
        )
    if int(ends[-1]) // 8 + 1 != raw.size - rem_len:
        raise TensorDecodeError(f"{where}: bytes after the last Rice code", reason="bad_length")
    # With Q_i = q_0 + ... + q_i = ends_i - i (ends_i counts the i earlier one bits) and
    # R_i = r_0 + ... + r_i: coord_i = 2**k * Q_i + R_i + i
    #   = 2**k * ends_i + sum_(j <= i) (r_j - (2**k - 1)) + (2**k - 1),
    # which needs no index array. Checking the largest Q first keeps every sum far below 2**63
    # (k <= bit_length(n - 1), m <= n <= 2**31).
    if int(ends[-1]) - (m - 1) > (n - 1) >> k:
        raise TensorDecodeError(f"{where}: coordinate beyond {n}", reason="bad_positions")
    coords = ends
    if k:
        planes = raw[:rem_len].reshape(k, plane)
        if m % 8 and (planes[:, -1] >> (m % 8)).any():
            raise TensorDecodeError(f"{where}: remainder padding bits set", reason="bad_positions")
        dt = _field_dtype(k)
        bits = np.unpackbits(planes, axis=1, count=m, bitorder="little")
        remainders = bits[0].astype(dt)
        for j in range(1, k):  # k bit planes, each vectorised over all codes
            remainders |= np.left_shift(bits[j], dt(j), dtype=dt)
        offsets = remainders.astype(np.int64)
        offsets -= (1 << k) - 1
        offsets[0] += (1 << k) - 1
        np.cumsum(offsets, out=offsets)
        coords <<= k
        coords += offsets
    if int(coords[-1]) >= n:
        raise TensorDecodeError(
            f"{where}: coordinate {int(coords[-1])} beyond {n}", reason="bad_positions"
        )
    flat = np.zeros(n, dtype=np.bool_)
    flat[coords] = True
    return flat


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
        return _decode_bitmap(ps, n, where)
    if ps.coding == pb.SET_CODING_RICE_GAPS:
        return _decode_rice(ps, n, where)
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
    key = _dtype_key(dtype)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"unknown rounding {rounding!r}; known: nearest, stochastic")
    if base is not None and base.mask.shape != t.shape:
        raise ValueError(f"base mask shape {base.mask.shape} != tensor shape {t.shape}")
    data, scale = _encode_values(t.values, key, rounding, rng)
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
    if len(values_data) != _value_bytes(key, nnz):
        raise TensorDecodeError(
            f"{where}: {len(values_data)} value bytes for {nnz} {key} values "
            f"(need {_value_bytes(key, nnz)})",
            reason="bad_length",
        )
    scale = float(msg.scale)
    if key in _QMAX:
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
    values = _decode_values(values_data, key, nnz, scale, where)
    return SparseTensor._checked(shape, mask, values)


def tensor_bound_bits(t: SparseTensor, dtype: ValueDType | str, *, positions: bool) -> float:
    """The physical limit for ``t`` in bits: ``nnz * value_bits`` plus, when positions travel,
    ``N * H(nnz / N)``."""
    bits = t.nnz * value_bits(dtype)
    return bits + (position_bound_bits(t.numel, t.nnz) if positions else 0.0)

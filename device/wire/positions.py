"""Sets of coordinates as bytes: a bitmap or Rice-coded gaps, and the entropy bound they approach.

A set of ``count`` of ``n`` flat coordinates travels as whichever is smaller: a bitmap of
``ceil(n / 8)`` bytes, or its gaps Rice-coded with a parameter ``k`` chosen from the set's
density, which comes within a few percent of the entropy bound ``n * H(count / n)`` bits. Every
step is vectorised numpy: no per-element Python loops, in encoding or in decoding.

Pure byte coding: :mod:`device.wire.codec` puts a :class:`CodedSet` into a protobuf
``PositionSet`` and back. Decoding trusts nothing and raises only ``TensorDecodeError``.
The exact byte layouts are documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from device.errors import TensorDecodeError

__all__ = [
    "MAX_RICE_K",
    "CodedSet",
    "binary_entropy",
    "code_set",
    "decode_bitmap",
    "decode_rice",
    "max_rice_parameter",
    "position_bound_bits",
    "rice_bytes",
    "rice_parameter",
]

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

#: Largest Rice parameter, in bits.
MAX_RICE_K = 40

_GOLDEN_LOG = math.log((math.sqrt(5.0) - 1.0) / 2.0)  # log(phi - 1), Gallager & van Voorhis


@dataclass(frozen=True)
class CodedSet:
    """A set of coordinates as it travels: the fields of a protobuf ``PositionSet``.

    ``coding`` is ``"bitmap"`` (``rice_k`` 0) or ``"rice"`` (Rice-coded gaps with parameter
    ``rice_k`` bits; 0 is a bitmap cut after its last non-zero byte); ``count`` is the number
    of coordinates in the set; ``data`` the coded bytes.
    """

    coding: Literal["bitmap", "rice"]
    count: int
    data: bytes = b""
    rice_k: int = 0


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


def code_set(members: BoolArray) -> CodedSet:
    """Code the true coordinates of a bool array (any shape, taken row-major).

    Bitmap or Rice-coded gaps, whichever is fewer bytes (ties: bitmap). The Rice parameter is
    the best of ``rice_parameter(count, n)`` and its two neighbours for the actual gaps
    (k = 0 included: a bitmap cut after its last non-zero byte).
    """
    flat = members.reshape(-1)
    n = int(flat.size)
    m = int(np.count_nonzero(flat))
    if m == 0:
        # An empty Rice set is zero bytes; an empty bitmap is ceil(n / 8) bytes.
        return CodedSet("rice" if n else "bitmap", 0)
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
        return CodedSet("bitmap", m, bitmap.tobytes())
    if best_k == 0:
        return CodedSet("rice", m, bitmap[:best_bytes].tobytes())
    assert gaps is not None
    return CodedSet("rice", m, _rice_encode(gaps, best_k, scratch), best_k)


def decode_bitmap(data: bytes, rice_k: int, count: int, n: int, where: str) -> BoolArray:
    """A bitmap set's ``data`` as a new flat bool array of length ``n`` (``n`` bounded by the
    caller); ``TensorDecodeError`` unless it holds exactly ``count`` coordinates, ``rice_k``
    is 0, the length is ``ceil(n / 8)`` and the padding bits are zero."""
    if rice_k:
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
    if found != count:
        raise TensorDecodeError(
            f"{where}: bitmap holds {found} coordinates, count says {count}", reason="bad_count"
        )
    return flat


def decode_rice(data: bytes, rice_k: int, count: int, n: int, where: str) -> BoolArray:
    """A Rice-coded set's ``data`` as a new flat bool array of length ``n`` (``n`` bounded by
    the caller); ``TensorDecodeError`` for a parameter above ``max_rice_parameter(n)``, wrong
    lengths, trailing bytes, non-zero padding bits, a count mismatch or a coordinate beyond
    ``n`` (the gap code makes them strictly increasing by construction)."""
    m, k = count, rice_k
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

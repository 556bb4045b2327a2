"""Exact sums of ``weight * float32`` per coordinate, as integers: what makes sharding bit-exact.

- a float32 value is ``m * 2**(p - 149)`` with an integer ``|m| < 2**24`` and ``p`` in
  [0, 253]; a weight ``w`` is an integer with ``|w| < 2**30``; so ``w * x`` is the exact
  integer ``w * m`` (``< 2**54``) placed at bit ``p`` of a fixed-point number;
- :class:`ExactSum` keeps, per coordinate, that fixed-point number in int64 *limbs* of 32 bits
  (each add puts < 2**33 into a limb, so 2**30 adds cannot overflow); integer addition is
  associative and commutative, so the sum is the same whatever the order or the split, and a
  negative weight removes an earlier add exactly;
- :meth:`ExactSum.to_float64` turns each sum into float64 by one fixed procedure
  (carry-normalise, sign and magnitude, Horner from the top limb).

``fleet.strategies.accumulate`` builds every strategy's partial sums from these.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_ADDS", "MAX_WEIGHT", "ExactSum"]

IntArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

MAX_WEIGHT = 2**30
"""Exclusive bound on ``|weight|`` of one add (``validate.MAX_EXAMPLES`` = 1e9 fits)."""
MAX_ADDS = 2**30
"""Adds (and removes) one ``ExactSum`` may take before an int64 limb could overflow."""

_LIMB_BITS = 32
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_BLOCK = 1 << 15  # values per ``ExactSum.add`` block: int64 temporaries of 256 KiB
_OFFSET = 149  # a float32 is m * 2**(p - 149) with integer m and bit position p >= 0


class ExactSum:
    """Exact per-coordinate sums of ``weight * value`` (float32 values, integer weights).

    ``size`` coordinates; the sum is a fixed-point number with its least significant bit at
    ``2**-149``, stored as int64 limbs ``rows[j]`` worth ``2**(32 * (lo + j) - 149)``. Only the
    limbs some add touched are allocated (``lo`` .. ``lo + len(rows) - 1``), so memory is about
    4 x 8 bytes per coordinate for weights of one magnitude band.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self.lo = 0
        self.rows: IntArray = np.zeros((0, size), dtype=np.int64)
        self.adds = 0

    def _ensure(self, k_min: int, k_max: int) -> None:
        """Allocate limbs so that ``k_min .. k_max`` (absolute limb indices) exist."""
        if self.rows.shape[0] == 0:
            self.lo = k_min
            self.rows = np.zeros((k_max - k_min + 1, self.size), dtype=np.int64)
            return
        hi = self.lo + self.rows.shape[0] - 1
        if k_min >= self.lo and k_max <= hi:
            return
        new_lo, new_hi = min(k_min, self.lo), max(k_max, hi)
        rows = np.zeros((new_hi - new_lo + 1, self.size), dtype=np.int64)
        rows[self.lo - new_lo : self.lo - new_lo + self.rows.shape[0]] = self.rows
        self.lo, self.rows = new_lo, rows

    def add(
        self,
        values: npt.NDArray[np.float32],
        weight: int,
        index: npt.NDArray[np.intp] | None = None,
    ) -> None:
        """Add ``weight * values`` at coordinates ``index`` (all coordinates when None).

        ``values`` are finite float32; ``index`` holds distinct coordinates; ``weight`` is a
        non-zero integer with ``|weight| < 2**30`` (negative: remove an earlier add).
        """
        if not isinstance(weight, int | np.integer) or weight == 0 or abs(weight) >= MAX_WEIGHT:
            raise ValueError(f"weight must be a non-zero integer below 2**30 in size, got {weight}")
        if values.dtype != np.float32:
            raise ValueError(f"values must be float32, got {values.dtype}")
        flat = values.reshape(-1)
        if index is None:
            if flat.size != self.size:
                raise ValueError(f"{flat.size} values for {self.size} coordinates")
            cols: npt.NDArray[np.intp] | slice = slice(None)
        else:
            if index.shape != flat.shape:
                raise ValueError(f"{flat.size} values but {index.size} coordinates")
            cols = index
        if self.adds >= MAX_ADDS:
            raise ValueError(f"an ExactSum takes at most {MAX_ADDS} adds")
        self.adds += 1
        if flat.size == 0:
            return
        bits = flat.view(np.int32)
        field_ = (bits >> 23) & 0xFF  # the biased exponent, 0 for zeros and subnormals
        # The limb range only needs to cover non-zero values: a zero adds 0 wherever it lands.
        nonzero = (bits & 0x7FFFFFFF) != 0
        f_min = int(np.min(field_, where=nonzero, initial=255))
        f_max = int(np.max(field_, where=nonzero, initial=0))
        k_min, k_max = (max(f_min, 1) - 1) >> 5, (max(f_max, 1) - 1) >> 5
        k_min = min(k_min, k_max)  # all zeros: any one limb
        self._ensure(k_min, k_max + 2)
        # Blocks of a few thousand values keep the temporaries in cache and let the common case,
        # every value of a block in one limb band, add into contiguous rows without fancy
        # indexing. Integer addition is exact, so how the adds are grouped changes no bit.
        for start in range(0, flat.size, _BLOCK):
            stop = min(flat.size, start + _BLOCK)
            span = slice(start, stop)
            self._add_block(bits[span], field_[span], weight, cols, span, k_min, k_max)

    def _add_block(
        self,
        bits: npt.NDArray[np.int32],
        field_: npt.NDArray[np.int32],
        weight: int,
        cols: npt.NDArray[np.intp] | slice,
        span: slice,
        k_min: int,
        k_max: int,
    ) -> None:
        """``add`` for one block of values (``span`` of the call's values); limbs exist."""
        # value = m * 2**(bit - 149) with an integer |m| < 2**24 and bit >= 0 its lowest bit.
        q = (bits & 0x7FFFFF).astype(np.int64)
        q |= (field_ != 0).astype(np.int64) << 23  # the implicit leading bit of normal numbers
        np.negative(q, out=q, where=bits < 0)
        q *= np.int64(weight)  # |q| < 2**54: exact
        bit = np.maximum(field_, 1)
        bit -= 1
        r = (bit & 31).astype(np.int64)
        a = q & _LIMB_MASK
        a <<= r  # < 2**63
        q >>= _LIMB_BITS
        q <<= r  # |b| < 2**53
        low = a & _LIMB_MASK
        a >>= _LIMB_BITS
        a += q & _LIMB_MASK  # the middle limb's share
        q >>= _LIMB_BITS  # the top limb's share
        block_cols = span if isinstance(cols, slice) else cols[span]
        # A zero's bit is 0, whatever band it is put in it adds 0: clip it into the range.
        k = None if k_min == k_max else np.clip(bit >> 5, k_min, k_max)
        if k is None or int(k.min()) == int(k.max()):
            # One limb band. Each (limb, coordinate) pair occurs once per call, so even the
            # buffered fancy adds of an ``index`` are exact.
            j = (k_min if k is None else int(k[0])) - self.lo
            self.rows[j, block_cols] += low
            self.rows[j + 1, block_cols] += a
            self.rows[j + 2, block_cols] += q
            return
        size = self.size
        flat_rows = self.rows.reshape(-1)
        lin = (k.astype(np.int64) - self.lo) * size
        lin += np.arange(span.start, span.stop) if isinstance(cols, slice) else block_cols
        flat_rows[lin] += low
        lin += size
        flat_rows[lin] += a
        lin += size
        flat_rows[lin] += q

    def merge(self, other: ExactSum) -> None:
        """Add ``other``'s sums into this one (exact; ``other`` is not changed)."""
        if other.size != self.size:
            raise ValueError(f"cannot merge sums over {other.size} and {self.size} coordinates")
        if self.adds + other.adds > MAX_ADDS:
            raise ValueError(f"an ExactSum takes at most {MAX_ADDS} adds")
        self.adds += other.adds
        if other.rows.shape[0] == 0:
            return
        self._ensure(other.lo, other.lo + other.rows.shape[0] - 1)
        start = other.lo - self.lo
        self.rows[start : start + other.rows.shape[0]] += other.rows

    def to_float64(self) -> Float64Array:
        """The sums as float64, by a procedure that depends only on the exact values.

        Carries are normalised so that every limb but the top one is in [0, 2**32); negative
        sums are negated and normalised again (sign and magnitude); the magnitude is evaluated
        by Horner's rule from the top limb, where a zero limb above or below changes nothing
        (multiplying by 2**32 and adding 0 are exact), so the allocated range does not matter.
        """
        if self.rows.shape[0] == 0:
            return np.zeros(self.size, dtype=np.float64)
        rows = np.concatenate([self.rows, np.zeros((1, self.size), dtype=np.int64)])
        _normalise(rows)
        negative = rows[-1] < 0
        rows *= np.where(negative, -1, 1).astype(np.int64)
        _normalise(rows)
        value = np.zeros(self.size, dtype=np.float64)
        for j in range(rows.shape[0] - 1, -1, -1):
            value = value * float(2**_LIMB_BITS) + rows[j].astype(np.float64)
        value = np.ldexp(value, _LIMB_BITS * self.lo - _OFFSET)
        out: Float64Array = np.where(negative, -value, value)
        return out


def _normalise(rows: IntArray) -> None:
    """Propagate carries upwards so every limb but the last is in [0, 2**32) (in place)."""
    for j in range(rows.shape[0] - 1):
        carry = rows[j] >> _LIMB_BITS
        rows[j] &= _LIMB_MASK
        rows[j + 1] += carry

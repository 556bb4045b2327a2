"""Value precision on the wire: how a tensor's kept values travel in each ``ValueDType``.

fp32 as is; fp16 (IEEE binary16) and bf16 (the upper half of a float32), both rounding to
nearest even; int8 and int4 as symmetric per-tensor quantisation (``q * scale``, nearest or
stochastic rounding). Pure numpy (torch only for fast float16 casts): :mod:`device.wire.codec`
puts the bytes and the scale into the protobuf ``SparseTensor``. Decoding raises only
``TensorDecodeError``.
"""

from __future__ import annotations

import enum
import math
import warnings
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from device.errors import TensorDecodeError

__all__ = [
    "QMAX",
    "Rounding",
    "ValueDType",
    "bf16_bits",
    "bf16_values",
    "decode_values",
    "dtype_key",
    "encode_values",
    "fp16_bits",
    "fp16_values",
    "quantise",
    "value_bits",
    "value_bytes",
]

FloatArray = npt.NDArray[np.float32]
Rounding = Literal["nearest", "stochastic"]


class ValueDType(enum.StrEnum):
    """How tensor values travel. ``int8``/``int4`` are symmetric per-tensor quantisation.

    Defined here, with the encoders that implement each, and re-exported by ``codec`` and
    ``messages``; a str of the same value is accepted wherever a ValueDType is.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"


_VALUE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
#: The integer dtypes and their largest code: values travel as ``q * scale``, ``|q| <= QMAX``.
QMAX = {"int8": 127, "int4": 7}


def dtype_key(dtype: ValueDType | str) -> str:
    key = str(dtype)
    if key not in _VALUE_BITS:
        raise ValueError(f"unknown value dtype {dtype!r}; known: {', '.join(_VALUE_BITS)}")
    return key


def value_bits(dtype: ValueDType | str) -> int:
    """Bits per value on the wire: 32 (fp32), 16 (fp16, bf16), 8 (int8), 4 (int4)."""
    return _VALUE_BITS[dtype_key(dtype)]


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


def encode_values(
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
        q, scale32 = quantise(values, QMAX[key], rounding, rng)
        scale = float(scale32)
        if key == "int8":
            raw = q
        else:
            nibbles = (q & 0xF).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = nibbles[0::2] | (nibbles[1::2] << 4)
    return raw.data.cast("B"), scale


def value_bytes(key: str, nnz: int) -> int:
    return (nnz * _VALUE_BITS[key] + 7) // 8


def decode_values(data: bytes, key: str, nnz: int, scale: float, where: str) -> FloatArray:
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
    qmax = QMAX[key]
    if q.size and (q == -qmax - 1).any():
        raise TensorDecodeError(
            f"{where}: {key} value {-qmax - 1} is outside [-{qmax}, {qmax}]", reason="bad_values"
        )
    if scale == 0.0 and q.size and q.any():
        # The encoder sends scale 0 only with all-zero codes; otherwise the codes would be
        # silently erased, so the sender is broken or lying.
        raise TensorDecodeError(
            f"{where}: {key} scale is 0 but {int(np.count_nonzero(q))} codes are non-zero",
            reason="bad_scale",
        )
    return np.multiply(q, np.float32(scale), dtype=np.float32)

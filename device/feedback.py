"""Error-feedback rounding of uploaded deltas: what quantisation drops this round is sent later.

A device that uploads its deltas in a lossy precision (fp16, bf16, int8, int4; ``ValueDType``)
keeps, per run and tensor, the *residual* ``r = (delta + r_old) - sent``: the part of its
corrected delta that the wire did not carry. The next time it is selected in that run it adds
``r`` to its new delta before quantising (Seide et al. 2014; Karimireddy et al., "Error
Feedback Fixes SignSGD", 2019), so the quantisation error is not lost but delayed, and the
server's sum over a device's rounds is exact up to the last residual.

``sent`` is computed with the codec's own encoder and decoder (per-tensor scale, nearest
rounding), so it is bit for bit what the fleet manager decodes: the bookkeeping is exact.

Rules (docs/algorithms.md, "Quantised updates"):

- The residual lives in memory only, keyed by run id; a restart loses it (at most half a
  quantisation step per coordinate of one upload, never an accumulated error).
- Mask change: the residual follows the device's mask after training. At positions that leave
  the mask it is dropped (the server zeroes weights outside the mask, so a correction there has
  nothing to correct); positions that join the mask start at 0.
- Selection gaps: the residual is kept across rounds the device is not selected in, for at most
  ``max_gap_rounds`` rounds (default 100); older residuals are dropped, as the model they
  corrected has moved on. A change of shape, or a round number that goes backwards (a new run
  with a reused id), also drops it.
- fp32 uploads need no feedback and clear the run's residual.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device.wire.codec import SparseTensor
from device.wire.messages import DeviceUpdate, ValueDType
from device.wire.precision import decode_values, dtype_key, encode_values

__all__ = ["DEFAULT_MAX_GAP_ROUNDS", "ErrorFeedback", "sent_values"]

FloatArray = npt.NDArray[np.float32]
DEFAULT_MAX_GAP_ROUNDS = 100


def sent_values(values: FloatArray, dtype: ValueDType | str) -> FloatArray:
    """What the receiver decodes when ``values`` travel in ``dtype``: the codec's encoder (nearest
    rounding, per-tensor scale) followed by its decoder. float32, same length."""
    key = dtype_key(dtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if key == "fp32":
        return values
    data, scale = encode_values(values, key, "nearest", None)
    return decode_values(bytes(data), key, values.size, scale, "error feedback")


@dataclass
class _RunResidual:
    round: int  # the round whose upload left this residual
    dtype: str
    tensors: dict[str, FloatArray]  # dense residual per tensor name, zero off the last mask


class ErrorFeedback:
    """Per-run residuals of one device (not thread-safe: the agent's worker thread owns it)."""

    def __init__(self, max_gap_rounds: int = DEFAULT_MAX_GAP_ROUNDS) -> None:
        if max_gap_rounds < 1:
            raise ValueError(f"max_gap_rounds must be >= 1, got {max_gap_rounds}")
        self.max_gap_rounds = max_gap_rounds
        self._runs: dict[str, _RunResidual] = {}

    def residual(self, run_id: str, name: str) -> FloatArray | None:
        """The stored dense residual of one tensor (None when there is none); for tests."""
        run = self._runs.get(run_id)
        return None if run is None else run.tensors.get(name)

    def forget(self, run_id: str) -> None:
        """Drop a run's residuals (the run ended, or the device restarts its state)."""
        self._runs.pop(run_id, None)

    def _usable(self, run_id: str, round_: int, key: str) -> dict[str, FloatArray]:
        run = self._runs.get(run_id)
        if run is None or run.dtype != key:
            return {}
        if not 0 < round_ - run.round <= self.max_gap_rounds:
            return {}
        return run.tensors

    def apply(
        self, run_id: str, round_: int, update: DeviceUpdate, dtype: ValueDType | str
    ) -> DeviceUpdate:
        """``update`` with each delta corrected by the stored residual (the values the codec will
        quantise); stores the new residual. ``round_`` >= 1 is the round being uploaded.

        The returned deltas keep their masks; only their values change. For fp32 the update is
        returned unchanged and the run's residual cleared.
        """
        key = dtype_key(dtype)
        if key == "fp32":
            self.forget(run_id)
            return update
        old = self._usable(run_id, round_, key)
        deltas: dict[str, SparseTensor] = {}
        residuals: dict[str, FloatArray] = {}
        for name, delta in update.deltas.items():
            corrected = np.array(delta.values, dtype=np.float32, copy=True)
            prev = old.get(name)
            if prev is not None and prev.shape == delta.shape:
                # Positions that left the mask are dropped here; new ones read prev == 0.
                corrected += prev[delta.mask]
            sent = sent_values(corrected, key)
            residual = np.zeros(delta.shape, dtype=np.float32)
            residual[delta.mask] = corrected - sent
            residuals[name] = residual
            deltas[name] = SparseTensor(delta.shape, delta.mask, corrected)
        self._runs[run_id] = _RunResidual(round_, key, residuals)
        return dataclasses.replace(update, deltas=deltas)

"""Quantised uploads: error bounds of the codec's precisions and the device's error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from device.feedback import ErrorFeedback, sent_values
from device.wire import envelope
from device.wire.codec import KnownMask, SparseTensor
from device.wire.messages import DeviceUpdate, Envelope, ValueDType

RNG = np.random.default_rng(7)


def update(deltas: dict[str, SparseTensor]) -> DeviceUpdate:
    return DeviceUpdate(model_version=3, model_digest=b"d" * 32, deltas=deltas, num_examples=5)


def tensor(values: np.ndarray, mask: np.ndarray | None = None) -> SparseTensor:
    return SparseTensor.from_dense(values.astype(np.float32), mask)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_int_quantisation_errs_by_at_most_half_a_step(dtype: str) -> None:
    """Nearest rounding to q * scale, scale = max|v| / qmax: no value may be off by more than
    half a step, or aggregation would see a biased model."""
    qmax = {"int8": 127, "int4": 7}[dtype]
    values = (RNG.standard_normal(10_000) * 0.03).astype(np.float32)
    sent = sent_values(values, dtype)
    step = np.abs(values).max() / qmax
    assert np.abs(sent - values).max() <= step / 2 * (1 + 1e-5)
    assert np.abs(sent).max() == pytest.approx(np.abs(values).max(), rel=1e-6)


def test_fp16_errs_by_at_most_half_an_ulp() -> None:
    values = (RNG.standard_normal(10_000) * 0.03).astype(np.float32)
    sent = sent_values(values, "fp16")
    assert np.all(np.abs(sent - values) <= np.abs(values) * 2.0**-11 + 2.0**-25)


def test_sent_values_are_what_the_receiver_decodes() -> None:
    """The residual is only exact if the device predicts the server's decode bit for bit."""
    mask = RNG.random((20, 30)) < 0.3
    delta = tensor(RNG.standard_normal((20, 30)), mask)
    book = {"w": KnownMask(version=3, mask=mask)}
    payload = envelope.encode(
        Envelope(body=update({"w": delta}), run_id="r", round=1, device_id="d"),
        book=book,
        dtype=ValueDType.INT8,
    )
    got = envelope.decode(payload, book_for=lambda version: book).body
    assert isinstance(got, DeviceUpdate)
    np.testing.assert_array_equal(got.deltas["w"].values, sent_values(delta.values, "int8"))


def test_feedback_delivers_the_sum_of_the_deltas_up_to_the_last_residual() -> None:
    """Error feedback's promise: over the rounds a device takes part in, what the server
    receives sums to what the device meant to send, minus only the last residual."""
    fb = ErrorFeedback()
    mask = np.ones((50,), dtype=bool)
    meant = np.zeros(50, dtype=np.float32)
    received = np.zeros(50, dtype=np.float32)
    for round_ in (1, 4, 9, 30):  # selected with gaps between
        delta = (RNG.standard_normal(50) * 0.01).astype(np.float32)
        meant += delta
        out = fb.apply("run", round_, update({"w": tensor(delta, mask)}), "int8")
        received += sent_values(out.deltas["w"].values, "int8")
    residual = fb.residual("run", "w")
    assert residual is not None and np.abs(residual).max() > 0
    np.testing.assert_allclose(received + residual, meant, atol=1e-6)
    # Without feedback the error of the sum grows with the rounds; with it, it stays one residual.
    assert np.abs(received - meant).max() <= np.abs(meant).max() / 127


def test_residual_is_carried_into_the_next_upload() -> None:
    fb = ErrorFeedback()
    mask = np.ones(8, dtype=bool)
    first = fb.apply("run", 1, update({"w": tensor(RNG.standard_normal(8), mask)}), "int8")
    residual = fb.residual("run", "w")
    assert residual is not None
    second_delta = RNG.standard_normal(8).astype(np.float32)
    second = fb.apply("run", 2, update({"w": tensor(second_delta, mask)}), "int8")
    np.testing.assert_allclose(second.deltas["w"].values, second_delta + residual, rtol=1e-6)
    assert first.deltas["w"].values.dtype == np.float32


def test_residual_is_dropped_after_a_long_gap() -> None:
    """A residual older than max_gap_rounds corrects a model that has long moved on."""
    fb = ErrorFeedback(max_gap_rounds=10)
    mask = np.ones(8, dtype=bool)
    fb.apply("run", 1, update({"w": tensor(RNG.standard_normal(8), mask)}), "int8")
    delta = RNG.standard_normal(8).astype(np.float32)
    kept = ErrorFeedback(max_gap_rounds=10)
    kept._runs = dict(fb._runs)
    late = fb.apply("run", 12, update({"w": tensor(delta, mask)}), "int8")
    np.testing.assert_array_equal(late.deltas["w"].values, delta)  # 11 rounds: dropped
    in_time = kept.apply("run", 11, update({"w": tensor(delta, mask)}), "int8")
    assert not np.array_equal(in_time.deltas["w"].values, delta)  # 10 rounds: still used


def test_restart_loses_the_residual() -> None:
    """In memory only: a restarted agent (a new ErrorFeedback) starts from zero."""
    mask = np.ones(8, dtype=bool)
    ErrorFeedback().apply("run", 1, update({"w": tensor(RNG.standard_normal(8), mask)}), "int8")
    delta = RNG.standard_normal(8).astype(np.float32)
    out = ErrorFeedback().apply("run", 2, update({"w": tensor(delta, mask)}), "int8")
    np.testing.assert_array_equal(out.deltas["w"].values, delta)


def test_mask_change_drops_leaving_positions_and_starts_new_ones_at_zero() -> None:
    fb = ErrorFeedback()
    old_mask = np.array([True, True, True, False, False, True])
    new_mask = np.array([True, False, True, True, False, True])  # 1 leaves, 3 joins
    fb.apply("run", 1, update({"w": tensor(RNG.standard_normal(6), old_mask)}), "int8")
    residual = fb.residual("run", "w")
    assert residual is not None and residual[1] != 0
    delta = RNG.standard_normal(6).astype(np.float32)
    out = fb.apply("run", 2, update({"w": tensor(delta, new_mask)}), "int8")
    expected = delta[new_mask] + np.where(new_mask, residual, 0)[new_mask]
    np.testing.assert_allclose(out.deltas["w"].values, expected, rtol=1e-6)
    assert out.deltas["w"].values[2] == delta[3]  # the joining position: residual 0
    after = fb.residual("run", "w")
    assert after is not None and after[1] == 0 and after[4] == 0  # nothing kept off the mask


def test_fp32_sends_as_is_and_clears_the_run() -> None:
    fb = ErrorFeedback()
    mask = np.ones(8, dtype=bool)
    fb.apply("run", 1, update({"w": tensor(RNG.standard_normal(8), mask)}), "int8")
    u = update({"w": tensor(RNG.standard_normal(8), mask)})
    assert fb.apply("run", 2, u, "fp32") is u
    assert fb.residual("run", "w") is None


def test_runs_keep_separate_residuals_and_a_new_dtype_starts_afresh() -> None:
    fb = ErrorFeedback()
    mask = np.ones(8, dtype=bool)
    fb.apply("a", 1, update({"w": tensor(RNG.standard_normal(8), mask)}), "int8")
    delta = RNG.standard_normal(8).astype(np.float32)
    other = fb.apply("b", 2, update({"w": tensor(delta, mask)}), "int8")
    np.testing.assert_array_equal(other.deltas["w"].values, delta)
    changed = fb.apply("a", 2, update({"w": tensor(delta, mask)}), "fp16")
    np.testing.assert_array_equal(changed.deltas["w"].values, delta)

"""Property tests (hypothesis) of the codec: round trips, dtype exactness, quantisation error
and bias, and that malformed bytes only ever raise DecodeError."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.errors import DecodeError
from device.wire import codec, envelope
from device.wire.codec import KnownMask, SparseTensor
from device.wire.messages import DeviceUpdate, Envelope
from device.wire.pb import sparsefleet_pb2 as pb

DENSITIES = (0.0, 0.001, 1 / 64, 0.2, 0.5, 1.0)

# Small random shapes (0-d, empty and odd sizes) plus a few large enough for Rice coding.
shapes = st.one_of(
    st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
    st.sampled_from([(4096,), (64, 65), (3, 1000), (20_000,)]),
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tensor(shape: tuple[int, ...], density: float, seed: int) -> SparseTensor:
    rng = np.random.default_rng(seed)
    mask = np.asarray(rng.random(shape) < density)  # asarray: a 0-d comparison gives a scalar
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    return SparseTensor(shape, mask, values)


def _flip_some(mask: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return np.asarray(mask ^ (rng.random(mask.shape) < fraction), dtype=np.bool_)


@SETTINGS
@given(
    shape=shapes,
    density=st.sampled_from(DENSITIES),
    seed=st.integers(0, 2**32 - 1),
    base_kind=st.sampled_from(["none", "same", "nearby", "unrelated"]),
)
def test_fp32_round_trip_is_exact_for_every_position_mode(
    shape: tuple[int, ...], density: float, seed: int, base_kind: str
) -> None:
    """Whatever layout the encoder picks, the receiver gets the same mask and values."""
    t = _tensor(shape, density, seed)
    entry = None
    if base_kind == "same":
        entry = KnownMask(3, t.mask.copy())
    elif base_kind == "nearby":
        entry = KnownMask(3, _flip_some(t.mask, 0.01, seed))
    elif base_kind == "unrelated":
        entry = KnownMask(3, np.asarray(np.random.default_rng(seed + 2).random(shape) < 0.5))
    msg = codec.encode_tensor(t, base=entry)
    back = codec.decode_tensor(
        pb.SparseTensor.FromString(msg.SerializeToString()), book_entry=entry
    )
    assert back.equal(t)
    assert back.shape == t.shape and back.values.dtype == np.float32


@SETTINGS
@given(shape=shapes, density=st.sampled_from(DENSITIES), seed=st.integers(0, 2**32 - 1))
def test_position_sets_round_trip_and_never_exceed_the_bitmap(
    shape: tuple[int, ...], density: float, seed: int
) -> None:
    """The chosen set coding is exact and never larger than a plain bitmap."""
    members = np.asarray(np.random.default_rng(seed).random(shape) < density)
    ps = codec.encode_positions(members)
    n = members.size
    assert len(ps.data) <= (n + 7) // 8
    assert np.array_equal(codec.decode_positions(ps, n), members.reshape(-1))


finite_halves = st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7C00) != 0x7C00)


@SETTINGS
@given(bits=st.lists(finite_halves | st.sampled_from([0x7C00, 0xFC00]), max_size=300))
def test_fp16_round_trip_is_exact_for_representable_values(bits: list[int]) -> None:
    """Values that fp16 can hold (subnormals, signed zeros, inf) come back bit for bit."""
    values = np.array(bits, dtype=np.uint16).view(np.float16).astype(np.float32)
    t = SparseTensor.from_dense(values)
    back = codec.decode_tensor(codec.encode_tensor(t, "fp16"))
    assert np.array_equal(back.values.view(np.uint32), values.view(np.uint32))


@SETTINGS
@given(high=st.lists(st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7F80) != 0x7F80), max_size=300))
def test_bf16_round_trip_is_exact_for_representable_values(high: list[int]) -> None:
    """float32 values whose low 16 bits are zero are exactly bf16: nothing may change."""
    values = (np.array(high, dtype=np.uint32) << 16).view(np.float32)
    back = codec.decode_tensor(codec.encode_tensor(SparseTensor.from_dense(values), "bf16"))
    assert np.array_equal(back.values.view(np.uint32), values.view(np.uint32))


magnitudes = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)
value_lists = st.lists(
    st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x)), min_size=1, max_size=200
)


def _step(values: np.ndarray, qmax: int) -> float:
    return float(np.float32(float(np.abs(values).max()) / qmax))


@SETTINGS
@given(values=value_lists, dtype=st.sampled_from(["int8", "int4"]))
def test_nearest_rounding_errs_by_at_most_half_a_step(values: list[float], dtype: str) -> None:
    """Round to nearest: |decoded - original| <= scale / 2 for every value."""
    v = np.array(values, dtype=np.float32)
    qmax = 127 if dtype == "int8" else 7
    back = codec.decode_tensor(codec.encode_tensor(SparseTensor.from_dense(v), dtype)).values
    step = _step(v, qmax)
    err = np.abs(back.astype(np.float64) - v.astype(np.float64))
    assert (err <= step / 2 * (1 + 1e-5) + 1e-45).all()


@SETTINGS
@given(values=value_lists, seed=st.integers(0, 2**32 - 1))
def test_stochastic_rounding_errs_by_less_than_one_step(values: list[float], seed: int) -> None:
    v = np.array(values, dtype=np.float32)
    msg = codec.encode_tensor(
        SparseTensor.from_dense(v), "int8", rounding="stochastic", rng=np.random.default_rng(seed)
    )
    back = codec.decode_tensor(msg).values
    err = np.abs(back.astype(np.float64) - v.astype(np.float64))
    assert (err <= _step(v, 127) * (1 + 1e-5) + 1e-45).all()


def test_stochastic_rounding_is_unbiased_in_expectation() -> None:
    """Averaged over many draws, stochastic int8 rounding returns the original values, while
    nearest rounding keeps a bias of up to half a step (this is why FL uses it).

    Values sit at 0.1, 0.3 and 0.7 of a step (bias 0.1 to 0.3 steps under nearest rounding).
    One draw's error has standard deviation <= step / 2, so the mean of 4,000 draws is within
    step / (2 * sqrt(4000)) = 0.008 steps per standard deviation; we allow 0.05 steps (6 sd).
    """
    rng = np.random.default_rng(1234)
    step = 0.01
    frac = np.tile([0.1, 0.3, 0.7], 20)
    values = ((rng.integers(-100, 100, frac.size) + frac) * step).astype(np.float32)
    values[0] = 127 * step  # pins the scale to exactly `step`
    scale = np.float32(float(np.abs(values).max()) / 127)
    draws = 4000
    total = np.zeros(values.size, dtype=np.float64)
    for _ in range(draws):
        q, s = codec.quantise(values, 127, "stochastic", rng)
        total += q.astype(np.float64) * float(s)
    bias = total / draws - values
    assert np.abs(bias).max() < 0.05 * scale
    q, s = codec.quantise(values, 127, "nearest")
    assert np.abs(q * float(s) - values).max() > 0.25 * scale  # the test could fail


def test_stochastic_rounding_is_reproducible_with_a_seeded_generator() -> None:
    t = SparseTensor.from_dense(np.linspace(-1, 1, 101, dtype=np.float32))
    a = codec.encode_tensor(t, "int8", rounding="stochastic", rng=np.random.default_rng(5))
    b = codec.encode_tensor(t, "int8", rounding="stochastic", rng=np.random.default_rng(5))
    assert a.values == b.values


# ---------------------------------------------------------------------------------------------
# A light fuzz: malformed input raises only DecodeError
# ---------------------------------------------------------------------------------------------


def _sample_update() -> tuple[bytes, dict[str, KnownMask]]:
    rng = np.random.default_rng(77)
    implied = _tensor((40, 50), 0.2, 1)
    changed_mask = _flip_some(implied.mask, 0.02, 2)
    changed = SparseTensor(
        changed_mask.shape,
        changed_mask,
        rng.standard_normal(int(changed_mask.sum())).astype(np.float32),
    )
    book = {"implied": KnownMask(1, implied.mask.copy()), "diff": KnownMask(1, implied.mask.copy())}
    update = DeviceUpdate(
        model_version=1,
        model_digest=bytes(32),
        deltas={
            "implied": implied,
            "diff": changed,
            "absolute": _tensor((300,), 0.05, 3),
            "dense": _tensor((7,), 1.0, 4),
        },
        num_examples=5,
        importance={"implied": np.abs(rng.standard_normal((40, 50))).astype(np.float32)},
        metrics={"loss": 0.25},
    )
    data = envelope.encode(Envelope(update, run_id="r", round=2, device_id="d"), book=book)
    return data, book


SAMPLE, SAMPLE_BOOK = _sample_update()


def _decode_or_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        envelope.decode(data, book_for=lambda _version: SAMPLE_BOOK)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    """Whatever arrives on an update topic, the decoder answers with DecodeError or a body."""
    _decode_or_decode_error(data)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, len(SAMPLE)),
)
def test_mutated_updates_raise_only_decode_errors(edits: list[tuple[int, int]], cut: int) -> None:
    """Flipped bytes and truncations of a real update hit every validation path."""
    data = bytearray(SAMPLE[:cut] if cut < len(SAMPLE) // 2 else SAMPLE)
    for index, value in edits:
        if index < len(data):
            data[index] = value
    _decode_or_decode_error(bytes(data))


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(
        ["shape", "empty_shape", "dtype", "mode", "nnz", "scale", "count", "rice_k", "coding"]
    ),
    value=st.integers(0, 2**64 - 1),
    seed=st.integers(0, 3),
)
def test_out_of_range_tensor_fields_raise_only_decode_errors(
    field: str, value: int, seed: int
) -> None:
    """Field values no encoder produces, including huge counts and shapes, fail cleanly."""
    t = _tensor((64, 64), (0.05, 0.5, 1.0, 0.001)[seed], seed)
    msg = codec.encode_tensor(t)
    if field == "shape":
        msg.shape[0] = value
    elif field == "empty_shape":  # no elements, any other dimension
        msg.shape[0] = 0
        msg.shape[1] = value
    elif field == "scale":
        msg.scale = float(value) * (-1) ** value
    elif field in ("count", "rice_k", "coding"):
        limit = {"count": 2**64, "rice_k": 2**32, "coding": 2**31}[field]  # field widths
        setattr(msg.positions, field, value % limit)
    else:
        limit = {"dtype": 2**31, "mode": 2**31, "nnz": 2**64}[field]
        setattr(msg, field, value % limit)
    with contextlib.suppress(DecodeError):
        codec.decode_tensor(msg)

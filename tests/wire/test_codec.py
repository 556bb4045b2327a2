"""Unit tests of the sparse tensor codec: layouts, mode choice, sizes, digests and validation."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest

from device.errors import DecodeError, TensorDecodeError
from device.wire import codec, positions
from device.wire.codec import KnownMask, SparseTensor
from device.wire.pb import sparsefleet_pb2 as pb


def _random_tensor(
    rng: np.random.Generator, shape: tuple[int, ...], density: float
) -> SparseTensor:
    mask = rng.random(shape) < density
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    return SparseTensor(shape, mask, values)


def _reason(excinfo: pytest.ExceptionInfo[TensorDecodeError]) -> str:
    return excinfo.value.reason


# ---------------------------------------------------------------------------------------------
# SparseTensor
# ---------------------------------------------------------------------------------------------


def test_sparse_tensor_rejects_values_that_do_not_match_the_mask() -> None:
    """The invariant values.size == mask count is what every consumer indexes by."""
    mask = np.array([True, False, True])
    with pytest.raises(ValueError, match="2 positions"):
        SparseTensor((3,), mask, np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("mask", "values", "match"),
    [
        (np.array([1, 0, 1]), np.zeros(2, np.float32), "bool"),
        (np.array([True, True]), np.zeros(2, np.float32), "shape"),
        (np.array([True, False, True]), np.zeros(2, np.float64), "float32"),
        (np.array([True, False, True]), np.zeros((1, 2), np.float32), "1-D"),
    ],
)
def test_sparse_tensor_rejects_wrong_types_and_shapes(
    mask: np.ndarray, values: np.ndarray, match: str
) -> None:
    """Silent casts would change what travels; the constructor refuses instead."""
    with pytest.raises(ValueError, match=match):
        SparseTensor((3,), mask, values)


def test_from_dense_and_to_dense_round_trip_zero_outside_the_mask() -> None:
    """to_dense puts values back at their row-major positions and zeros elsewhere."""
    dense = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    mask = dense % 3 == 0
    t = SparseTensor.from_dense(dense, mask)
    assert t.values.tolist() == [3, 6, 9, 12]
    assert np.array_equal(t.to_dense(), np.where(mask, dense, 0))
    assert t.nnz == 4 and t.numel == 12 and t.density == pytest.approx(1 / 3)


def test_from_dense_without_mask_keeps_everything_including_zeros() -> None:
    """A dense tensor's zeros are values, not missing positions."""
    t = SparseTensor.from_dense(np.array([[0.0, 1.0], [2.0, 0.0]]))
    assert t.mask.all() and t.values.tolist() == [0, 1, 2, 0] and t.values.dtype == np.float32


def test_zero_dimensional_and_empty_tensors() -> None:
    """0-d tensors have one element; empty tensors have none and count as fully dense."""
    scalar = SparseTensor.from_dense(np.float32(2.5))
    assert scalar.shape == () and scalar.numel == 1 and scalar.to_dense() == np.float32(2.5)
    empty = SparseTensor.from_dense(np.zeros((0, 3)))
    assert empty.numel == 0 and empty.nnz == 0 and empty.density == 1.0


# ---------------------------------------------------------------------------------------------
# Digests: recomputed here from the documented canonical form
# ---------------------------------------------------------------------------------------------


def _shape_header(shape: tuple[int, ...]) -> bytes:
    return struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)


def test_mask_digest_follows_the_documented_canonical_form() -> None:
    """Both sides must compute the same 16 bytes; docs/wire-format.md is the contract."""
    mask = np.random.default_rng(1).random((5, 7)) < 0.3
    bits = np.packbits(mask.reshape(-1), bitorder="little").tobytes()
    expected = hashlib.sha256(b"sparsefleet.mask.v1\x00" + _shape_header((5, 7)) + bits)
    assert codec.mask_digest(mask) == expected.digest()[:16]


def test_mask_digest_tells_apart_shapes_and_single_bits() -> None:
    """A reshaped or one-bit-different mask must not pass as the known one."""
    mask = np.zeros((2, 3), dtype=bool)
    other = mask.copy()
    other[1, 2] = True
    digests = {
        codec.mask_digest(mask),
        codec.mask_digest(mask.reshape(3, 2)),
        codec.mask_digest(other),
    }
    assert len(digests) == 3


def test_model_digest_follows_the_documented_canonical_form() -> None:
    """Sorted names, shapes, float32 little-endian weights, a mask flag and packed bits."""
    rng = np.random.default_rng(2)
    weights: dict[str, np.ndarray] = {
        "b": rng.standard_normal(3).astype(np.float32),
        "a": rng.standard_normal((2, 2)),
    }
    masks = {"a": np.array([[True, False], [False, True]])}
    h = hashlib.sha256(b"sparsefleet.model.v1\x00" + struct.pack("<I", 2))
    for name in ("a", "b"):
        w = np.asarray(weights[name], dtype="<f4")
        h.update(
            struct.pack("<I", len(name)) + name.encode() + _shape_header(w.shape) + w.tobytes()
        )
        if name in masks:
            h.update(b"\x01" + np.packbits(masks[name].reshape(-1), bitorder="little").tobytes())
        else:
            h.update(b"\x00")
    assert codec.model_digest(weights, masks) == h.digest()
    assert codec.model_digest(dict(reversed(weights.items())), masks) == h.digest()


def test_model_digest_rejects_a_mask_without_weights() -> None:
    with pytest.raises(ValueError, match="without weights"):
        codec.model_digest({"a": np.zeros(2)}, {"b": np.ones(2, dtype=bool)})


def test_known_mask_is_read_only_and_caches_its_digest() -> None:
    """A book entry must not change under the digests that name it."""
    km = KnownMask(3, np.array([True, False]))
    assert km.digest == codec.mask_digest(np.array([True, False])) and km.count == 1
    with pytest.raises(ValueError):
        km.mask[0] = False


# ---------------------------------------------------------------------------------------------
# Value dtypes
# ---------------------------------------------------------------------------------------------

_EDGE_VALUES = np.array(
    [
        0.0,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65520.0,
        1e6,
        -1e6,
        6e-5,
        6e-8,
        3e-8,
        1e-10,
        np.inf,
        -np.inf,
        1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11,
    ],  # the last two are ties to even in fp16
    dtype=np.float32,
)


def test_fp16_conversion_matches_ieee_rounding() -> None:
    """torch does the conversion for speed; numpy's IEEE cast is the oracle."""
    values = np.concatenate([_EDGE_VALUES, np.random.default_rng(3).standard_normal(100_000)])
    values = values.astype(np.float32)
    with np.errstate(over="ignore"):  # the overflow to inf is part of what is compared
        expected = values.astype(np.float16)
    bits = codec.fp16_bits(values)
    assert np.array_equal(bits, expected.view(np.uint16))
    assert np.array_equal(codec.fp16_values(bits), expected.astype(np.float32))


def test_bf16_conversion_matches_torch_and_keeps_nan() -> None:
    """Round to nearest even as torch.bfloat16 does; a NaN whose payload sits in the low half
    must stay NaN instead of truncating to inf."""
    torch = pytest.importorskip("torch")
    values = np.concatenate(
        [_EDGE_VALUES, np.random.default_rng(4).standard_normal(10_000), [3.3895314e38]]
    ).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(codec.bf16_bits(values), expected.view(np.uint16))
    low_payload_nan = np.array([0x7F800001, 0xFF800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(codec.bf16_values(codec.bf16_bits(low_payload_nan))).all()


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    """The documented int4 layout: q in [-7, 7], two's complement nibbles, low nibble first."""
    t = SparseTensor.from_dense(np.array([1.0, -1.0, 7.0], dtype=np.float32))
    msg = codec.encode_tensor(t, "int4")
    assert msg.values == bytes([0xF1, 0x07]) and msg.scale == pytest.approx(1.0)
    assert codec.decode_tensor(msg).values.tolist() == [1.0, -1.0, 7.0]


def test_int8_refuses_non_finite_values() -> None:
    """No int8 code means NaN; silently sending garbage would hide a diverged device."""
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode_tensor(SparseTensor.from_dense(np.array([1.0, np.nan])), "int8")


def test_unknown_dtype_and_rounding_are_named_errors() -> None:
    t = SparseTensor.from_dense(np.ones(2))
    with pytest.raises(ValueError, match="unknown value dtype 'fp8'; known: fp32"):
        codec.encode_tensor(t, "fp8")
    with pytest.raises(ValueError, match="unknown rounding"):
        codec.encode_tensor(t, "int8", rounding="up")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Position sets
# ---------------------------------------------------------------------------------------------


def test_bitmap_layout_is_lsb_first() -> None:
    """Bit i of the set is bit i % 8 of byte i // 8."""
    members = np.zeros(12, dtype=bool)
    members[[0, 1, 3, 4, 6, 8, 9, 11]] = True  # dense enough that the bitmap wins
    ps = codec.encode_positions(members)
    assert ps.coding == pb.SET_CODING_BITMAP and ps.count == 8
    assert ps.data == bytes([0b01011011, 0b00001011])


def test_rice_layout_matches_the_documented_example() -> None:
    """Coordinates {3, 4, 10}, k = 1: gaps 3, 0, 5; remainder plane 1,0,1 -> 0x05; unary
    codes 01, 1, 001 -> bits 011001 LSB first -> 0x26. docs/wire-format.md has this example."""
    ps = pb.PositionSet(coding=pb.SET_CODING_RICE_GAPS, rice_k=1, count=3, data=b"\x05\x26")
    assert np.flatnonzero(codec.decode_positions(ps, 64)).tolist() == [3, 4, 10]
    gaps = np.array([3, 0, 5], dtype=np.int64)
    assert positions._rice_encode(gaps, 1) == b"\x05\x26"


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05, 0.2])
def test_rice_positions_come_within_three_percent_of_the_entropy_bound(density: float) -> None:
    """The position coder's whole point: about N * H(d) bits for a random mask."""
    n = 1 << 20
    members = np.random.default_rng(5).random(n) < density
    ps = codec.encode_positions(members)
    bound = codec.position_bound_bits(n, int(members.sum()))
    assert ps.coding == pb.SET_CODING_RICE_GAPS
    assert 8 * len(ps.data) <= 1.03 * bound + 64
    assert np.array_equal(codec.decode_positions(ps, n), members)


def test_dense_sets_use_the_bitmap_and_empty_sets_cost_nothing() -> None:
    """Above density ~0.4 no gap code beats one bit per coordinate; an empty set is 0 bytes."""
    members = np.random.default_rng(6).random(10_000) < 0.5
    assert codec.encode_positions(members).coding == pb.SET_CODING_BITMAP
    empty = codec.encode_positions(np.zeros(10_000, dtype=bool))
    assert empty.data == b"" and empty.count == 0
    assert not codec.decode_positions(empty, 10_000).any()


def test_rice_parameter_is_never_worse_than_its_neighbours() -> None:
    """The chosen k is a local optimum of the exact size for the actual gaps."""
    members = np.random.default_rng(7).random(200_000) < 0.03
    ps = codec.encode_positions(members)
    gaps = positions._gaps(np.flatnonzero(members))
    sizes = {k: codec.rice_bytes(gaps, k) for k in (ps.rice_k - 1, ps.rice_k, ps.rice_k + 1)}
    assert len(ps.data) == sizes[ps.rice_k] == min(sizes.values())


# ---------------------------------------------------------------------------------------------
# Position modes
# ---------------------------------------------------------------------------------------------


def test_all_true_mask_travels_dense_without_index_bytes() -> None:
    t = SparseTensor.from_dense(np.ones((3, 4)))
    msg = codec.encode_tensor(t, base=KnownMask(1, np.ones((3, 4), dtype=bool)))
    assert msg.mode == pb.POSITION_MODE_DENSE
    assert not msg.HasField("positions") and not msg.HasField("mask_ref")


def test_known_mask_gives_implied_positions_with_no_index_bytes() -> None:
    """The normal round: the update is values plus a fixed few dozen bytes."""
    t = _random_tensor(np.random.default_rng(8), (100, 100), 0.1)
    msg = codec.encode_tensor(t, base=KnownMask(4, t.mask.copy()))
    assert msg.mode == pb.POSITION_MODE_IMPLIED and not msg.HasField("positions")
    assert msg.ByteSize() <= 4 * t.nnz + 40
    back = codec.decode_tensor(msg, book_entry=KnownMask(4, t.mask.copy()))
    assert back.equal(t)


def test_tiny_mask_is_sent_outright_when_that_beats_the_reference() -> None:
    """A 16-byte digest is not free: a 10-element mask costs 2 bytes as a bitmap."""
    t = SparseTensor.from_dense(np.ones(10), np.arange(10) % 3 == 0)
    msg = codec.encode_tensor(t, base=KnownMask(1, t.mask.copy()))
    assert msg.mode == pb.POSITION_MODE_ABSOLUTE
    assert codec.decode_tensor(msg, book_entry=KnownMask(1, t.mask.copy())).equal(t)


def test_small_mask_change_travels_as_a_diff() -> None:
    """A FedDST readjustment flips a few positions: send those, not the whole mask."""
    rng = np.random.default_rng(9)
    base = rng.random((200, 200)) < 0.2
    mask = base.copy()
    mask.reshape(-1)[rng.choice(mask.size, 50, replace=False)] ^= True
    t = SparseTensor(mask.shape, mask, rng.standard_normal(int(mask.sum())).astype(np.float32))
    entry = KnownMask(2, base)
    msg = codec.encode_tensor(t, base=entry)
    assert msg.mode == pb.POSITION_MODE_DIFF and msg.positions.count == 50
    assert codec.decode_tensor(msg, book_entry=entry).equal(t)


def test_unrelated_base_falls_back_to_absolute_positions() -> None:
    """When the diff would be larger than the mask itself, send the mask."""
    rng = np.random.default_rng(10)
    t = _random_tensor(rng, (10_000,), 0.01)
    entry = KnownMask(1, rng.random(10_000) < 0.5)
    msg = codec.encode_tensor(t, base=entry)
    assert msg.mode == pb.POSITION_MODE_ABSOLUTE and not msg.HasField("mask_ref")
    assert codec.decode_tensor(msg).equal(t)


def test_base_of_another_shape_is_a_caller_error() -> None:
    t = SparseTensor.from_dense(np.ones(4), np.array([True, False, True, False]))
    with pytest.raises(ValueError, match="base mask shape"):
        codec.encode_tensor(t, base=KnownMask(1, np.ones(5, dtype=bool)))


# ---------------------------------------------------------------------------------------------
# Decoding validates everything
# ---------------------------------------------------------------------------------------------


def _absolute_msg() -> pb.SparseTensor:
    t = _random_tensor(np.random.default_rng(11), (64, 64), 0.05)
    msg = codec.encode_tensor(t)
    assert msg.mode == pb.POSITION_MODE_ABSOLUTE and msg.positions.coding == pb.SET_CODING_RICE_GAPS
    return msg


def _implied() -> tuple[pb.SparseTensor, KnownMask]:
    t = _random_tensor(np.random.default_rng(12), (40, 40), 0.3)
    entry = KnownMask(7, t.mask.copy())
    msg = codec.encode_tensor(t, base=entry)
    assert msg.mode == pb.POSITION_MODE_IMPLIED
    return msg, entry


def _mutate(msg: pb.SparseTensor, **fields: Any) -> pb.SparseTensor:
    out = pb.SparseTensor()
    out.CopyFrom(msg)
    for name, value in fields.items():
        if name == "shape":
            del out.shape[:]
            out.shape.extend(value)
        elif name.startswith("positions_"):
            setattr(out.positions, name.removeprefix("positions_"), value)
        else:
            setattr(out, name, value)
    return out


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"dtype": pb.VALUE_DTYPE_UNSPECIFIED}, "bad_dtype"),
        ({"dtype": 99}, "bad_dtype"),
        ({"mode": pb.POSITION_MODE_UNSPECIFIED}, "bad_mode"),
        ({"mode": 42}, "bad_mode"),
        ({"positions_coding": pb.SET_CODING_UNSPECIFIED}, "bad_coding"),
        ({"values": b"\x00" * 3}, "bad_length"),
        ({"nnz": 1}, "bad_length"),
        ({"scale": 0.5}, "bad_scale"),
        ({"positions_rice_k": 41}, "bad_positions"),
        ({"positions_count": 5000}, "bad_count"),
        ({"shape": [64, 63]}, "bad_positions"),
        ({"shape": [2] * 33}, "bad_shape"),
        ({"shape": [1 << 20, 1 << 20]}, "too_large"),
        ({"shape": [0, 1 << 63]}, "too_large"),  # no elements, but numpy cannot allocate it
        ({"positions_data": b""}, "bad_length"),
    ],
)
def test_absolute_tensor_faults_are_named(fields: dict[str, Any], reason: str) -> None:
    """Every inconsistency maps to one TensorDecodeError reason that can be counted."""
    with pytest.raises(TensorDecodeError) as excinfo:
        codec.decode_tensor(_mutate(_absolute_msg(), **fields))
    assert _reason(excinfo) == reason


def test_trailing_and_truncated_rice_data_are_rejected() -> None:
    msg = _absolute_msg()
    for data in (msg.positions.data + b"\x00", msg.positions.data[:-1]):
        with pytest.raises(TensorDecodeError):
            codec.decode_tensor(_mutate(msg, positions_data=data))


def test_nnz_must_match_the_mask() -> None:
    """A values array that does not fit the positions must never be scattered."""
    msg = _absolute_msg()
    bad = _mutate(msg, nnz=msg.nnz - 1, values=msg.values[:-4])
    with pytest.raises(TensorDecodeError) as excinfo:
        codec.decode_tensor(bad)
    assert _reason(excinfo) == "bad_count"


def test_bitmap_faults_are_named() -> None:
    members = np.zeros(10, dtype=bool)
    members[[0, 1, 2, 3, 4, 5, 9]] = True
    t = SparseTensor((10,), members, np.ones(7, dtype=np.float32))
    msg = codec.encode_tensor(t)
    assert msg.positions.coding == pb.SET_CODING_BITMAP and msg.positions.data == b"\x3f\x02"
    for data, reason in ((b"\x3f", "bad_length"), (b"\x3f\x06", "bad_positions")):
        with pytest.raises(TensorDecodeError) as excinfo:
            codec.decode_tensor(_mutate(msg, positions_data=data))
        assert _reason(excinfo) == reason


def test_implied_positions_need_the_matching_known_mask() -> None:
    """A mask reference is only as good as its version, digest and shape."""
    msg, entry = _implied()
    assert codec.decode_tensor(msg, book_entry=entry).nnz == msg.nnz
    cases = [
        (None, "unknown_mask"),
        (KnownMask(8, entry.mask.copy()), "mask_mismatch"),
        (KnownMask(7, ~entry.mask), "mask_mismatch"),
        (KnownMask(7, entry.mask.reshape(20, 80).copy()), "mask_mismatch"),
    ]
    for book_entry, reason in cases:
        with pytest.raises(TensorDecodeError) as excinfo:
            codec.decode_tensor(msg, book_entry=book_entry)
        assert _reason(excinfo) == reason


def test_int_scales_and_codes_are_checked() -> None:
    t = SparseTensor.from_dense(np.array([1.0, -2.0, 3.0]))
    msg = codec.encode_tensor(t, "int8")
    for fields, reason in (
        ({"scale": -1.0}, "bad_scale"),
        ({"scale": float("nan")}, "bad_scale"),
        ({"values": b"\x80\x00\x01"}, "bad_values"),
    ):
        with pytest.raises(TensorDecodeError) as excinfo:
            codec.decode_tensor(_mutate(msg, **fields))
        assert _reason(excinfo) == reason


def test_dense_mode_with_a_short_payload_fails_before_allocating() -> None:
    """A 30-byte message that claims two billion elements must not allocate gigabytes."""
    msg = pb.SparseTensor(
        shape=[1 << 31], dtype=pb.VALUE_DTYPE_FP32, mode=pb.POSITION_MODE_DENSE, nnz=1 << 31
    )
    tracemalloc.start()
    try:
        with pytest.raises(TensorDecodeError):
            codec.decode_tensor(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_absolute_positions_over_a_huge_shape_are_absurd_for_a_tiny_payload() -> None:
    """An empty Rice set is legal but must not make us build a 2 GiB mask from 20 bytes."""
    msg = pb.SparseTensor(
        shape=[1 << 31], dtype=pb.VALUE_DTYPE_FP32, mode=pb.POSITION_MODE_ABSOLUTE
    )
    msg.positions.coding = pb.SET_CODING_RICE_GAPS
    tracemalloc.start()
    try:
        with pytest.raises(TensorDecodeError) as excinfo:
            codec.decode_tensor(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _reason(excinfo) == "too_large" and peak < 1 << 20


def test_non_finite_values_decode_faithfully() -> None:
    """Finiteness is the fleet manager's check; the codec must carry NaN and inf unchanged."""
    t = SparseTensor.from_dense(np.array([np.nan, np.inf, -1.0], dtype=np.float32))
    for dtype in ("fp32", "fp16", "bf16"):
        back = codec.decode_tensor(codec.encode_tensor(t, dtype))
        assert np.isnan(back.values[0]) and back.values[1] == np.inf and back.values[2] == -1.0


def test_decode_errors_are_decode_errors() -> None:
    """Callers catch one family: TensorDecodeError is a DecodeError (and a ValueError)."""
    assert issubclass(TensorDecodeError, DecodeError) and issubclass(DecodeError, ValueError)


def test_tensor_bound_adds_position_entropy_only_when_positions_travel() -> None:
    t = _random_tensor(np.random.default_rng(13), (1000,), 0.1)
    implied = codec.tensor_bound_bits(t, "int8", positions=False)
    sent = codec.tensor_bound_bits(t, "int8", positions=True)
    assert implied == 8 * t.nnz
    assert sent == pytest.approx(implied + 1000 * codec.binary_entropy(t.nnz / 1000))

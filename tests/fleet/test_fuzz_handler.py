"""Fuzzing the decoder and the fleet manager's message handler with hypothesis.

A device's bytes are untrusted input (DESIGN section 7). Two promises are fuzzed here, with
random bytes, byte-level mutations of valid messages and protobuf-level mutations of their fields
(shapes, dtypes, position modes, counts, mask references, names, routing fields):

- ``envelope.decode`` (and ``envelope.peek``) raise nothing but ``DecodeError``, and what they
  return is structurally sound (every ``SparseTensor`` keeps its invariants), with memory bounded
  by the payload size (``memory_bound``);
- ``Runner._handle`` with an open round never raises, never falls back on its last-resort
  ``except Exception`` (every bad message takes the intended rejection path), acknowledges every
  message exactly once, records at most one outcome (accepted or rejected with a reason) and
  never touches the global model.

Examples are derandomised and few enough that the file runs in seconds; ``database=None`` keeps
hypothesis from writing an example database into the work tree. The last test is a fixed case
these tests led to: an update that arrives before the runner has a model is kept, not dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.errors import DecodeError
from device.wire import envelope
from device.wire.codec import (
    ELEMENTS_PER_PAYLOAD_BYTE,
    FREE_ELEMENTS,
    KnownMask,
    SparseTensor,
    model_digest,
)
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import (
    DeviceStatus,
    DeviceUpdate,
    Envelope,
    JobEvent,
    JobState,
)
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.topics import Topics
from device.wire.transport import Message
from fleet.runtime.collection import RoundState
from fleet.runtime.runner import Runner, RunSpec
from fleet.state.store import Store
from fleet.strategies.base import GlobalModel

RUN = "fz"
SELECTED = ("dev-a", "dev-b")
T = Topics()

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANDLER_FUZZ = settings(FUZZ, max_examples=150)

MIB = 1024 * 1024


def memory_bound(payload_bytes: int, model_bytes: int = 0) -> int:
    """Most bytes that handling a payload of ``payload_bytes`` may allocate at its peak.

    From the codec's limits, not from measurement: a tensor decoded from ABSOLUTE positions may
    have up to ``max(FREE_ELEMENTS, ELEMENTS_PER_PAYLOAD_BYTE * payload)`` elements (sparse
    positions are that compact on purpose), and its bool mask costs a byte per element; the factor
    2 covers one transient copy of it. Values cost at most 8 bytes of float32 per payload byte
    (int4 packs two values into a byte) and coordinate arrays 8 bytes per coded coordinate, with
    at most 8 coordinates per payload byte; 64 per payload byte covers both with their
    transients (measured: about 15 for int4 and 11 for fp16 dense tensors). The handler adds
    model-sized arrays (reconstructed weights) and a fixed 1 MiB for Python objects, the SQLite
    write and logging. A decoder that allocated what a header claims (2**31 elements from a
    50-byte message) would break this bound by two orders of magnitude.
    """
    mask_elements = max(FREE_ELEMENTS, ELEMENTS_PER_PAYLOAD_BYTE * payload_bytes)
    return 2 * mask_elements + 64 * payload_bytes + 4 * model_bytes + MIB


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced allocation while ``fn`` runs (numpy's buffers are traced too)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- the valid messages that mutations start from ----------------------------------------------


def _models() -> dict[str, GlobalModel]:
    """The mlp's initial global model, dense (FedAvg) and with FedDST's masks."""
    from fleet.runtime.runner import initial_weights
    from fleet.strategies import create_strategy

    weights, prunable = initial_weights("mlp", 0)
    out = {}
    for name in ("fedavg", "feddst"):
        strategy = create_strategy(name, clients_per_round=2)
        out[name] = strategy.initialize(weights, "mlp", prunable, np.random.default_rng(0))
    return out


MODELS = _models()


def book_of(model: GlobalModel) -> dict[str, KnownMask]:
    return {name: KnownMask(model.version, mask) for name, mask in model.masks.items()}


def valid_updates(model: GlobalModel) -> list[bytes]:
    """Encoded updates a device could send for ``model``: deltas on the global mask (IMPLIED
    positions) and, when the model is pruned, one with a moved mask (DIFF positions)."""
    rng = np.random.default_rng(1)
    digest = model_digest(model.weights, model.masks)
    book = book_of(model)
    deltas = {}
    moved = {}
    for name, w in model.weights.items():
        mask = model.masks.get(name, np.ones(w.shape, dtype=np.bool_))
        values = rng.normal(0, 0.01, int(mask.sum())).astype(np.float32)
        deltas[name] = SparseTensor(w.shape, mask, values)
        if name in model.masks:
            # Swap one kept and one dropped coordinate: the count (FedDST's budget) stays.
            flat = mask.reshape(-1).copy()
            kept, free = np.flatnonzero(flat), np.flatnonzero(~flat)
            flat[kept[0]], flat[free[0]] = False, True
            new_mask = flat.reshape(w.shape)
            moved[name] = SparseTensor(w.shape, new_mask, values)
        else:
            moved[name] = deltas[name]
    out = []
    for body_deltas in (deltas, moved) if model.masks else (deltas,):
        update = DeviceUpdate(
            model.version, digest, body_deltas, 100, train_s=1.0, metrics={"train_loss": 0.5}
        )
        env = Envelope(update, RUN, 1, SELECTED[0], correlation_id=f"{RUN}/1/{SELECTED[0]}")
        out.append(envelope.encode(env, book=book))
    return out


VALID = {name: valid_updates(model) for name, model in MODELS.items()}
OTHER_MESSAGES = [
    envelope.encode(Envelope(JobEvent(JobState.TRAINING, "x"), RUN, 1, SELECTED[0])),
    envelope.encode(Envelope(DeviceStatus(True, 1, "1.0", dataset_size=10), device_id="dev-a")),
]


# -- mutations ------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, draw: st.DataObject) -> bytes:
    """One to three byte-level edits: flip, truncate, insert, delete, duplicate or splice."""
    out = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 3), label="edits")):
        kind = draw.draw(
            st.sampled_from(["flip", "truncate", "insert", "delete", "dup", "splice"]), label="k"
        )
        n = len(out)
        if n == 0:
            out += draw.draw(st.binary(min_size=1, max_size=16))
            continue
        at = draw.draw(st.integers(0, n - 1), label="at")
        if kind == "flip":
            out[at] ^= draw.draw(st.integers(1, 255), label="xor")
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw.draw(st.binary(min_size=1, max_size=32), label="ins")
        elif kind == "delete":
            del out[at : at + draw.draw(st.integers(1, 64), label="len")]
        elif kind == "dup":
            out[at:at] = out[at : at + draw.draw(st.integers(1, 64), label="len")]
        else:
            other = draw.draw(st.sampled_from([*VALID["feddst"], *OTHER_MESSAGES]), label="o")
            cut = draw.draw(st.integers(0, len(other)), label="cut")
            out = out[:at] + bytearray(other[cut:])
    return bytes(out)


_U64 = st.one_of(
    st.integers(0, 8),
    st.sampled_from([2**24, 2**31, 2**31 + 1, 2**32, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
_ENUM = st.integers(0, 7)  # every enum here has values 0..5 at most; 6 and 7 are unknown


def _mutate_tensor(t: pb.SparseTensor, draw: st.DataObject) -> None:
    field = draw.draw(
        st.sampled_from(
            [
                *["shape", "dtype", "mode", "nnz", "values", "value", "value"],
                *["scale", "ref", "positions", "clear"],
            ]
        ),
        label="tensor field",
    )
    if field == "shape":
        del t.shape[:]
        t.shape.extend(draw.draw(st.lists(_U64, max_size=4), label="shape"))
    elif field == "dtype":
        t.dtype = draw.draw(_ENUM, label="dtype")  # type: ignore[assignment]
    elif field == "mode":
        t.mode = draw.draw(_ENUM, label="mode")  # type: ignore[assignment]
    elif field == "nnz":
        t.nnz = draw.draw(_U64, label="nnz")
    elif field == "values":
        cut = draw.draw(st.integers(0, len(t.values) + 8), label="cut")
        t.values = t.values[:cut] + draw.draw(st.binary(max_size=8), label="tail")
    elif field == "value" and len(t.values) >= 4:
        # Same length, one value replaced: NaN, Inf and huge numbers pass the decoder.
        at = 4 * draw.draw(st.integers(0, len(t.values) // 4 - 1), label="value index")
        word = draw.draw(st.binary(min_size=4, max_size=4), label="value bytes")
        t.values = t.values[:at] + word + t.values[at + 4 :]
    elif field == "scale":
        t.scale = draw.draw(st.floats(width=32), label="scale")
    elif field == "ref":
        t.mask_ref.version = draw.draw(_U64, label="ref version")
        if draw.draw(st.booleans(), label="digest"):
            t.mask_ref.digest = draw.draw(st.binary(max_size=20), label="ref digest")
    elif field == "positions":
        ps = t.positions
        ps.coding = draw.draw(_ENUM, label="coding")  # type: ignore[assignment]
        ps.count = draw.draw(_U64, label="count")
        ps.rice_k = draw.draw(st.integers(0, 70), label="rice_k")
        ps.data = draw.draw(st.binary(max_size=64), label="pos data")
    else:
        t.ClearField(draw.draw(st.sampled_from(["mask_ref", "positions", "values"]), label="c"))


def mutate_fields(data: bytes, draw: st.DataObject) -> bytes:
    """One to three protobuf-level edits of a valid envelope's routing, update or tensor fields."""
    env = pb.Envelope()
    env.ParseFromString(data)
    for _ in range(draw.draw(st.integers(1, 3), label="edits")):
        where = draw.draw(
            st.sampled_from(["routing", "update", "tensor", "tensors", "kind"]), label="where"
        )
        u = env.update
        if where == "routing":
            what = draw.draw(st.sampled_from(["schema", "round", "device", "run"]), label="field")
            if what == "schema":
                env.schema_version = draw.draw(st.sampled_from([0, 2, 2**32 - 1]), label="schema")
            elif what == "round":
                env.round = draw.draw(st.sampled_from([0, 2, 2**64 - 1]), label="round")
            elif what == "device":
                env.device_id = draw.draw(st.sampled_from(["", SELECTED[1], "dev-z"]), label="d")
            else:
                env.run_id = draw.draw(st.sampled_from(["", "other"]), label="run")
        elif where == "update":
            what = draw.draw(
                st.sampled_from(["version", "examples", "digest", "metric"]), label="update field"
            )
            if what == "version":
                u.model_version = draw.draw(_U64, label="model version")
            elif what == "examples":
                u.num_examples = draw.draw(_U64, label="num_examples")
            elif what == "digest":
                u.model_digest = draw.draw(st.binary(max_size=40), label="model digest")
            else:
                key = draw.draw(st.text(max_size=4), label="metric")
                u.metrics[key] = draw.draw(st.floats(), label="metric value")
        elif where == "tensor" and len(u.deltas):
            i = draw.draw(st.integers(0, len(u.deltas) - 1), label="tensor")
            _mutate_tensor(u.deltas[i].tensor, draw)
        elif where == "tensors" and len(u.deltas):
            i = draw.draw(st.integers(0, len(u.deltas) - 1), label="tensor")
            op = draw.draw(st.sampled_from(["drop", "rename", "twice", "importance"]), label="op")
            if op == "drop":
                del u.deltas[i]
            elif op == "rename":
                names = [d.name for d in u.deltas]
                u.deltas[i].name = draw.draw(st.sampled_from([*names, "", "ghost"]), label="n")
            elif op == "twice":
                u.deltas.add().CopyFrom(u.deltas[i])
            else:
                u.importance.add().CopyFrom(u.deltas[i])
        elif where == "kind":
            env.event.state = draw.draw(_ENUM, label="state")  # type: ignore[assignment]
    return env.SerializeToString()


ALL_VALID = [*VALID["fedavg"], *VALID["feddst"]]


def fuzzed_payload(draw: st.DataObject, bases: list[bytes] = ALL_VALID) -> bytes:
    """Random bytes, a byte-mutated valid message, or a field-mutated valid update (mostly one
    of ``bases``, sometimes one meant for the other model)."""
    # Field-level edits reach the deepest checks (positions, counts, mask references), so they
    # get half of the examples.
    source = draw.draw(st.sampled_from(["random", "bytes", "fields", "fields"]), label="source")
    if source == "random":
        return draw.draw(st.binary(max_size=2048), label="random")
    base = draw.draw(
        st.one_of(st.sampled_from(bases), st.sampled_from(bases), st.sampled_from(ALL_VALID)),
        label="base",
    )
    if source == "bytes":
        return mutate_bytes(base, draw)
    return mutate_fields(base, draw)


# -- the decoder ----------------------------------------------------------------------------------


def _book_for(version: int) -> dict[str, KnownMask] | None:
    model = MODELS["feddst"]
    return book_of(model) if version == model.version else None


def _check_decoded(env: Envelope) -> None:
    """What decode returns must be sound: tensors keep the SparseTensor invariants."""
    body = env.body
    if isinstance(body, DeviceUpdate):
        for name, t in body.deltas.items():
            assert t.mask.dtype == np.bool_ and t.mask.shape == t.shape, name
            assert t.values.dtype == np.float32 and t.values.ndim == 1, name
            assert t.values.size == int(np.count_nonzero(t.mask)), name
        for name, g in body.importance.items():
            assert g.dtype == np.float32, name


def _decode_bounded(payload: bytes) -> Envelope | None:
    """Decode under tracemalloc: the envelope (None when refused with a ``DecodeError``); fails
    the test for any other exception or a peak above ``memory_bound``."""
    outcome: list[Envelope] = []

    def decode() -> None:
        try:
            outcome.append(envelope.decode(payload, book_for=_book_for))
        except DecodeError as exc:
            assert exc.reason, "every decode error carries a reason code"

    peak = peak_bytes(decode)
    assert peak <= memory_bound(len(payload)), (peak, len(payload))
    return outcome[0] if outcome else None


def test_the_valid_messages_the_fuzzers_start_from_decode() -> None:
    """Control: the unmutated messages decode, so refusals below come from the mutations."""
    for payload in [*VALID["fedavg"], *VALID["feddst"], *OTHER_MESSAGES]:
        env = _decode_bounded(payload)
        assert env is not None
        _check_decoded(env)


@FUZZ
@given(st.data())
def test_decode_raises_only_decode_errors_and_stays_bounded(data: st.DataObject) -> None:
    """Whatever the bytes, ``decode`` and ``peek`` either return a sound message or raise our
    ``DecodeError`` (never IndexError, MemoryError, protobuf's own errors, ...), and decoding
    allocates no more than the payload size allows."""
    payload = fuzzed_payload(data)
    env = _decode_bounded(payload)
    if env is not None:
        _check_decoded(env)
    with contextlib.suppress(DecodeError):
        envelope.peek(payload)


def test_a_tiny_message_claiming_huge_tensors_allocates_nothing_of_that_size() -> None:
    """The classic decompression bomb: a header that claims 2**31 elements must be refused
    before anything of that size is allocated (the fuzz bound allows 32 MiB; this stays under
    1 MiB)."""
    env = pb.Envelope(schema_version=1, run_id=RUN, round=1, device_id=SELECTED[0])
    t = env.update.deltas.add(name="fc1.weight").tensor
    t.shape.extend([2**16, 2**15])
    t.dtype = pb.VALUE_DTYPE_FP32
    t.mode = pb.POSITION_MODE_ABSOLUTE
    t.nnz = 1
    t.values = b"\0" * 4
    t.positions.coding = pb.SET_CODING_RICE_GAPS
    t.positions.count = 1
    t.positions.rice_k = 30
    t.positions.data = b"\x01\0\0\0\0"
    payload = env.SerializeToString()
    assert len(payload) < 100
    errors: list[DecodeError] = []

    def decode() -> None:
        try:
            envelope.decode(payload)
        except DecodeError as exc:
            errors.append(exc)

    assert peak_bytes(decode) < MIB
    assert errors and errors[0].reason == "too_large"


# -- the runner's handler --------------------------------------------------------------------------


@dataclass
class Handler:
    """A runner with round 1 open over the in-memory transport, as the round loop has it while
    it collects updates."""

    runner: Runner
    state: RoundState
    transport: MemoryTransport
    store: Store
    errors: list[logging.LogRecord]


class _Errors(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(params=["fedavg", "feddst"])
def handler(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Handler]:
    strategy: str = request.param
    spec = RunSpec(
        run_id=RUN,
        model_name="mlp",
        strategy=strategy,
        rounds=1,
        clients_per_round=len(SELECTED),
        strategy_options={"clients_per_round": len(SELECTED)},
        max_update_bytes=256 * 1024,
    )
    transport = MemoryTransport(MemoryBroker(), "fleet-manager")
    store = Store(tmp_path)
    runner = Runner(spec, transport, store)
    runner._start_new()  # version 0 of the model, checkpointed, as run() starts
    deadline = time.time() + 3600
    store.open_round(RUN, 1, selected=list(SELECTED), deadline=deadline, model_version_in=0)
    records: list[logging.LogRecord] = []
    capture = _Errors(records)
    logger = logging.getLogger("fleet.runtime.runner")
    logger.addHandler(capture)
    try:
        yield Handler(runner, RoundState(1, SELECTED, deadline), transport, store, records)
    finally:
        logger.removeHandler(capture)
        store.close()


_TOPICS = [
    T.dev_update(SELECTED[0], RUN, 1),
    T.dev_update(SELECTED[1], RUN, 1),
    T.dev_update("dev-z", RUN, 1),
    T.dev_update(SELECTED[0], RUN, 2),
    T.dev_update(SELECTED[0], RUN, 0),
    T.dev_status(SELECTED[0]),
    T.dev_events(SELECTED[1]),
    "fl/v1/dev/dev-a/up/fz",
    "fl/v1/dev/dev-a/up/fz/1/x/y",
    "elsewhere",
]


def _handle_one(h: Handler, message: Message) -> None:
    runner = h.runner
    assert runner.model is not None
    before_digest = runner.model_digest
    weights_before = {n: w.copy() for n, w in runner.model.weights.items()}
    results_before = len(h.state.results)
    rejected_before = sum(h.store.rejection_counts(run_id=RUN).values())
    acked_before = h.transport.acked
    model_bytes = sum(w.nbytes for w in weights_before.values())

    peak = peak_bytes(lambda: runner._handle(message, h.state))

    assert not h.errors, [r.getMessage() for r in h.errors]  # the last resort never fired
    assert h.transport.acked == acked_before + 1  # acknowledged exactly once
    accepted = len(h.state.results) - results_before
    rejected = sum(h.store.rejection_counts(run_id=RUN).values()) - rejected_before
    assert (accepted, rejected) in ((0, 0), (1, 0), (0, 1)), (accepted, rejected)
    assert runner.model_digest == before_digest
    assert all(np.array_equal(weights_before[n], w) for n, w in runner.model.weights.items())
    assert peak <= memory_bound(len(message.payload), model_bytes), (peak, len(message.payload))


def test_handler_never_raises_and_accounts_for_every_message(handler: Handler) -> None:
    """Fuzzed payloads on update, status and event topics (and malformed topics) go through the
    intended paths: acknowledged once, accepted or rejected at most once, the model untouched,
    memory bounded by the payload size."""

    @HANDLER_FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        # Most messages go where the base update belongs, so that mutations reach the checks
        # behind routing; a few are retained, which no update may be.
        topic = data.draw(st.one_of(st.just(_TOPICS[0]), st.sampled_from(_TOPICS)), label="topic")
        payload = fuzzed_payload(data, VALID[handler.runner.spec.strategy])
        retain = data.draw(st.integers(0, 9), label="retain") == 0
        _handle_one(handler, Message(topic, payload, qos=1, retain=retain, ack_ids=(1,)))
        # Forget an accepted update (its stored row stays): the next valid-looking one goes
        # through every check again instead of stopping at the duplicate check.
        handler.state.results.clear()

    run()


def test_handler_accepts_the_valid_update_it_is_fuzzed_around(handler: Handler) -> None:
    """Control for the fuzz test: the unmutated update is accepted, so the rejections the fuzz
    test sees come from the mutations, not from a broken base message."""
    strategy = handler.runner.spec.strategy
    payload = VALID[strategy][0]
    _handle_one(handler, Message(T.dev_update(SELECTED[0], RUN, 1), payload, qos=1, ack_ids=(1,)))
    assert SELECTED[0] in handler.state.results
    assert handler.store.rejection_counts(run_id=RUN) == {}


def test_an_update_before_the_model_exists_waits_for_the_first_round(tmp_path: Path) -> None:
    """After a restart the broker redelivers unacknowledged updates as soon as the fleet manager
    subscribes, before ``run()`` has restored the model: they must wait for the first round,
    unacknowledged, not be dropped by the handler's last resort."""
    spec = RunSpec(RUN, "mlp", "fedavg", rounds=1, clients_per_round=1)
    transport = MemoryTransport(MemoryBroker(), "fleet-manager")
    records: list[logging.LogRecord] = []
    capture = _Errors(records)
    logging.getLogger("fleet.runtime.runner").addHandler(capture)
    try:
        with Store(tmp_path) as store:
            runner = Runner(spec, transport, store)
            message = Message(
                T.dev_update(SELECTED[0], RUN, 1), VALID["fedavg"][0], qos=1, ack_ids=(7,)
            )
            runner._handle(message, None)
            assert runner._deferred == [message]
            assert transport.acked == 0
            assert store.rejection_counts() == {}
    finally:
        logging.getLogger("fleet.runtime.runner").removeHandler(capture)
    assert not records

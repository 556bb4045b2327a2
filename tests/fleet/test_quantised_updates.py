"""Quantised updates at the fleet manager: bad scales are rejected by reason; precision options."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.errors import ConfigError
from device.wire import envelope
from device.wire.codec import KnownMask, SparseTensor, model_digest
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import DeviceUpdate, Envelope, LocalTraining, ValueDType
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.topics import Topics
from device.wire.transport import Message
from fleet.runtime.collection import RoundState
from fleet.runtime.runner import Runner, RunSpec
from fleet.state.store import Store
from fleet.strategies import create_strategy
from fleet.strategies.base import RoundConfig

RUN = "q"
DEVICE = "dev-a"
T = Topics()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[tuple[Runner, RoundState, Store]]:
    spec = RunSpec(
        run_id=RUN,
        model_name="mlp",
        strategy="feddst",
        rounds=1,
        clients_per_round=1,
        strategy_options={"clients_per_round": 1, "upload_values": "int8"},
    )
    store = Store(tmp_path)
    runner = Runner(spec, MemoryTransport(MemoryBroker(), "fleet-manager"), store)
    runner._start_new()
    deadline = time.time() + 3600
    store.open_round(RUN, 1, selected=[DEVICE], deadline=deadline, model_version_in=0)
    try:
        yield runner, RoundState(1, (DEVICE,), deadline), store
    finally:
        store.close()


def int8_update(runner: Runner) -> pb.Envelope:
    """A well-formed int8 update for round 1, parsed back into protobuf for tampering."""
    model = runner.model
    assert model is not None
    rng = np.random.default_rng(0)
    deltas = {}
    for name, w in model.weights.items():
        mask = model.masks.get(name, np.ones(w.shape, dtype=np.bool_))
        values = rng.normal(0, 0.01, int(mask.sum())).astype(np.float32)
        deltas[name] = SparseTensor(w.shape, mask, values)
    update = DeviceUpdate(model.version, model_digest(model.weights, model.masks), deltas, 10)
    book = {name: KnownMask(model.version, mask) for name, mask in model.masks.items()}
    payload = envelope.encode(
        Envelope(update, RUN, 1, DEVICE, correlation_id=f"{RUN}/1/{DEVICE}"),
        book=book,
        dtype=ValueDType.INT8,
    )
    msg = pb.Envelope()
    msg.ParseFromString(payload)
    return msg


def handle(runner: Runner, state: RoundState, msg: pb.Envelope) -> None:
    payload = msg.SerializeToString()
    runner._handle(Message(T.dev_update(DEVICE, RUN, 1), payload, qos=1, ack_ids=(1,)), state)


def test_a_well_formed_int8_update_is_accepted(
    runner: tuple[Runner, RoundState, Store],
) -> None:
    """Control: the rejections below come from the scale, not from a broken base message."""
    r, state, store = runner
    handle(r, state, int8_update(r))
    assert DEVICE in state.results
    assert store.rejection_counts(run_id=RUN) == {}


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5])
def test_a_bad_scale_is_rejected_by_reason_and_never_reaches_the_aggregate(
    runner: tuple[Runner, RoundState, Store], scale: float
) -> None:
    """NaN or infinite scales would poison the mean; a zero scale with non-zero codes would
    silently erase the device's update. Each is rejected, counted as bad_scale, and the model
    and the round's results stay as they were."""
    r, state, store = runner
    assert r.model is not None
    before = {n: w.copy() for n, w in r.model.weights.items()}
    msg = int8_update(r)
    tensor = msg.update.deltas[0].tensor
    assert tensor.dtype == pb.VALUE_DTYPE_INT8 and any(tensor.values)
    tensor.scale = scale
    handle(r, state, msg)
    assert DEVICE not in state.results
    assert store.rejection_counts(run_id=RUN) == {"decode:bad_scale": 1}
    assert all(np.array_equal(before[n], w) for n, w in r.model.weights.items())


def test_a_zero_scale_with_all_zero_codes_is_a_valid_all_zero_delta(
    runner: tuple[Runner, RoundState, Store],
) -> None:
    """What the encoder sends for an all-zero tensor must stay accepted."""
    r, state, store = runner
    msg = int8_update(r)
    tensor = msg.update.deltas[0].tensor
    tensor.values = bytes(len(tensor.values))
    tensor.scale = 0.0
    handle(r, state, msg)
    assert DEVICE in state.results
    assert store.rejection_counts(run_id=RUN) == {}


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "feddst", "prunefl"])
def test_every_strategy_carries_both_precisions_into_the_round_command(strategy: str) -> None:
    s = create_strategy(strategy, clients_per_round=1, upload_values="int8", download_values="fp16")
    assert s.options.upload_values is ValueDType.INT8  # type: ignore[attr-defined]
    assert s.options.upload_dtype is ValueDType.INT8  # type: ignore[attr-defined]
    config = RoundConfig(
        selected=("d",),
        training=LocalTraining(),
        upload_dtype=s.options.upload_values,  # type: ignore[attr-defined]
        download_values=s.options.download_values,  # type: ignore[attr-defined]
    )
    command = config.command(1, b"x" * 32)
    assert (command.upload_dtype, command.download_dtype) == (ValueDType.INT8, ValueDType.FP16)
    decoded = envelope.decode(envelope.encode(Envelope(command, RUN, 1, "d"))).body
    assert decoded == command


def test_upload_dtype_stays_an_alias_of_upload_values() -> None:
    s = create_strategy("feddst", clients_per_round=1, upload_dtype="fp16")
    assert s.options.upload_values is ValueDType.FP16  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="disagree"):
        create_strategy("feddst", clients_per_round=1, upload_dtype="fp16", upload_values="int8")


def test_an_unknown_precision_option_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"download_values must be one of .*int8.*got 'int9'"):
        create_strategy("fedavg", clients_per_round=1, download_values="int9")

"""Bad updates sent over a real mosquitto never touch the global model (DESIGN section 7).

A forger publishes, on the update topic of a selected device, every kind of bad input the issue
lists while the round is open: bytes that are not protobuf, a message of the wrong kind, an
unknown schema version, wrong tensor names, shapes and dtypes, value counts that do not match
the mask, positions outside the device's mask (FedAvg: any partial mask), NaN and Inf, stale,
late, future rounds and another run, a device id that is not the topic's, an oversized message,
a duplicate, a retained update, and chunk sets with a wrong digest or missing chunks. Every one is
rejected with a reason that is logged and counted for the device whose topic it came on, and
the global model after every round is bit-identical to the same run without the forger.

Deterministic rounds: of the five simulated devices one never answers (``Faults.never_answer``),
and the forger speaks for it. The forger's messages come over one connection, so mosquitto
delivers them in order; after its forgeries it publishes a FAILED event for the silent device,
which closes the round ("all answered") only once everything before it has been judged. The
clean run closes its rounds with the same event, so both runs aggregate the same updates and no
deadline is involved.

Chunk sets that cannot be reassembled never reach the runner: the transport's ``Reassembler``
drops them, logs why and counts them (``dropped_count``); they cannot be counted per device,
because a device id is only known once a payload is whole.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from device.errors import DecodeError, ValidationError
from device.wire import envelope
from device.wire.broker import MosquittoBroker
from device.wire.chunking import ReassemblyLimits
from device.wire.codec import SparseTensor, model_digest
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import (
    Chunk,
    ChunkManifest,
    DeviceUpdate,
    Envelope,
    JobEvent,
    JobState,
)
from device.wire.mqtt import MqttTransport
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.topics import Topics, chunk_topic
from device.wire.transport import Transport
from fleet.runtime.runner import RoundReport, Runner, RunSpec, initial_weights
from fleet.sim.core import (
    Faults,
    PartitionedData,
    SimSpec,
    device_ids,
    fault_plan,
    partition_lookup,
    start_agents,
)
from fleet.state.store import Store
from fleet.strategies import create_strategy
from fleet.strategies.base import GlobalModel
from fleet.strategies.validate import Expectation, check_routing, reconstruct

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

T = Topics()
DEVICES = 5
ROUNDS = 3
FORGE_ROUND = 3  # rounds 1 and 2 before it make stale (1) and late (2) updates possible
MAX_UPDATE_BYTES = 48 * 1024  # honest mlp updates are about 20 KB
SIM = SimSpec(devices=DEVICES, dataset="digits", faults=Faults(never_answer=1 / DEVICES))
SILENT = next(d for d, kind in fault_plan(SIM).items() if kind == "never")


def run_spec(run_id: str) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="fedavg",
        rounds=ROUNDS,
        clients_per_round=DEVICES,
        strategy_options={
            "clients_per_round": DEVICES,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        },
        # Rounds close when every device has answered (the forger's FAILED event for the silent
        # one); the deadline is only a safety net.
        round_timeout_s=90.0,
        max_update_bytes=MAX_UPDATE_BYTES,
    )


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- forged messages -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Forgery:
    """One forged publish and what must come of it: ``reason`` counted for ``device`` (None: the
    runner never sees it)."""

    name: str
    topic: str
    payload: bytes
    reason: str | None
    device: str = SILENT
    retain: bool = False


def zero_update(model: GlobalModel, digest: bytes) -> DeviceUpdate:
    """A well-formed update that changes nothing: the base every forgery differs from by one
    defect (``Forged.controls`` checks that the runner's validation accepts the base)."""
    deltas = {n: SparseTensor.from_dense(np.zeros_like(w)) for n, w in model.weights.items()}
    return DeviceUpdate(model.version, digest, deltas, num_examples=10)


def edit_tensor(payload: bytes, name: str, edit: Callable[[pb.SparseTensor], None]) -> bytes:
    """``payload`` with the protobuf of tensor ``name`` edited: inconsistencies our encoder
    refuses to produce."""
    msg = pb.Envelope()
    msg.ParseFromString(payload)
    for nt in msg.update.deltas:
        if nt.name == name:
            edit(nt.tensor)
    return msg.SerializeToString()


def padded(payload: bytes, size: int) -> bytes:
    """``payload`` grown to about ``size`` bytes by an unknown field (number 1000) that protobuf
    skips: a valid update, too large."""
    pad = size - len(payload)
    key = (1000 << 3) | 2
    return payload + bytes([key & 0x7F | 0x80, key >> 7]) + _varint(pad) + b"\0" * pad


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def forgeries(
    run_id: str,
    round_: int,
    model: GlobalModel,
    digest: bytes,
    victim: str,
    victim_payload: bytes,
) -> list[Forgery]:
    """Everything the forger sends in round ``round_`` (module docstring)."""
    base = zero_update(model, digest)
    names = sorted(model.weights)
    first = names[0]
    shape = model.weights[first].shape
    here = T.dev_update(SILENT, run_id, round_)

    def enc(body: Any, *, round_n: int = round_, run: str = run_id, device: str = SILENT) -> bytes:
        return envelope.encode(Envelope(body, run, round_n, device))

    def deltas(**changed: SparseTensor) -> DeviceUpdate:
        return dataclasses.replace(base, deltas={**base.deltas, **changed})

    full = np.ones(shape, dtype=np.float32)
    partial = np.ones(shape, dtype=np.bool_)
    partial.reshape(-1)[::2] = False
    good = enc(base)
    renamed = dict(base.deltas)
    renamed["ghost.weight"] = renamed.pop(first)
    missing = dict(base.deltas)
    del missing[first]
    n = int(np.prod(shape))

    def fewer_values(t: pb.SparseTensor) -> None:
        t.nnz = n - 1
        t.values = t.values[: 4 * (n - 1)]

    def short_values(t: pb.SparseTensor) -> None:
        t.values = t.values[:-4]

    def unknown_dtype(t: pb.SparseTensor) -> None:
        t.dtype = 99  # type: ignore[assignment]

    victim_env = envelope.decode(victim_payload)
    assert isinstance(victim_env.body, DeviceUpdate)
    different = envelope.encode(
        dataclasses.replace(
            victim_env,
            body=dataclasses.replace(
                victim_env.body, num_examples=victim_env.body.num_examples + 1
            ),
        )
    )
    victim_topic = T.dev_update(victim, run_id, round_)
    return [
        Forgery("not protobuf", here, b"\xff" * 32, "decode:not_protobuf"),
        Forgery("wrong kind", here, enc(JobEvent(JobState.UPLOADED)), "wrong_kind"),
        Forgery(
            "schema version",
            here,
            envelope.encode(Envelope(base, run_id, round_, SILENT, schema_version=2)),
            "decode:wrong_schema",
        ),
        Forgery(
            "unknown tensor name",
            here,
            enc(dataclasses.replace(base, deltas=renamed)),
            "wrong_tensors",
        ),
        Forgery(
            "missing tensor", here, enc(dataclasses.replace(base, deltas=missing)), "wrong_tensors"
        ),
        Forgery(
            "wrong shape",
            here,
            enc(deltas(**{first: SparseTensor.from_dense(np.zeros((3, 3), np.float32))})),
            "wrong_shape",
        ),
        Forgery("unknown dtype", here, edit_tensor(good, first, unknown_dtype), "decode:bad_dtype"),
        Forgery(
            "values fewer than the mask",
            here,
            edit_tensor(good, first, fewer_values),
            "decode:bad_count",
        ),
        Forgery(
            "value bytes short", here, edit_tensor(good, first, short_values), "decode:bad_length"
        ),
        Forgery(
            "positions outside the global mask",
            here,
            enc(deltas(**{first: SparseTensor.from_dense(np.zeros(shape, np.float32), partial)})),
            "mask_on_dense",
        ),
        Forgery(
            "NaN",
            here,
            enc(deltas(**{first: SparseTensor.from_dense(full * np.nan)})),
            "non_finite",
        ),
        Forgery(
            "Inf",
            here,
            enc(deltas(**{first: SparseTensor.from_dense(full * -np.inf)})),
            "non_finite",
        ),
        Forgery(
            "stale round",
            T.dev_update(SILENT, run_id, round_ - 2),
            enc(base, round_n=round_ - 2),
            "stale_round",
        ),
        Forgery(
            "the round that just closed",
            T.dev_update(SILENT, run_id, round_ - 1),
            enc(base, round_n=round_ - 1),
            "late",
        ),
        Forgery(
            "future round",
            T.dev_update(SILENT, run_id, round_ + 1),
            enc(base, round_n=round_ + 1),
            "future_round",
        ),
        Forgery("another run in the payload", here, enc(base, run="other"), "topic_mismatch"),
        Forgery(
            "another run's topic",
            T.dev_update(SILENT, "other", round_),
            enc(base, run="other"),
            None,
        ),
        Forgery("device id not the topic's", here, enc(base, device=victim), "device_mismatch"),
        Forgery(
            "trained from another model",
            here,
            enc(dataclasses.replace(base, model_version=model.version + 7)),
            "wrong_model_version",
        ),
        Forgery(
            "no examples", here, enc(dataclasses.replace(base, num_examples=0)), "bad_num_examples"
        ),
        # 100 KB: more than the limit, and chunked by the 64 KiB broker, so reassembled first.
        Forgery("over the size limit", here, padded(good, 100_000), "oversized"),
        Forgery("a second, different update", victim_topic, different, "duplicate", victim),
        Forgery("the same update again", victim_topic, victim_payload, None, victim),
    ]


def bad_chunk_sets(run_id: str, round_: int, payload: bytes) -> list[tuple[str, bytes]]:
    """Hand-made chunk sets of ``payload`` on the silent device's update topic: one whose
    manifest and chunks name a SHA-256 the data does not have, one that misses a chunk."""
    topic = T.dev_update(SILENT, run_id, round_)
    size = -(-len(payload) // 3)
    parts = [payload[i * size : (i + 1) * size] for i in range(3)]
    out = []
    for digest, sent in (
        (hashlib.sha256(b"not the payload").digest(), (0, 1, 2)),
        (hashlib.sha256(payload + b"x").digest(), (0, 2)),
    ):
        manifest = ChunkManifest(digest, len(payload), 3, size)
        out.append((topic, envelope.encode(Envelope(manifest))))
        for i in sent:
            chunk = envelope.encode(Envelope(Chunk(digest, i, parts[i])))
            out.append((chunk_topic(topic, i), chunk))
    return out


def failed_event(run_id: str, round_: int) -> tuple[str, bytes]:
    event = JobEvent(JobState.FAILED, "gave up")
    return T.dev_events(SILENT), envelope.encode(Envelope(event, run_id, round_, SILENT))


# -- one run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    reports: list[RoundReport]
    models: list[dict[str, np.ndarray]]
    rejections: dict[str, dict[str, int]]  # device -> reason -> count, from the store
    stored: list[tuple[int, str]]  # (round, device) of every stored update
    forged: list[Forgery]
    victim: str
    controls: list[str]  # problems with the base update, if any (must stay empty)
    logged: collections.Counter[tuple[str, str]]  # (device, reason) of "rejected" log lines
    chunk_logs: list[str]
    chunk_drops: int


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_with_forger(
    store_dir: Path,
    run_id: str,
    *,
    make_transport: Callable[[str], Transport],
    runner_transport: Transport,
    forger: Transport,
    forge: bool,
) -> Outcome:
    """The run, with the forger closing every round; with ``forge`` it first sends a retained
    update (before the fleet manager subscribes) and, in ``FORGE_ROUND``, every forgery."""
    spec = run_spec(run_id)
    runner_ref: list[Runner] = []
    done: set[int] = set()
    out = Outcome([], [], {}, [], [], "", [], collections.Counter(), [], 0)
    store = Store(store_dir)

    def on_progress(kind: str, payload: Any) -> None:
        if kind != "update" or payload["round"] in done:
            return
        round_ = payload["round"]
        done.add(round_)
        try:
            if forge and round_ == FORGE_ROUND:
                forge_now(runner_ref[0], round_, payload["device_id"])
        finally:  # the round closes even if forging broke (the tests then say what is missing)
            forger.publish(*failed_event(run_id, round_))

    def forge_now(runner: Runner, round_: int, victim: str) -> None:
        assert runner.model is not None
        model, digest = runner.model, runner.model_digest
        record = store.get_update(run_id, round_, victim)
        assert record is not None
        out.victim = victim
        now = forgeries(run_id, round_, model, digest, victim, record.load_payload())
        out.forged += now
        out.controls = check_base(runner, round_)
        for f in now:
            forger.publish(f.topic, f.payload)
        for topic, payload in bad_chunk_sets(
            run_id,
            round_,
            envelope.encode(Envelope(zero_update(model, digest), run_id, round_, SILENT)),
        ):
            forger.publish(topic, payload)

    capture = _Capture()
    loggers = [logging.getLogger("fleet.runtime.runner"), logging.getLogger("device.wire.chunking")]
    for logger in loggers:
        logger.addHandler(capture)
    agents = start_agents(
        make_transport, SIM, PartitionedData(SIM), T, fault_plan(SIM), range(DEVICES)
    )
    retained = retained_forgery(spec) if forge else None
    try:
        if retained is not None:
            forger.publish(retained.topic, retained.payload, retain=True)
            out.forged.append(retained)
        runner = Runner(
            spec,
            runner_transport,
            store,
            partition_for=partition_lookup(DEVICES),
            on_progress=on_progress,
        )
        runner_ref.append(runner)
        runner.connect()
        runner.wait_for_devices(DEVICES, timeout_s=20.0)
        out.reports = runner.run()
        if forge:
            receiver = getattr(runner_transport, "_receiver")  # noqa: B009
            deadline = time.monotonic() + 10.0
            while receiver.reassembler.dropped_count < 2 and time.monotonic() < deadline:
                runner_transport.get(timeout_s=0.2)  # drives the expiry of the incomplete set
            out.chunk_drops = receiver.reassembler.dropped_count
        out.models = [store.load_checkpoint(run_id, v).weights for v in range(ROUNDS + 1)]
        for device in device_ids(DEVICES):
            out.rejections[device] = store.rejection_counts(run_id=run_id, device_id=device)
        for round_record in store.rounds(run_id):
            for update in store.updates_for_round(run_id, round_record.round):
                out.stored.append((update.round, update.device_id))
    finally:
        if retained is not None:
            forger.publish(retained.topic, b"", retain=True)  # leave the broker clean
        for agent in agents:
            agent.stop(timeout_s=5.0)
        runner_transport.close()
        for logger in loggers:
            logger.removeHandler(capture)
        store.close()
    for record in capture.records:
        message = record.getMessage()
        if record.name == "fleet.runtime.runner" and message.startswith("rejected update from"):
            args = tuple(record.args or ())  # (device, round, error, reason)
            out.logged[(str(args[0]), str(args[3]))] += 1
        elif record.name == "device.wire.chunking":
            out.chunk_logs.append(message)
    return out


def retained_forgery(spec: RunSpec) -> Forgery:
    """A valid round-1 update of the silent device, published retained before the fleet manager
    subscribes: it reaches the runner with the retain flag, as after any fleet-manager restart.
    Were it judged like a live message it would be accepted and change the model."""
    strategy = create_strategy(spec.strategy, **dict(spec.strategy_options))
    weights, prunable = initial_weights(spec.model_name, spec.init_seed)
    model = strategy.initialize(weights, spec.model_name, prunable, np.random.default_rng(0))
    digest = model_digest(model.weights, model.masks)
    payload = envelope.encode(Envelope(zero_update(model, digest), spec.run_id, 1, SILENT))
    return Forgery(
        "retained", T.dev_update(SILENT, spec.run_id, 1), payload, "retained", retain=True
    )


def check_base(runner: Runner, round_: int) -> list[str]:
    """Problems with the zero update as the runner would judge it (empty: it would be accepted,
    and the oversized base, without its size, decodes)."""
    assert runner.model is not None
    model, digest = runner.model, runner.model_digest
    payload = envelope.encode(
        Envelope(zero_update(model, digest), runner.spec.run_id, round_, SILENT)
    )
    exp = Expectation(runner.spec.run_id, round_, (SILENT,), model, digest)
    try:
        env = envelope.decode(payload)
        update = check_routing(env, SILENT, runner.spec.run_id, round_, exp)
        runner.strategy.check_result(
            model, reconstruct(update, model, device_id=SILENT, model_digest=digest)
        )
        envelope.decode(padded(payload, 100_000))
    except (DecodeError, ValidationError) as exc:
        return [repr(exc)]
    return []


@dataclasses.dataclass
class Runs:
    clean: Outcome
    forged: Outcome


@pytest.fixture(scope="module")
def runs(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """The clean run (in memory: the transports give identical models, see test_runtime.py)
    and the forged run over mosquitto, each once for the tests of this module."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("validation")
    run_id = f"v{uuid.uuid4().hex[:8]}"

    memory = MemoryBroker()
    memory_forger = MemoryTransport(memory, "forger")
    memory_forger.connect()
    clean = run_with_forger(
        root / "clean",
        run_id,
        make_transport=lambda d: MemoryTransport(memory, d),
        runner_transport=MemoryTransport(memory, "fleet-manager"),
        forger=memory_forger,
        forge=False,
    )

    def mqtt(client_id: str, **kwargs: Any) -> MqttTransport:
        return MqttTransport(
            client_id,
            host=mosquitto.host,
            port=mosquitto.port,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            **kwargs,
        )

    forger = mqtt(f"forger-{run_id}", session_expiry_s=0)
    forger.connect(timeout_s=5.0)
    try:
        forged = run_with_forger(
            root / "forged",
            run_id,
            make_transport=lambda d: mqtt(d),
            runner_transport=mqtt(
                f"fleet-manager-{run_id}",
                manual_ack=True,
                reassembly=ReassemblyLimits(max_age_s=2.0),
            ),
            forger=forger,
            forge=True,
        )
    finally:
        forger.close()
    yield Runs(clean, forged)


# -- the tests -------------------------------------------------------------------------------------


def test_the_base_of_every_forgery_would_be_accepted(runs: Runs) -> None:
    """Control: the zero update each forgery starts from passes the runner's checks, so each
    rejection below is caused by the one defect its forgery adds."""
    assert runs.forged.controls == []
    assert len(runs.forged.forged) == 24


def test_every_bad_update_is_rejected_and_counted_for_its_device(runs: Runs) -> None:
    """Per device, the store counts exactly one rejection per forgery, with the forgery's
    reason: the silent device's topic carried all but the duplicate, which is the victim's."""
    expected: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for f in runs.forged.forged:
        if f.reason is not None:
            expected[f.device][f.reason] += 1
    for device, counts in runs.forged.rejections.items():
        assert counts == dict(expected.get(device, {})), device
    assert expected[SILENT]["non_finite"] == 2 and expected[runs.forged.victim] == {"duplicate": 1}


@pytest.mark.parametrize(
    "name",
    [
        "not protobuf",
        "wrong kind",
        "schema version",
        "unknown tensor name",
        "wrong shape",
        "unknown dtype",
        "values fewer than the mask",
        "positions outside the global mask",
        "NaN",
        "stale round",
        "future round",
        "another run in the payload",
        "device id not the topic's",
        "over the size limit",
        "a second, different update",
        "retained",
    ],
)
def test_each_rejection_is_logged_with_its_reason(runs: Runs, name: str) -> None:
    """The fleet manager's log names the device and the reason of every rejection."""
    forgery = next(f for f in runs.forged.forged if f.name == name)
    assert forgery.reason is not None
    assert runs.forged.logged[(forgery.device, forgery.reason)] >= 1


def test_the_global_model_is_bit_identical_to_the_run_without_the_forger(runs: Runs) -> None:
    """After every round, not a single bit of the model differs."""
    for clean, forged in zip(runs.clean.models, runs.forged.models, strict=True):
        assert clean.keys() == forged.keys()
        assert all(np.array_equal(clean[n], forged[n]) for n in clean)
    assert [r.received for r in runs.clean.reports] == [r.received for r in runs.forged.reports]


def test_nothing_forged_is_stored_and_the_victim_keeps_its_first_update(runs: Runs) -> None:
    """No update of the silent device was stored in any round (the retained one included), and
    the victim has exactly its own update of each round: neither the replay nor the different
    second update replaced or doubled it."""
    assert runs.forged.stored == runs.clean.stored
    assert all(device != SILENT for _, device in runs.forged.stored)
    assert collections.Counter(runs.forged.stored)[(FORGE_ROUND, runs.forged.victim)] == 1


def test_rounds_report_their_rejections(runs: Runs) -> None:
    """The forge round's report counts what was rejected while it was open."""
    forged_round = runs.forged.reports[FORGE_ROUND - 1]
    in_round = [f for f in runs.forged.forged if f.reason not in (None, "retained")]
    assert forged_round.rejected == len(in_round)
    assert [r.rejected for r in runs.clean.reports] == [0] * ROUNDS


def test_bad_chunk_sets_are_dropped_by_the_transport_and_logged(runs: Runs) -> None:
    """A chunk set whose data does not match its SHA-256, and one that never completes, are
    dropped before the runner sees a payload (so nothing is counted per device): the transport
    counts and logs both."""
    assert runs.forged.chunk_drops == 2
    logs = "\n".join(runs.forged.chunk_logs)
    assert "SHA-256 of the reassembled payload does not match" in logs
    assert "incomplete chunked payload" in logs and "2 of 3 chunks" in logs

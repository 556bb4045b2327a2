"""Crash safety: a writer killed with SIGKILL at random moments leaves a consistent store.

A child process writes in a loop and prints ``ack <key>`` only after the store call returned
(that is when the runner would acknowledge the MQTT message). The parent kills it at a random
moment, several times, and checks after every kill that the database is intact, every row's file
exists with the right digest, and no acknowledged write is missing.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fleet.state.store import RoundStatus, Store, UpdateStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = "crash"
DEVICES = 400
KILLS = 6

# Deterministic payload per key, 1 KiB .. 192 KiB so kills land inside file writes too.
PAYLOAD = """
import hashlib, random
def payload(round_, device):
    rng = random.Random(f"{round_}/{device}")
    return hashlib.sha256(device.encode()).digest() * rng.randint(32, 6144)
def examples(round_, device):
    return random.Random(f"n/{round_}/{device}").randint(1, 1000)
"""

RECORD_LOOP = (
    PAYLOAD
    + """
import sys
from fleet.state.store import Store
store = Store(sys.argv[1])
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    device = f"d{i:04d}"
    if store.record_update("crash", 1, device, payload(1, device), examples(1, device)):
        print(f"ack {device}", flush=True)
print("done", flush=True)
"""
)

ROUND_LOOP = (
    PAYLOAD
    + """
import sys
from fleet.state.store import Store
store = Store(sys.argv[1])
last_round = int(sys.argv[2])
print("ready", flush=True)
while True:
    current = store.find_open_round("crash")
    if current is None:  # between rounds: open the next one, or finish
        done = store.rounds("crash")
        number = done[-1].round + 1 if done else 1
        if number > last_round:
            break
        version = done[-1].model_version_out if done else 0
        devices = [f"d{i}" for i in range(8)]
        current = store.open_round("crash", number, selected=devices, deadline=0.0,
                                   model_version_in=version)
    r = current.round
    for device in current.selected:  # a restarted runner receives the redeliveries again
        if store.record_update("crash", r, device, payload(r, device), examples(r, device)):
            print(f"ack {r} {device}", flush=True)
    # Aggregate exactly what the store holds; the model is the running sum of examples.
    base = store.load_checkpoint("crash", current.model_version_in).weights["total"]
    updates = store.updates_for_round("crash", r, statuses=["accepted"])
    for u in updates:
        assert u.load_payload() == payload(r, u.device_id)
    total = base + sum(u.num_examples for u in updates)
    store.save_checkpoint("crash", current.model_version_in + 1, {"total": total}, {}, round=r)
    store.close_round("crash", r, model_version_out=current.model_version_in + 1,
                      counted=[(r, u.device_id) for u in updates])
print("done", flush=True)
"""
)


def _expected(round_: int, device: str) -> tuple[bytes, int]:
    rng = random.Random(f"{round_}/{device}")
    data = hashlib.sha256(device.encode()).digest() * rng.randint(32, 6144)
    return data, random.Random(f"n/{round_}/{device}").randint(1, 1000)


def _spawn(script: str, root: Path, arg: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(root), str(arg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
    )


def _kill_at_random(child: subprocess.Popen[str], rng: random.Random) -> list[str]:
    """Wait until the child is writing, SIGKILL it after a random delay; its complete lines."""
    assert child.stdout is not None
    first = child.stdout.readline()
    assert first == "ready\n", child.stderr.read() if child.stderr else first
    time.sleep(rng.uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert child.returncode in (-signal.SIGKILL, 0), err
    # A line cut by the kill has no newline: that ack never happened.
    return [line for line in out.splitlines(keepends=True) if line.endswith("\n")]


def _assert_consistent(root: Path) -> list[tuple[int, str, str, int]]:
    """Integrity, files behind every row, no leftover temp files; returns the update rows."""
    raw = sqlite3.connect(root / "fleet.db")
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = raw.execute(
            "SELECT round, device_id, payload_digest, num_examples FROM updates"
        ).fetchall()
        checkpoint_digests = [d for (d,) in raw.execute("SELECT digest FROM checkpoints")]
    finally:
        raw.close()
    for round_, device, digest, num_examples in rows:
        path = root / "tensors" / digest[:2] / digest
        data = path.read_bytes()  # exists
        assert hashlib.sha256(data).hexdigest() == digest
        assert (data, num_examples) == _expected(round_, device)
    for digest in checkpoint_digests:
        data = (root / "tensors" / digest[:2] / digest).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    return [(r, d, g, n) for r, d, g, n in rows]


def _prepare(root: Path, *, round_open: bool) -> None:
    with Store(root) as store:
        store.create_run(RUN, config={}, strategy="fedavg", model_name="sum")
        store.set_run_status(RUN, "running")
        store.save_checkpoint(RUN, 0, {"total": np.zeros((), np.int64)}, {})
        if round_open:
            devices = [f"d{i:04d}" for i in range(DEVICES)]
            store.open_round(RUN, 1, selected=devices, deadline=0.0, model_version_in=0)


@pytest.mark.timeout(120)
def test_sigkill_while_recording_loses_no_acknowledged_update(tmp_path: Path) -> None:
    """Write-then-ack holds under kill -9: every acked update is stored whole, exactly once,
    and the next incarnation sees every stored key as a duplicate."""
    root = tmp_path / "state"
    _prepare(root, round_open=True)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    acked: set[str] = set()
    for _ in range(KILLS):
        lines = _kill_at_random(_spawn(RECORD_LOOP, root, DEVICES), rng)
        acked |= {line.split()[1] for line in lines if line.startswith("ack ")}

        # Opening the store removes the killed writer's temp file, if it left one.
        with Store(root) as store:
            assert list(root.glob("tensors/*/.*.tmp")) == []
            rows = _assert_consistent(root)
            stored = {device for _, device, _, _ in rows}
            assert acked <= stored, f"acknowledged but lost: {sorted(acked - stored)}"
            assert store.check_integrity() == []
            for device in sorted(stored):
                data, n = _expected(1, device)
                assert store.record_update(RUN, 1, device, data, n) is False
            assert len(store.updates_for_round(RUN, 1)) == len(stored)
    assert acked, "no write completed before any kill; the test proved nothing"


@pytest.mark.timeout(120)
def test_sigkill_during_rounds_then_resume_counts_every_update_once(tmp_path: Path) -> None:
    """The resume protocol (find the open round, reload its input model, re-collect, aggregate,
    close) yields the same model as an uninterrupted run: nothing lost, nothing twice."""
    root = tmp_path / "state"
    _prepare(root, round_open=False)
    rounds = 12
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for _ in range(KILLS):
        _kill_at_random(_spawn(ROUND_LOOP, root, rounds), rng)
        _assert_consistent(root)
        with Store(root) as store:
            open_rounds = [r for r in store.rounds(RUN) if r.status is RoundStatus.OPEN]
            assert len(open_rounds) <= 1
            assert store.check_integrity() == []

    finisher = _spawn(ROUND_LOOP, root, rounds)  # the final resume runs to completion
    out, err = finisher.communicate(timeout=60)
    assert finisher.returncode == 0, err
    assert out.endswith("done\n")

    _assert_consistent(root)
    with Store(root) as store:
        history = store.rounds(RUN)
        assert [r.round for r in history] == list(range(1, rounds + 1))
        expected_total = 0
        for r in history:
            assert r.status is RoundStatus.CLOSED
            assert r.model_version_out == r.model_version_in + 1 == r.round
            updates = store.updates_for_round(RUN, r.round)
            assert {u.device_id for u in updates} == {f"d{i}" for i in range(8)}
            assert {(u.status, u.counted_in_round) for u in updates} == {
                (UpdateStatus.COUNTED, r.round)
            }
            expected_total += sum(_expected(r.round, f"d{i}")[1] for i in range(8))
            model = store.load_checkpoint(RUN, r.model_version_out)
            assert model.record.digest == r.checkpoint_digest
            assert int(model.weights["total"]) == expected_total

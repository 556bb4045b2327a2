"""Runs of a user's model, end to end over the in-memory broker (real agents, store, strategies).

The model comes from a throw-away package written at test time (tests/model_packages.py), as
a user's package installed on the fleet manager and the devices would. One device builds
another architecture for the same reference (as with another version of the package): it must
refuse every round with both digests named, never upload, while the round closes with the
others; ``fleet status`` shows why. A model with BatchNorm buffers (one int64) and an
Embedding must train with FedDST like any other (docs/algorithms.md, "Buffers").
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from device.agent import AgentOptions, DeviceAgent
from device.model_id import digest_of, offers
from device.model_ref import ModelRef
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.topics import Topics
from fleet.cli import cli
from fleet.runtime.runner import RoundReport, Runner, RunSpec
from fleet.sim import SimSpec, simulate
from fleet.sim.core import PartitionedData
from fleet.state.store import Store
from tests.model_packages import make_package, unique_name

TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.05}
GOOD = ("dev-a", "dev-b", "dev-c")
ODD = "odd-1"  # its worker thread builds the model one unit wider (tests/model_packages.py)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = unique_name()
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "site", name)))
    return name


def _run(
    spec: RunSpec, device_ids: Sequence[str], store_dir: Path
) -> tuple[list[RoundReport], Runner]:
    """``spec`` on agents with these ids (each offering the run's model as built here)."""
    sim = SimSpec(devices=len(device_ids), dataset="digits")
    data = PartitionedData(sim)
    index = {device_id: str(i) for i, device_id in enumerate(device_ids)}
    broker = MemoryBroker()
    announced = offers([spec.model])
    agents = [
        DeviceAgent(
            MemoryTransport(broker, device_id),
            data,
            AgentOptions(
                device_id=device_id,
                topics=Topics(),
                dataset_size=data.size(i),
                models=announced,
            ),
        )
        for i, device_id in enumerate(device_ids)
    ]
    for agent in agents:
        agent.start()
    store = Store(store_dir)
    try:
        runner = Runner(
            spec,
            MemoryTransport(broker, "fleet-manager"),
            store,
            partition_for=lambda d: index.get(d, ""),
        )
        runner.connect()
        runner.wait_for_devices(len(device_ids), 10.0)
        return runner.run(), runner
    finally:
        for agent in agents:
            agent.stop(timeout_s=5.0)
        store.close()


def test_a_device_that_builds_another_architecture_refuses_and_never_uploads(
    package: str, tmp_path: Path
) -> None:
    ref = ModelRef(factory=f"{package}:build", kwargs={"width": 12})
    spec = RunSpec(
        run_id="user",
        model_name=ref.text,
        model_ref=ref,
        strategy="fedavg",
        rounds=2,
        clients_per_round=4,
        strategy_options={"clients_per_round": 4, "training": TRAINING},
        round_timeout_s=30.0,
    )
    state = tmp_path / "state"
    reports, runner = _run(spec, [*GOOD, ODD], state)

    assert [r.closed_by for r in reports] == ["all_answered", "all_answered"]
    assert all(r.failed == (ODD,) and sorted(r.received) == sorted(GOOD) for r in reports)
    ours = digest_of(ref)
    odd_build: list[bytes] = []  # what the odd device builds: the same, digested on its thread
    probe = threading.Thread(target=lambda: odd_build.append(digest_of(ref)), name="odd-probe")
    probe.start()
    probe.join()
    odd = odd_build[0]
    assert odd != ours
    assert runner.current.architecture_digest == ours
    with Store(state, create=False) as store:
        for round_ in (1, 2):
            assert ODD not in {u.device_id for u in store.updates_for_round("user", round_)}
        weights = store.load_checkpoint("user").weights
        assert weights["fc1.weight"].shape == (12, 64)  # the run's layout, trained by the others
    # `fleet status` names the device, why it refused, and both digests.
    result = CliRunner().invoke(
        cli, ["--state-dir", str(state), "status", "--no-refresh"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"{ODD}: last failure: model '{ref.text}': this device builds architecture" in text
    assert ours.hex()[:16] in text and odd.hex()[:16] in text
    assert f"models {ref.text}: dev-a, dev-b, dev-c, odd-1" in text
    listed = CliRunner().invoke(
        cli, ["--state-dir", str(state), "status", "--no-refresh", "--json"]
    )
    devices = {d["device_id"]: d for d in json.loads(listed.output)["devices"]}
    assert devices[ODD]["counters"]["failures"] == 2
    assert odd.hex()[:16] in devices[ODD]["last_failure"]
    assert devices["dev-a"]["models"] == [
        {"model": ref.to_json(), "architecture_digest": ours.hex()}
    ]


def test_a_model_with_batchnorm_and_an_embedding_trains_with_feddst(
    package: str, tmp_path: Path
) -> None:
    """Buffers (running statistics, an int64 count) travel and are averaged like weights; the
    embedding and the norm stay dense; a non-persistent buffer never travels."""
    ref = ModelRef(factory=f"{package}:build_norm_embed")
    spec = RunSpec(
        run_id="norms",
        model_name=ref.text,
        strategy="feddst",
        rounds=2,
        clients_per_round=4,
        strategy_options={
            "clients_per_round": 4,
            "training": TRAINING,
            "density": 0.5,
            "total_rounds": 2,
            "readjust_every": 1,
        },
        round_timeout_s=60.0,
    )
    reports = simulate(spec, SimSpec(devices=4, dataset="digits"), tmp_path / "state")
    assert [len(r.received) for r in reports] == [4, 4]
    assert reports[-1].metrics["accuracy"] > 0.3  # chance is 0.1
    with Store(tmp_path / "state", create=False) as store:
        first = store.load_checkpoint("norms", 0)
        last = store.load_checkpoint("norms")
    assert sorted(last.masks) == ["conv.weight", "fc.weight"]  # embedding and norm: dense
    assert "edges" not in last.weights
    assert float(last.weights["bn.num_batches_tracked"]) > 0  # counted on the devices
    assert not np.array_equal(first.weights["bn.running_mean"], last.weights["bn.running_mean"])
    assert not np.array_equal(first.weights["embed.weight"], last.weights["embed.weight"])


def test_prunable_patterns_choose_what_feddst_prunes(package: str, tmp_path: Path) -> None:
    ref = ModelRef(factory=f"{package}:build_norm_embed")
    spec = RunSpec(
        run_id="embed",
        model_name=ref.text,
        strategy="feddst",
        rounds=1,
        clients_per_round=2,
        strategy_options={
            "clients_per_round": 2,
            "training": TRAINING,
            "density": 0.5,
            "distribution": "uniform",  # ERK would keep the small embedding whole
            "total_rounds": 1,
        },
        round_timeout_s=60.0,
        prunable=(r"embed\.weight", r"fc\.weight"),
    )
    simulate(spec, SimSpec(devices=2, dataset="digits"), tmp_path / "state")
    with Store(tmp_path / "state", create=False) as store:
        masks = store.load_checkpoint("embed").masks
    assert sorted(masks) == ["embed.weight", "fc.weight"]
    assert 0.3 < float(masks["embed.weight"].mean()) < 0.7

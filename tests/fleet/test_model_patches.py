"""The runner publishes every version whole and as a patch, and counts per device what it needs:
nothing for the version it holds, the patch for the masks it holds, else the whole snapshot."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from device.wire import envelope
from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.messages import ModelSnapshot
from device.wire.topics import Topics
from fleet.runtime.checkpoint import CurrentModel
from fleet.runtime.commands import Commands
from fleet.runtime.runner import RunSpec
from fleet.sim import SimSpec, simulate
from fleet.strategies.base import GlobalModel

RNG = np.random.default_rng(7)


def model(version: int, mask: np.ndarray) -> GlobalModel:
    weight = np.where(mask, RNG.standard_normal(mask.shape), 0).astype(np.float32)
    bias = RNG.standard_normal(mask.shape[0]).astype(np.float32)
    return GlobalModel(version, {"w": weight, "b": bias}, {"w": mask}, "mlp")


def test_each_version_goes_out_whole_and_as_a_patch_and_devices_are_counted_by_what_they_hold() -> (
    None
):
    broker, topics = MemoryBroker(), Topics()
    fleet = MemoryTransport(broker, "fleet-manager")
    fleet.connect()
    spec = SimpleNamespace(model=None, classes=())
    current = CurrentModel(cast(Any, spec), cast(Any, None), cast(Any, None))
    commands = Commands(
        "r", fleet, topics, current, partition_for=lambda device: "", clock=lambda: 0.0
    )
    mask = RNG.random((200, 100)) < 0.2

    current.set(model(0, mask), mask_changed=True)
    commands.publish_model()
    assert commands.patch_base is None  # nothing before it: the patch topic carries it whole
    assert broker.retained(topics.run_patch("r")) == broker.retained(topics.run_model("r"))
    assert commands.model_download("a") == (commands.snapshot_bytes, commands.snapshot_bytes)
    assert commands.model_download("a") == (0, 0)  # the version it holds

    current.set(model(1, mask), mask_changed=False)
    commands.publish_model()
    # The patch saves w's positions: at least their entropy bound, 20,000 x H(0.2) bits = 1.8 kB.
    assert commands.patch_base == 0
    assert commands.snapshot_bytes - commands.patch_bytes > 1700
    assert commands.model_download("a").bytes == commands.patch_bytes  # holds version 0's masks
    assert commands.model_download("b").bytes == commands.snapshot_bytes  # holds nothing

    moved = mask.copy()
    moved[0, :10] = ~moved[0, :10]
    current.set(model(2, moved), mask_changed=True)
    commands.publish_model()
    assert commands.patch_base == 0  # positions against version 1's masks (mask version 0)
    patch = broker.retained(topics.run_patch("r"))
    full = broker.retained(topics.run_model("r"))
    assert patch is not None and full is not None and len(patch) < len(full)
    assert commands.model_download("a").bytes == commands.patch_bytes

    current.set(model(3, moved), mask_changed=False)
    commands.publish_model()
    assert commands.patch_base == 2
    assert commands.model_download("a").bytes == commands.patch_bytes  # followed the change at 2
    assert commands.model_download("c").bytes == commands.snapshot_bytes
    # A device that last trained on version 1 holds mask version 0: it needs the whole model.
    commands._holds["d"] = (1, 0)
    assert commands.model_download("d").bytes == commands.snapshot_bytes

    held = envelope.decode(full).body
    assert isinstance(held, ModelSnapshot) and held.version == 2
    commands.clear_retained([])
    assert broker.retained(topics.run_patch("r")) is None


def test_a_fleet_that_trains_every_round_downloads_patches_after_the_first(tmp_path: Path) -> None:
    """Six devices, all in every round, FedDST readjusting every 2 rounds over the in-memory
    broker: after round 1 each device holds the previous version's masks, so its download is
    the patch (values only where masks held still), a fraction of round 1's whole snapshots."""
    spec = RunSpec(
        run_id="p",
        model_name="mlp",
        strategy="feddst",
        rounds=5,
        clients_per_round=6,
        strategy_options={
            "clients_per_round": 6,
            "density": 0.3,
            "readjust_every": 2,
            "total_rounds": 5,
            "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
            "download_values": "int8",
        },
        round_timeout_s=30.0,
    )
    reports = simulate(spec, SimSpec(devices=6, dataset="digits"), tmp_path)
    assert all(len(r.received) == 6 for r in reports)
    first, later = reports[0].download_bytes, [r.download_bytes for r in reports[1:]]
    assert all(down < 0.85 * first for down in later), (first, later)
    # Beside it, what the same commands would have fetched whole: round 1's every round.
    whole = [r.metrics["download_whole_bytes"] for r in reports]
    assert whole[0] == first and all(w > d for w, d in zip(whole[1:], later, strict=True))
    accuracy = [r.metrics["accuracy"] for r in reports]
    assert accuracy[-1] > accuracy[0], accuracy

"""A simulated mixed fleet, and density budgets end to end over the in-memory broker.

Why it matters: the heterogeneity results are only as good as the simulated fleet behind them
(classes must be reproducible, their hardware and profiles must reach the fleet manager, a slow
class must be slow), and budgets only help if every budgeted update the real agents send is
accepted and lands in the right coordinates.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from device.errors import ConfigError
from device.wire.messages import (
    DeviceProfile,
    DeviceUpdate,
    Hardware,
    LayerProfile,
    ProfilePoint,
)
from fleet.cli.runfile import SimConfig
from fleet.ops.registry import DeviceRegistry
from fleet.report.device_density import device_density_lines
from fleet.runtime.runner import RunSpec
from fleet.sim import simulate
from fleet.sim.core import SimSpec, device_ids
from fleet.sim.fleet_classes import (
    DeviceClass,
    HostCores,
    JobClock,
    assign_classes,
    class_hardware,
    coerce_classes,
    drops_job,
    scaled_profile,
    slow_down,
)
from fleet.state.store import Store

CLASSES = (
    DeviceClass("slow", 0.5, speed=0.25, memory_mb=512),
    DeviceClass("fast", 0.5, speed=1.0, memory_mb=4096),
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_classes_follow_the_shares_and_the_seed() -> None:
    ids = device_ids(100)
    three = coerce_classes(
        [
            {"name": "pi-zero-2w", "share": 0.5, "speed": 0.15, "memory_mb": 512},
            {"name": "pi4", "share": 0.4, "speed": 0.6, "memory_mb": 4096},
            {"name": "pi5", "share": 0.1, "speed": 1.0, "memory_mb": 8192},
        ]
    )
    plan = assign_classes(ids, three, seed=1)
    sizes = {c.name: sum(1 for v in plan.values() if v is c) for c in three}
    assert sizes == {"pi-zero-2w": 50, "pi4": 40, "pi5": 10}
    assert plan == assign_classes(ids, three, seed=1)
    assert plan != assign_classes(ids, three, seed=2)


def test_bad_classes_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="shares must sum to 1"):
        coerce_classes([{"name": "a", "share": 0.5}])
    with pytest.raises(ValueError, match="speed"):
        coerce_classes([{"name": "a", "share": 1.0, "speed": 0}])
    with pytest.raises(ValueError, match="unknown keys"):
        coerce_classes([{"name": "a", "share": 1.0, "cores": 4}])
    with pytest.raises(ValueError, match="distinct"):
        coerce_classes([{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}])
    with pytest.raises(ValueError):
        SimConfig(classes=(DeviceClass("a", 0.3),))


def test_hardware_profile_and_dropout_follow_the_class() -> None:
    cls = DeviceClass("pi-zero-2w", 1.0, speed=0.25, memory_mb=512, dropout=0.3)
    hw = class_hardware(cls, Hardware(machine="x86_64", cpu_count=2, memory_bytes=1))
    assert hw.memory_bytes == 512 * 2**20 and hw.machine == "sim:pi-zero-2w"
    base = DeviceProfile("mlp", 32, 0.01, (LayerProfile("w", 8, (ProfilePoint(1.0, 0.1),)),))
    slow = scaled_profile(base, cls.speed)
    assert slow.step_overhead_s == pytest.approx(0.04)
    assert slow.layers[0].points[0].dense_s == pytest.approx(0.4)
    drops = [drops_job(0, "r", k, "sim-0001", cls.dropout) for k in range(1, 401)]
    assert drops == [drops_job(0, "r", k, "sim-0001", cls.dropout) for k in range(1, 401)]
    assert 0.2 < sum(drops) / len(drops) < 0.4


def _spec(budgets: Any, run_id: str = "t", strategy: str = "feddst") -> RunSpec:
    options: dict[str, Any] = {
        "clients_per_round": 6,
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    }
    if strategy == "feddst":
        options.update(total_rounds=4, readjust_every=1, density=0.3)
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy=strategy,
        rounds=4,
        clients_per_round=6,
        strategy_options=options,
        round_timeout_s=30.0,
        budgets=budgets,
    )


def test_a_mixed_fleet_reports_its_classes_to_the_registry_and_slow_jobs_take_longer(
    tmp_path: Path,
) -> None:
    sim = SimSpec(devices=12, dataset="digits", classes=CLASSES)
    reports = simulate(_spec("none"), sim, tmp_path)
    plan = assign_classes(device_ids(12), CLASSES, sim.seed)
    with Store(tmp_path, create=False) as store:
        train_s: dict[str, list[float]] = {"slow": [], "fast": []}
        for report in reports:
            for row in store.updates_for_round("t", report.round):
                train_s[plan[row.device_id].name].append(float(row.meta["train_s"]))
        registry = DeviceRegistry(store)
        for device_id, cls in plan.items():
            info = registry.get(device_id)
            assert info.hardware.memory_bytes == cls.memory_mb * 2**20
            assert info.matches(cls.name)  # the class is a tag: budgets and tags address it
            assert info.profile is not None
    assert train_s["slow"] and train_s["fast"]


@pytest.fixture
def one_torch_thread() -> Any:
    """Torch on one thread, as simulated devices compute (SimSpec.torch_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_class_job_takes_its_compute_time_divided_by_its_speed(one_torch_thread: None) -> None:
    """The documented rule: compute at host speed, wait until compute_s / speed has passed since
    the job started, report that as train_s. Compute is the job thread's CPU time: time this
    thread spent waiting (other devices computing on the same cores) does not count."""
    update = DeviceUpdate(model_version=1, model_digest=b"", deltas={}, num_examples=1, train_s=0.2)
    clock = JobClock.start()
    spin_until = time.thread_time() + 0.05
    while time.thread_time() < spin_until:  # 50 ms of this thread's CPU
        pass
    time.sleep(0.1)  # waiting: wall time, no CPU
    waited: list[float] = []
    slow = slow_down(update, DeviceClass("slow", 1.0, speed=0.1), waited.append, clock)
    compute = slow.train_s * 0.1
    assert 0.05 <= compute < 0.09  # the spin, not the sleep
    assert waited[0] == pytest.approx(slow.train_s - clock.elapsed_s(), abs=0.02)
    assert 0.3 < waited[0] < 0.45  # 10x the compute, less the 0.15 s already gone
    fast = slow_down(update, DeviceClass("fast", 1.0, speed=2.0), waited.append, clock)
    assert fast is update and len(waited) == 1


def test_host_cores_lend_one_core_per_job_and_a_cancelled_wait_takes_none() -> None:
    """Jobs compute one per core: a second job waits until the first gives its core back, and a
    job cancelled while waiting holds nothing (so nothing is given back twice)."""
    cores = HostCores(1)
    cancelled = threading.Event()
    assert cores.take(cancelled)
    took: list[bool] = []
    waiter = threading.Thread(target=lambda: took.append(cores.take(cancelled)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not took  # waits while the core is lent
    cores.give_back()
    cores.give_back()  # idempotent: this thread holds no core any more
    waiter.join(2.0)
    assert took == [True]
    other = threading.Event()
    other.set()
    assert cores.take(other) is False  # the core is still lent to the waiter's thread
    with pytest.raises(ValueError, match="at least 1"):
        HostCores(0)


@pytest.mark.parametrize("strategy", ["feddst", "prunefl"])
def test_tag_budgets_train_nested_subnetworks_and_every_update_is_accepted(
    strategy: str, tmp_path: Path
) -> None:
    """The slow class trains at density 0.1 (its tag), the fast one at the global density;
    nothing is rejected and the run still learns."""
    sim = SimSpec(devices=12, dataset="digits", classes=CLASSES)
    reports = simulate(_spec({"slow": 0.1}, strategy=strategy), sim, tmp_path)
    plan = assign_classes(device_ids(12), CLASSES, sim.seed)
    assert all(r.rejected == 0 for r in reports)
    assert reports[-1].metrics["accuracy"] > 0.6
    with Store(tmp_path, create=False) as store:
        assert store.rejection_counts(run_id="t") == {}
        seen = {"slow": set(), "fast": set()}
        trained = set()
        for report in reports:
            for row in store.updates_for_round("t", report.round):
                seen[plan[row.device_id].name].add(round(float(row.meta["density"]), 2))
                trained.add(row.device_id)
        # The run report lists the density each device trained at.
        table = "\n".join(device_density_lines(store, ["t"]))
    assert seen["slow"] == {0.1}
    assert all(d > 0.1 for d in seen["fast"])
    # A slow device that trained (on 2 busy cores one may miss every deadline it was given).
    slow_id = next(d for d, c in sorted(plan.items()) if c.name == "slow" and d in trained)
    assert "Density each device trained at" in table
    # Its row: | device | updates | min | mean | max |, densities printed to 4 places (a
    # PruneFL mask gives 0.0999 where FedDST's gives 0.1000), compared as `seen` is, to 2.
    row = next(line for line in table.splitlines() if line.startswith(f"| {slow_id} |"))
    low, mean, high = (float(cell) for cell in row.strip("| ").split(" | ")[2:5])
    assert round(low, 2) == round(mean, 2) == round(high, 2) == 0.1, row
    if strategy == "feddst":
        assert [round(r.density, 3) for r in reports] == [0.3] * 4


def test_auto_budgets_fall_back_to_the_default_density_without_profiles(tmp_path: Path) -> None:
    """Devices without a profile (no classes: the host's agents send none) get the default
    density and a warning, never an error."""
    reports = simulate(_spec("auto"), SimSpec(devices=8, dataset="digits"), tmp_path)
    with Store(tmp_path, create=False) as store:
        densities = {
            round(float(row.meta["density"]), 2)
            for r in reports
            for row in store.updates_for_round("t", r.round)
        }
    assert densities == {0.3}


def test_a_run_file_with_classes_and_budgets_builds_its_specs(tmp_path: Path) -> None:
    from fleet.cli.runfile import load_config, run_spec, sim_spec

    path = tmp_path / "run.yaml"
    path.write_text(
        "run:\n  model: mlp\n  strategy: feddst\n  rounds: 2\n  clients_per_round: 4\n"
        "  budgets: {pi-zero-2w: 0.05}\n"
        "simulation:\n  devices: 10\n  classes:\n"
        "    - {name: pi-zero-2w, share: 0.5, speed: 0.15, memory_mb: 512, dropout: 0.1}\n"
        "    - {name: pi4, share: 0.5, speed: 0.6, memory_mb: 4096}\n"
    )
    config = load_config(path)
    assert run_spec(config, "x").budgets == {"pi-zero-2w": 0.05}
    sim = sim_spec(config)
    assert [c.name for c in sim.classes] == ["pi-zero-2w", "pi4"]
    # A launch record (JSON) gives the classes back as mappings.
    again = SimSpec(
        **{**dataclasses.asdict(sim), "classes": [dataclasses.asdict(c) for c in sim.classes]}
    )
    assert again.classes == sim.classes
    path.write_text(
        "run:\n  model: mlp\n  strategy: feddst\n  rounds: 2\n  clients_per_round: 4\n"
        "  budgets: fastest\n"
    )
    with pytest.raises(ConfigError, match="budgets"):
        load_config(path)


def test_slow_class_sleeps_are_wall_clock(tmp_path: Path) -> None:
    """A class at speed 0.02 really waits: the round (commands out, all six updates in) lasts
    at least the slowest job's reported time, 50 times its compute."""
    slow_only = (DeviceClass("slow", 1.0, speed=0.02, memory_mb=512),)
    reports = simulate(
        dataclasses.replace(_spec("none"), rounds=1),
        SimSpec(devices=6, dataset="digits", classes=slow_only),
        tmp_path,
    )
    assert reports[0].max_train_s > 0
    assert reports[0].wall_s >= reports[0].max_train_s

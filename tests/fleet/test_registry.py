"""The device registry: session-epoch ordering, eligibility, tags, persistent counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.errors import NotFoundError
from device.wire.messages import DeviceProfile, DeviceStatus, Hardware, LayerProfile, ProfilePoint
from fleet.ops.registry import (
    DeviceInfo,
    DeviceRegistry,
    parse_tag_selector,
    profile_from_json,
    profile_to_json,
    status_supersedes,
)
from fleet.state.store import Store

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    with Store(tmp_path / "state", clock=clock) as s:
        yield s


@pytest.fixture
def registry(store: Store, clock: FakeClock) -> DeviceRegistry:
    return DeviceRegistry(store, clock=clock)


def birth(
    epoch: int,
    *,
    dataset_size: int = 0,
    tags: tuple[str, ...] = (),
    profile: DeviceProfile | None = None,
    hardware: Hardware | None = None,
) -> DeviceStatus:
    return DeviceStatus(
        online=True,
        session_epoch=epoch,
        agent_version="1.0",
        hardware=hardware or Hardware(),
        dataset_size=dataset_size,
        profile=profile,
        tags=tags,
    )


def will(epoch: int) -> DeviceStatus:
    return DeviceStatus(online=False, session_epoch=epoch, agent_version="1.0")


def ids(devices: list[DeviceInfo]) -> list[str]:
    return [d.device_id for d in devices]


# -- session epochs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "new", "applies"),
    [
        ((None, False), (0, True), True),  # first message ever
        ((3, True), (4, True), True),  # new session
        ((3, True), (3, True), True),  # retained birth delivered again
        ((3, True), (3, False), True),  # the session's own will
        ((3, False), (3, True), False),  # birth redelivered after its will
        ((4, True), (3, False), False),  # old session's will, late
        ((4, True), (3, True), False),  # stale birth
        ((3, False), (4, False), True),  # a newer session's will, birth never seen
    ],
)
def test_status_order_is_epoch_then_offline(
    current: tuple[int | None, bool], new: tuple[int, bool], applies: bool
) -> None:
    """The total order that makes births and wills commute with broker redelivery."""
    assert status_supersedes(current[0], current[1], new[0], new[1]) is applies


def test_old_sessions_will_does_not_take_a_new_session_offline(registry: DeviceRegistry) -> None:
    """A device that reconnects quickly must not look dead because its old will fires late."""
    assert registry.apply_status("d1", birth(1))
    assert registry.apply_status("d1", birth(2, dataset_size=500))
    assert registry.apply_status("d1", will(1)) is False
    info = registry.get("d1")
    assert (info.online, info.session_epoch, info.dataset_size) == (True, 2, 500)


def test_will_marks_offline_and_a_redelivered_birth_cannot_revive(
    registry: DeviceRegistry,
) -> None:
    """After the will, only a new session (higher epoch) brings the device back."""
    registry.apply_status("d1", birth(5))
    assert registry.apply_status("d1", will(5))
    assert registry.get("d1").online is False
    assert registry.apply_status("d1", birth(5)) is False
    assert registry.get("d1").online is False
    assert registry.apply_status("d1", birth(6))
    assert registry.get("d1").online is True


def test_stale_birth_is_ignored(registry: DeviceRegistry, clock: FakeClock) -> None:
    """An old retained status must not roll back the agent version or last_seen."""
    registry.apply_status("d1", DeviceStatus(online=True, session_epoch=9, agent_version="2.0"))
    clock.t = T0 + 60
    assert registry.apply_status("d1", birth(8)) is False
    info = registry.get("d1")
    assert (info.agent_version, info.session_epoch, info.last_seen) == ("2.0", 9, T0)


def test_repeated_birth_refreshes_status(registry: DeviceRegistry, clock: FakeClock) -> None:
    """The same session may re-announce (e.g. a new dataset size); last_seen moves forward."""
    registry.apply_status("d1", birth(1, dataset_size=100))
    clock.t = T0 + 30
    registry.apply_status("d1", birth(1, dataset_size=120))
    info = registry.get("d1")
    assert (info.dataset_size, info.last_seen) == (120, T0 + 30)


def test_profile_and_hardware_round_trip(registry: DeviceRegistry) -> None:
    """PruneFL's cost model reads the profile back from the registry: it must be intact."""
    profile = DeviceProfile(
        model_name="cnn",
        batch_size=32,
        step_overhead_s=0.004,
        layers=(
            LayerProfile("conv1.weight", 800, (ProfilePoint(1.0, 0.01), ProfilePoint(0.1, 0.004))),
            LayerProfile("fc.weight", 10240, (ProfilePoint(0.2, 0.002, 0.001),)),
        ),
        uplink_bytes_per_s=1e6,
    )
    hardware = Hardware(machine="aarch64", cpu_count=4, memory_bytes=4 << 30)
    registry.apply_status("pi", birth(1, profile=profile, hardware=hardware))
    info = registry.get("pi")
    assert info.profile == profile
    assert info.hardware == hardware
    assert profile_from_json(json.loads(json.dumps(profile_to_json(profile)))) == profile
    with pytest.raises(ValueError, match="profile is malformed"):
        profile_from_json({"model_name": "cnn"})


# -- eligibility -------------------------------------------------------------------------------


def test_cordon_and_drain_exclude_from_eligible(registry: DeviceRegistry) -> None:
    """An operator takes a device out of rotation without it going offline."""
    for d in ("a", "b", "c", "d"):
        registry.apply_status(d, birth(1))
    registry.apply_status("d", will(1))
    registry.cordon("a")
    registry.drain("b")
    assert ids(registry.eligible()) == ["c"]
    assert registry.get("b").drained and not registry.get("b").cordoned
    registry.uncordon("a")
    registry.uncordon("b")
    assert ids(registry.eligible()) == ["a", "b", "c"]


def test_operator_commands_on_unknown_device_are_not_found(registry: DeviceRegistry) -> None:
    """A typo in `fleet devices cordon` must fail, not create a phantom device."""
    with pytest.raises(NotFoundError, match="no device 'ghost'"):
        registry.cordon("ghost")
    with pytest.raises(NotFoundError):
        registry.tag("ghost", "site=lab")
    assert registry.devices() == []


def test_tag_selectors(registry: DeviceRegistry) -> None:
    """Runs target subsets of the fleet by reported and operator tags."""
    registry.apply_status("a", birth(1, tags=("site=lab", "arm64")))
    registry.apply_status("b", birth(1, tags=("site=home",)))
    registry.apply_status("c", birth(1))
    registry.tag("c", {"site": "lab"})
    assert ids(registry.eligible({"site": "lab"})) == ["a", "c"]
    assert ids(registry.eligible(["site=lab", "arm64"])) == ["a"]
    assert ids(registry.eligible("site")) == ["a", "b", "c"]  # one condition, not characters
    assert ids(registry.eligible(["gpu"])) == []

    registry.tag("a", ["site=home"])  # the operator overrides what the device reports
    assert registry.get("a").tags == {"site": "home", "arm64": ""}
    assert ids(registry.eligible("site=home")) == ["a", "b"]
    registry.untag("a", "site")  # back to the reported value
    assert registry.get("a").tags["site"] == "lab"
    assert registry.get("a").matches({"site": "lab", "arm64": ""})


def test_malformed_tags_are_refused() -> None:
    with pytest.raises(ValueError, match="empty key"):
        parse_tag_selector(["=lab"])
    assert parse_tag_selector({"a": "1"}) == (("a", "1"),)
    assert parse_tag_selector(["a", "b=2"]) == (("a", None), ("b", "2"))


def test_silent_devices_can_be_excluded(store: Store, clock: FakeClock) -> None:
    """With a staleness limit, an 'online' device not heard from is not given work."""
    registry = DeviceRegistry(store, clock=clock, stale_after_s=60.0)
    registry.apply_status("old", birth(1))
    clock.t = T0 + 100
    registry.apply_status("new", birth(1))
    assert ids(registry.eligible()) == ["new"]
    registry.touch("old")
    assert ids(registry.eligible()) == ["new", "old"]
    assert ids(registry.eligible(now=T0 + 1000)) == []


# -- counters and persistence ------------------------------------------------------------------


def test_counters_persist_across_store_reopen(tmp_path: Path, clock: FakeClock) -> None:
    """`fleet devices show` after a restart must report the same totals as before it."""
    root = tmp_path / "state"
    with Store(root, clock=clock) as store:
        registry = DeviceRegistry(store, clock=clock)
        registry.apply_status("d1", birth(1))
        store.create_run("r", config={}, strategy="fedavg", model_name="mlp")
        store.set_run_status("r", "running")
        store.save_checkpoint("r", 0, {"w": np.zeros(2, np.float32)}, {})
        store.open_round("r", 1, selected=["d1"], deadline=T0 + 10, model_version_in=0)
        store.record_update("r", 1, "d1", b"u" * 64, 10)
        store.record_rejection("r", 1, "d1", "non_finite")
        store.record_rejection("r", 1, "d1", "stale_round")
        store.record_rejection("r", 1, "d1", "non_finite")
        store.add_traffic("r", 1, "d1", down=4096)
        registry.record_failure("d1", "out of memory")
        registry.cordon("d1")
        registry.tag("d1", "site=lab")
        before = registry.get("d1")

    with Store(root, create=False, clock=clock) as store:
        after = DeviceRegistry(store, clock=clock).get("d1")
    assert after == before
    c = after.counters
    assert (c.rounds_joined, c.updates_accepted, c.failures, c.bytes_up, c.bytes_down) == (
        1,
        1,
        1,
        64,
        4096,
    )
    assert c.rejections == {"non_finite": 2, "stale_round": 1}
    assert c.total_rejections == 3
    assert (after.last_failure, after.cordoned, after.tags) == (
        "out of memory",
        True,
        {"site": "lab"},
    )


def test_another_process_sees_the_registry(registry: DeviceRegistry, store: Store) -> None:
    """`fleet devices list` runs in its own process while the runner owns the registry."""
    registry.apply_status("d1", birth(3, tags=("site=lab",)))
    registry.apply_status("d2", birth(1))
    registry.apply_status("d2", will(1))
    registry.cordon("d1")
    code = f"""
        import json
        from fleet.ops.registry import DeviceRegistry
        from fleet.state.store import Store
        reg = DeviceRegistry(Store({str(store.root)!r}, create=False))
        print(json.dumps([[d.device_id, d.online, d.cordoned, d.session_epoch, dict(d.tags)]
                          for d in reg.devices()]))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        ["d1", True, True, 3, {"site": "lab"}],
        ["d2", False, False, 1, {}],
    ]

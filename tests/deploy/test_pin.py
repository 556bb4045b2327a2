"""A device pinned to a model version (``deploy.pin``) serves that version whatever the fleet
deploys: it activates it from its models directory at start, refuses every other version with
a reason the operator sees, and follows the fleet again once the pin is removed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.deploy_pin import activate_pin
from device.errors import ConfigError
from device.model_store import ModelStore, Pending
from device.settings import load_device_config
from device.trust import TrustedKeys
from device.wire.topics import Topics
from fleet.deploy.rollout import Rollout, RolloutOptions, RolloutResult
from fleet.deploy.signing import generate_key
from fleet.deploy.targets import resolve_targets
from fleet.ops.registry import DeviceRegistry
from tests.deploy.helpers import Fleet, make_fleet, wait_for

FAST = RolloutOptions(canary_timeout_s=10.0, wait_s=10.0)
R1, R2, R2_FP16 = "lab-r1-int8", "lab-r2-int8", "lab-r2-fp16"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, versions=3)
    yield fleet
    fleet.stop()


def _deploy(fleet: Fleet, data: bytes, **options: object) -> RolloutResult:
    rollout = Rollout(fleet.store, fleet.fleet_transport(), Topics())
    rollout.listen()
    rollout.pump(0.3)
    targets = resolve_targets("all", DeviceRegistry(fleet.store).devices())
    return rollout.deploy(data, targets, dataclasses.replace(FAST, **options))  # type: ignore[arg-type]


def _serving(fleet: Fleet, device_id: str) -> str:
    deployed = fleet.agents[device_id].deployer.deployed()  # type: ignore[union-attr]
    return deployed.version if deployed is not None else ""


def _restart(fleet: Fleet, device_id: str, pin: str | None) -> None:
    fleet.agents[device_id].stop()
    fleet.device(device_id, pin=pin)


def _states(result: RolloutResult) -> dict[str, tuple[str, str]]:
    return {d.device_id: (d.state, d.reason) for d in result.devices}


def test_a_pin_activates_a_kept_version_and_refuses_every_other(fleet: Fleet) -> None:
    """Pinned to the version before, the device switches back to it at start; a deployment of
    a third version fails on it with the pin as the reason while an unpinned device installs
    it."""
    fleet.device("a")
    fleet.device("b")
    _deploy(fleet, fleet.export(round_=1).data)
    _deploy(fleet, fleet.export(round_=2).data)
    assert _serving(fleet, "a") == R2
    _restart(fleet, "a", pin=R1)
    wait_for(lambda: _serving(fleet, "a") == R1, what="the pinned version to be active")
    deployed = fleet.agents["a"].deployer.deployed()  # type: ignore[union-attr]
    assert deployed is not None and deployed.deployment_id == ""  # a local activation

    states = _states(_deploy(fleet, fleet.export(round_=2, values="fp16").data))
    assert states["b"][0] == "active"
    state, reason = states["a"]
    assert state == "failed"
    assert f"pinned to model version {R1!r} (deploy.pin" in reason
    assert f"serves version {R1!r}" in reason
    assert _serving(fleet, "a") == R1 and _serving(fleet, "b") == R2_FP16


def test_removing_the_pin_installs_the_newest_deployment(fleet: Fleet) -> None:
    """Refused notices are not applied: unpinned, the device catches up with the fleet."""
    fleet.device("a", pin=R1)
    assert _states(_deploy(fleet, fleet.export(round_=1).data))["a"][0] == "active"
    assert _states(_deploy(fleet, fleet.export(round_=2).data))["a"][0] == "failed"
    _restart(fleet, "a", pin=None)
    wait_for(lambda: _serving(fleet, "a") == R2, what="the newest deployment after unpinning")


def test_a_pin_not_kept_here_waits_for_a_deployment_of_that_version(fleet: Fleet) -> None:
    """Nothing to activate yet: the device serves nothing, refuses the other version, and
    installs the pinned one when the fleet deploys it."""
    fleet.device("a", pin=R2)
    assert _states(_deploy(fleet, fleet.export(round_=1).data))["a"][0] == "failed"
    assert _serving(fleet, "a") == ""
    assert _states(_deploy(fleet, fleet.export(round_=2).data))["a"][0] == "active"
    assert _serving(fleet, "a") == R2


def test_a_pending_download_of_another_version_is_dropped_at_start(fleet: Fleet) -> None:
    fleet.device("a")
    _deploy(fleet, fleet.export(round_=1).data)
    fleet.agents["a"].stop()
    store = ModelStore(fleet.root / "devices" / "a" / "models")
    store.update(pending=Pending("d-other", 99, R2, "00" * 32))
    fleet.device("a", pin=R1)
    wait_for(
        lambda: (
            store.state().last_event is not None
            and store.state().last_event.deployment_id == "d-other"
        ),  # type: ignore[union-attr]
        what="the pending deployment to be refused",
    )
    last = store.state().last_event
    assert last is not None and last.state == "failed" and "pinned" in last.reason
    assert store.state().pending is None and _serving(fleet, "a") == R1


def test_activate_pin_names_what_is_wrong(fleet: Fleet, tmp_path: Path) -> None:
    """Not kept, or a file no trusted key signed: nothing changes and the reason says why."""
    store = ModelStore(tmp_path / "models")
    data = fleet.export(round_=1).data
    store.write(R1, data)
    problem = activate_pin(store, R2, fleet.trusted())
    assert problem is not None and f"{R2!r} is not in" in problem and f"kept: {R1}" in problem
    stranger = TrustedKeys([generate_key(tmp_path / "other").public_raw])
    problem = activate_pin(store, R1, stranger)
    assert problem is not None and "cannot activate" in problem
    assert store.state().active is None
    assert activate_pin(store, R1, fleet.trusted()) is None
    assert store.state().active is not None and store.state().active.version == R1  # type: ignore[union-attr]


def test_a_pin_that_is_no_version_label_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    key.write_text("unused")
    config = tmp_path / "device.yaml"
    config.write_text(f"device_id: a\ndeploy:\n  trusted_keys: [{key}]\n  pin: ../etc\n")
    with pytest.raises(ConfigError, match="pin"):
        load_device_config(config)
    config.write_text(f"device_id: a\ndeploy:\n  trusted_keys: [{key}]\n  pin: v1.2\n")
    deploy = load_device_config(config).deploy
    assert deploy is not None and deploy.pin == "v1.2"

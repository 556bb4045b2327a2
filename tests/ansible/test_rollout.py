"""rollout.yml against three local "devices", each a real agent in its own scratch root.

The devices are ``ansible_connection=local`` hosts with their own roots and agents; without
systemd the role's restart handler runs ``fixtures/restart_agent.py``, which restarts the agent
from the rendered unit's ExecStart line as systemd would. The fleet host is this machine: the
real ``fleet`` command drains and uncordons the devices in a scratch state directory, and
``python -m fleet.ops.health`` watches a real mosquitto.

One scenario, because each phase needs the previous one: install the old version everywhere;
roll out the new one while the second device is misconfigured so that it never comes back (the
rollout must stop there, leaving the third device untouched); fix it and roll out again (every
device ends on the new version, one batch after the other); then pin the first device's
deployed model to a version it keeps (``fleet_device_model_version``): only it restarts, and
the rollout waits until it serves that version.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ansible_harness import (
    FIXTURES,
    VENV_BIN,
    AgentProcesses,
    Ansible,
    BrokerFactory,
    PlaybookEvent,
    PlaybookRun,
    StatusRecorder,
    WheelBuilder,
    bumped_version,
    device_vars,
    playbook_events,
    write_inventory,
)

from device import __version__
from device.model_store import ModelStore
from device.wire.broker import MosquittoBroker, free_port
from device.wire.messages import DeviceStatus
from fleet.deploy.export import export_run
from fleet.deploy.signing import PUBLIC_NAME, generate_key
from fleet.ops.enroll import generate_password
from fleet.ops.health import wait_for_version, wait_for_version_result
from fleet.ops.registry import DeviceRegistry
from fleet.state.store import Store
from tests.deploy.helpers import RUN, store_with_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

OLD = __version__
NEW = bumped_version(OLD)
DEVICES = ("pi-a", "pi-b", "pi-c")
BROKEN = "pi-b"
WATCHER = "watcher"
HEALTH_TIMEOUT_S = 45
FLEET_CLI = VENV_BIN / "fleet"


def _command_exists(argv: list[str]) -> bool:
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    return proc.returncode == 0


@pytest.fixture
def runtime_commands(tmp_path: Path) -> None:
    """Skip until the commands rollout.yml runs exist: the agent's `run` and the fleet CLI's
    `devices drain` / `devices uncordon` with `--state-dir`."""
    if not _command_exists([str(VENV_BIN / "fleet-device"), "run", "--help"]):
        pytest.skip("'fleet-device run' does not exist yet (MQTT runtime issue)")
    state = ["--state-dir", str(tmp_path / "probe")]
    for verb in ("drain", "uncordon"):
        if not _command_exists([str(FLEET_CLI), *state, "devices", verb, "--help"]):
            pytest.skip(f"'fleet --state-dir DIR devices {verb}' does not exist yet (CLI issue)")


class Fleet:
    """The scenario's broker, accounts, state directory and inventories."""

    def __init__(
        self,
        tmp_path: Path,
        broker: MosquittoBroker,
        passwords: dict[str, str],
        wheels: WheelBuilder,
        site_dir: Path,
    ) -> None:
        self.tmp = tmp_path
        self.broker = broker
        self.passwords = passwords
        self.wheels = wheels
        self.site_dir = site_dir
        self.state_dir = tmp_path / "fleet-state"
        self.watcher_password_file = tmp_path / "watcher.password"
        self.watcher_password_file.write_text(f"{passwords[WATCHER]}\n")
        self.closed_port = free_port()
        self.deploy_key = tmp_path / "pki" / PUBLIC_NAME

    def keep_model(self, device: str) -> str:
        """Sign an artefact with the fleet's deployment key and put it in ``device``'s models
        directory as an install would (not active); its version label."""
        key = generate_key(self.deploy_key.parent)
        store = store_with_run(self.tmp / "model-store")
        exported = export_run(store, RUN, key, dataset="digits")
        models = self.root(device) / "var/lib/sparsefleet/models"
        ModelStore(models).write(exported.artefact.manifest.version, exported.data)
        return exported.artefact.manifest.version

    def root(self, device: str) -> Path:
        return self.tmp / device

    def pidfile(self, device: str) -> Path:
        return self.tmp / f"{device}.pid"

    def inventory(
        self, version: str, *, broken: str | None = None, pins: dict[str, str] | None = None
    ) -> Path:
        devices: dict[str, dict[str, Any]] = {}
        for device in DEVICES:
            pin = (pins or {}).get(device, "")
            deploy = {"fleet_device_deploy_trusted_keys": [str(self.deploy_key)]} if pin else {}
            root = self.root(device)
            restart = [
                sys.executable,
                str(FIXTURES / "restart_agent.py"),
                *("--unit", str(root / "etc/systemd/system/fleet-device.service")),
                *("--pidfile", str(self.pidfile(device))),
                *("--log", str(self.tmp / f"{device}.log")),
            ]
            port = self.closed_port if device == broken else self.broker.port
            devices[device] = {
                "ansible_connection": "local",
                **device_vars(
                    root,
                    wheel=self.wheels(version),
                    version=version,
                    site_dir=self.site_dir,
                    broker_port=port,
                    password=self.passwords[device],
                    restart_command=restart,
                    fleet_device_model_version=pin,
                    **deploy,
                ),
            }
        shared = {
            "sparsefleet_fleet_cli": str(FLEET_CLI),
            "sparsefleet_fleet_python": sys.executable,
            "sparsefleet_state_dir": str(self.state_dir),
            "sparsefleet_topics_prefix": "fl/v1",
            "sparsefleet_fleet_broker_host": self.broker.host,
            "sparsefleet_fleet_broker_port": self.broker.port,
            "sparsefleet_fleet_username": WATCHER,
            "sparsefleet_fleet_password_file": str(self.watcher_password_file),
            "sparsefleet_health_timeout_s": HEALTH_TIMEOUT_S,
        }
        groups = {"fleet": {"fleet-local": {"ansible_connection": "local"}}, "devices": devices}
        name = f"hosts-{version}-{broken or 'ok'}{'-pinned' if pins else ''}.yml"
        return write_inventory(self.tmp / name, groups, shared)

    def online_with(self, device: str, version: str, timeout_s: float) -> bool:
        return wait_for_version(
            self.broker.host,
            self.broker.port,
            device,
            version,
            timeout_s,
            WATCHER,
            self.passwords[WATCHER],
        )

    def drained(self, device: str) -> bool:
        return DeviceRegistry(Store(self.state_dir)).get(device).drained


@pytest.fixture
def fleet(
    runtime_commands: None,
    broker_factory: BrokerFactory,
    wheels: WheelBuilder,
    reused_site_dir: Path,
    agents: AgentProcesses,
    tmp_path: Path,
) -> Iterator[Fleet]:
    passwords = {name: generate_password() for name in (*DEVICES, WATCHER)}
    broker = broker_factory(passwords)
    fleet = Fleet(tmp_path, broker, passwords, wheels, reused_site_dir)
    agents.pidfiles.extend(fleet.pidfile(device) for device in DEVICES)
    # The fleet manager knows the devices (it learns them from their births when it runs):
    # `fleet devices drain` refuses unknown ones.
    registry = DeviceRegistry(Store(fleet.state_dir))
    for device in DEVICES:
        registry.apply_status(device, DeviceStatus(online=True, session_epoch=1, agent_version=OLD))
    yield fleet


def _index(events: list[PlaybookEvent], task: str, host: str) -> int:
    for i, event in enumerate(events):
        if event.task == task and event.host == host and event.status != "skipping":
            return i
    raise AssertionError(f"no result of {task!r} for {host}")


DRAIN = "Drain the device before its upgrade"
RESTART = "Restart fleet-device with the configured command"
HEALTH = "Wait until the device reports the new version"
UNCORDON = "Let the device take part in runs again"


def _assert_batch_order(run: PlaybookRun, devices: list[str], restarted: set[str]) -> None:
    """Each device is drained, restarted (when something changed), checked and uncordoned, and
    only then does the next device's batch start."""
    events = playbook_events(run.output)
    previous_end = -1
    for device in devices:
        drain = _index(events, DRAIN, device)
        health = _index(events, HEALTH, device)
        uncordon = _index(events, UNCORDON, device)
        assert previous_end < drain < health < uncordon, (device, run.explain())
        if device in restarted:
            assert drain < _index(events, RESTART, device) < health, (device, run.explain())
        previous_end = uncordon


def test_rollout_goes_batch_by_batch_and_stops_at_a_device_that_never_comes_back(
    ansible: Ansible, fleet: Fleet
) -> None:
    # Phase 0: the old version everywhere (the role's first run starts each agent).
    install = ansible.playbook("site.yml", fleet.inventory(OLD), "--limit", "devices")
    assert install.returncode == 0, install.explain()
    for device in DEVICES:
        assert fleet.online_with(device, OLD, 60), f"{device} did not come online with {OLD}"

    broker = fleet.broker
    recorder = StatusRecorder(broker.host, broker.port, WATCHER, fleet.passwords[WATCHER])
    try:
        # Phase 1: pi-b gets a broker port nobody listens on, so its new agent never comes back.
        failed = ansible.playbook("rollout.yml", fleet.inventory(NEW, broken=BROKEN))
        assert failed.returncode != 0, failed.explain()
        assert failed.recap["pi-a"]["failed"] == 0, failed.explain()
        assert failed.recap[BROKEN]["failed"] == 1, failed.explain()
        # The batch failed: the rollout stopped before pi-c's batch.
        assert failed.recap.get("pi-c", {}).get("ok", 0) == 0, failed.explain()
        assert f"did not come back with agent version {NEW}" in failed.output
        _assert_batch_order(failed, ["pi-a"], {"pi-a"})
        events = playbook_events(failed.output)
        assert _index(events, DRAIN, BROKEN) < _index(events, RESTART, BROKEN)

        a_new = recorder.first("pi-a", online=True, version=NEW)
        b_down = recorder.first(BROKEN, online=False)
        assert a_new is not None and b_down is not None, recorder.events
        assert a_new < b_down, "pi-b was restarted before pi-a was back with the new version"
        assert recorder.of("pi-c") == [], "pi-c was touched although the rollout had stopped"
        assert fleet.online_with("pi-c", OLD, 5)
        # pi-a is back in service; the broken device stays drained, out of every run.
        assert not fleet.drained("pi-a")
        assert fleet.drained(BROKEN)
        assert not fleet.drained("pi-c")

        # Phase 2: pi-b fixed, the same rollout again: everything ends on the new version.
        phase2_start = len(recorder.events)
        done = ansible.playbook("rollout.yml", fleet.inventory(NEW))
        assert done.returncode == 0, done.explain()
        # pi-a is on the new version already: drained and checked, but not restarted.
        _assert_batch_order(done, list(DEVICES), {BROKEN, "pi-c"})
        for device in DEVICES:
            assert fleet.online_with(device, NEW, 10), f"{device} is not on {NEW}"
            assert not fleet.drained(device)
        later = recorder.events[phase2_start:]
        # pi-a already had the new version: the rollout did not restart it.
        assert not [e for e in later if e.device_id == "pi-a" and not e.online], later
        b_new = recorder.first(BROKEN, online=True, version=NEW)
        c_down = next(e.at for e in later if e.device_id == "pi-c" and not e.online)
        assert b_new is not None and b_new < c_down, later

        # Phase 3: pin pi-a's deployed model to a version it keeps. Its configuration changes,
        # so only it restarts, activates the version and reports it in its status.
        model = fleet.keep_model("pi-a")
        phase3_start = len(recorder.events)
        pinned = ansible.playbook("rollout.yml", fleet.inventory(NEW, pins={"pi-a": model}))
        assert pinned.returncode == 0, pinned.explain()
        _assert_batch_order(pinned, list(DEVICES), {"pi-a"})
        later = recorder.events[phase3_start:]
        restarted = {e.device_id for e in later if not e.online}
        assert restarted == {"pi-a"}, later
        result = wait_for_version_result(
            fleet.broker.host,
            fleet.broker.port,
            "pi-a",
            NEW,
            5,
            username=WATCHER,
            password=fleet.passwords[WATCHER],
            model_version=model,
        )
        assert result.ok, result.describe()
    finally:
        recorder.close()

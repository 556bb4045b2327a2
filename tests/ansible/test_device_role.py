"""The fleet_device role, converged for real against localhost into a scratch root.

site.yml runs twice against one ``ansible_connection=local`` device whose paths all live under
``tmp_path``: the first run installs, the second must change nothing (idempotence is what makes
re-running a playbook on a fleet safe). Then the files are checked as the agent and an attacker
would see them, and the agent is started from the rendered unit's ExecStart line against a real
mosquitto and must show up online with the wheel's version.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ansible_harness import (
    AgentProcesses,
    Ansible,
    PlaybookRun,
    WheelBuilder,
    account_vars,
    device_vars,
    exec_start,
    require_mosquitto,
    skip_without_agent_run,
    task_output,
    write_inventory,
)

from device import __version__
from device.settings import load_device_config
from device.wire.broker import MosquittoBroker
from fleet.ops.enroll import set_password
from fleet.ops.health import wait_for_version_result

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEVICE = "pi-local"
PASSWORD = "device-secret-4f1c9a"  # distinctive, so a leak into the output is found
WATCHER = ("watcher", "watcher-secret")


@dataclass(frozen=True)
class Converged:
    root: Path
    inventory: Path
    first: PlaybookRun
    second: PlaybookRun
    broker: MosquittoBroker

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="module")
def converged(
    ansible: Ansible,
    wheels: WheelBuilder,
    reused_site_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Converged]:
    """site.yml run twice against one local device (the first run at -vvv, to catch leaks)."""
    require_mosquitto()
    base = tmp_path_factory.mktemp("device-role")
    passwd = base / "passwd"
    set_password(passwd, DEVICE, PASSWORD)
    set_password(passwd, *WATCHER)
    broker = MosquittoBroker(
        state_dir=base / "broker", allow_anonymous=False, extra_config=[f"password_file {passwd}"]
    )
    broker.start()
    root = base / "root"
    host = device_vars(
        root,
        wheel=wheels(__version__),
        version=__version__,
        site_dir=reused_site_dir,
        broker_port=broker.port,
        password=PASSWORD,
        fleet_device_tags=["lab", "arm64"],
    )
    inventory = write_inventory(
        base / "hosts.yml", {"devices": {DEVICE: {"ansible_connection": "local", **host}}}
    )
    try:
        first = ansible.playbook("site.yml", inventory, "-vvv")
        assert first.returncode == 0, first.explain()
        second = ansible.playbook("site.yml", inventory)
        yield Converged(root, inventory, first, second, broker)
    finally:
        broker.cleanup()


def test_second_converge_changes_nothing(converged: Converged) -> None:
    """Idempotence: re-running site.yml on an installed device reports changed=0."""
    assert converged.first.changed(DEVICE) > 0
    assert converged.second.returncode == 0, converged.second.explain()
    recap = converged.second.recap[DEVICE]
    assert recap["changed"] == 0, converged.second.explain()
    assert recap["failed"] == 0 and recap["unreachable"] == 0


def test_secrets_never_reach_the_output(converged: Converged) -> None:
    """The password is marked no_log: even at -vvv it must not appear in Ansible's output."""
    assert PASSWORD not in converged.first.output
    assert PASSWORD not in converged.second.output
    assert "censored" in converged.first.output


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_password_file_is_private_to_the_agent(converged: Converged) -> None:
    """Credentials are 0600, owned by the agent's user, in a 0700 directory."""
    secrets = converged.path("etc/sparsefleet/secrets")
    password = secrets / "mqtt.password"
    assert password.read_text() == f"{PASSWORD}\n"
    assert _mode(password) == 0o600
    assert _mode(secrets) == 0o700
    assert password.owner() == secrets.owner() == account_vars()["fleet_device_user"]
    assert _mode(converged.path("etc/sparsefleet/device.yaml")) == 0o640
    # The role creates parents with 0755: /var/lib must not become private to the agent.
    assert _mode(converged.path("var/lib")) == 0o755


def test_device_yaml_carries_the_inventory_settings(converged: Converged) -> None:
    """The rendered YAML passes the agent's own config loader and carries every setting from
    the inventory, with paths inside the scratch root."""
    path = converged.path("etc/sparsefleet/device.yaml")
    config = load_device_config(path)  # the agent's own schema: unknown keys are errors
    assert config.device_id == DEVICE
    assert config.broker.url == f"mqtt://127.0.0.1:{converged.broker.port}"
    assert config.broker.username == DEVICE
    assert config.broker.password_file == converged.path("etc/sparsefleet/secrets/mqtt.password")
    assert config.broker.tls is None
    assert config.data.dataset == "digits"
    assert config.tags == ("lab", "arm64")
    assert config.topics_prefix == "fl/v1"
    assert config.log_level == "DEBUG"
    assert config.torch_onednn == "auto"  # off below 768 MB, decided by the agent
    # Secrets stay out of the YAML (it may be logged and is group-readable).
    assert PASSWORD not in path.read_text()


def test_unit_runs_the_installed_agent_and_restarts_on_failure(converged: Converged) -> None:
    """The systemd unit starts the virtualenv's fleet-device on the rendered config, as the
    agent's user, and systemd restarts it when it fails."""
    unit = converged.path("etc/systemd/system/fleet-device.service").read_text()
    venv = converged.path("opt/sparsefleet/venv")
    config = converged.path("etc/sparsefleet/device.yaml")
    assert f"ExecStart={venv}/bin/fleet-device run --config {config}\n" in unit
    assert "Restart=on-failure\n" in unit
    assert "WantedBy=multi-user.target" in unit
    assert f"User={account_vars()['fleet_device_user']}\n" in unit
    # Freed tensors go back to the system (docs/hardware.md, "Settings that lower memory"):
    # 1 MiB on a machine with 768 MB or more, as this one.
    assert "Environment=MALLOC_MMAP_THRESHOLD_=1048576\n" in unit


def test_virtualenv_runs_the_wheel_not_the_checkout(converged: Converged) -> None:
    """The installed agent is the wheel's code (in the virtualenv), not this source tree."""
    python = converged.path("opt/sparsefleet/venv/bin/python")
    proc = subprocess.run(
        [str(python), "-c", "import device; print(device.__version__); print(device.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        # Not this checkout: `python -c` puts the working directory first on sys.path.
        cwd=converged.path("var/lib/sparsefleet"),
    )
    version, location = proc.stdout.split()
    assert version == __version__
    assert Path(location).is_relative_to(converged.path("opt/sparsefleet/venv"))


def test_service_tasks_are_skipped_without_systemd(converged: Converged) -> None:
    """Where systemd is not PID 1 (containers, CI) the service tasks are skipped, not failed."""
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        pytest.skip("systemd is PID 1 here: the service tasks run instead")
    for run in (converged.first, converged.second):
        block = task_output(run.output, "fleet_device : Enable and start the agent")
        results = re.findall(r"^(ok|changed|skipping|fatal): \[pi-local\]", block, re.MULTILINE)
        assert results == ["skipping"], block


def test_password_stays_when_a_later_run_does_not_know_it(
    converged: Converged, ansible: Ansible, tmp_path: Path
) -> None:
    """enroll.yml hands the password over once; site.yml and rollout.yml run without it and
    must keep both the file and the config's reference to it (changed=0)."""
    inventory = yaml.safe_load(converged.inventory.read_text())
    inventory["all"]["children"]["devices"]["hosts"][DEVICE]["fleet_device_mqtt_password"] = ""
    without = tmp_path / "hosts.yml"
    without.write_text(yaml.safe_dump(inventory))
    run = ansible.playbook("site.yml", without)
    assert run.returncode == 0, run.explain()
    assert run.changed(DEVICE) == 0, run.explain()
    assert converged.path("etc/sparsefleet/secrets/mqtt.password").read_text() == f"{PASSWORD}\n"


def test_agent_started_from_the_unit_shows_online(
    converged: Converged, agents: AgentProcesses, tmp_path: Path
) -> None:
    """The installed agent, started exactly as systemd would (ExecStart, WorkingDirectory),
    logs in with its password and publishes a retained status: online, with the wheel's version.
    """
    unit = converged.path("etc/systemd/system/fleet-device.service")
    argv = exec_start(unit)
    skip_without_agent_run(argv[0])
    log = tmp_path / "agent.log"
    agents.start(argv, log, cwd=converged.path("var/lib/sparsefleet"))
    broker = converged.broker
    result = wait_for_version_result(
        broker.host, broker.port, DEVICE, __version__, 60, username=WATCHER[0], password=WATCHER[1]
    )
    assert result.ok, f"{result.describe()}\nagent log:\n{log.read_text()[-4000:]}"

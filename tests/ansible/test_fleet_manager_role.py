"""The fleet_manager role, converged twice against localhost into a scratch root.

The fleet host is where rollout.yml drains devices and runs the health check, with the `fleet`
command and Python this role installs, so both must work from its virtualenv; re-running the
role must change nothing, and the fleet manager's password must stay private.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_harness import Ansible, WheelBuilder, write_inventory

from device import __version__

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PASSWORD = "fleet-manager-secret-51d0"


def test_fleet_manager_role_installs_the_fleet_command_idempotently(
    ansible: Ansible, wheels: WheelBuilder, reused_site_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    run_config = tmp_path / "run.yaml"
    run_config.write_text("# a run file (its contents are the CLI's business)\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    host = {
        "ansible_connection": "local",
        "fleet_manager_root": str(root),
        "fleet_manager_version": __version__,
        "fleet_manager_wheel": str(wheels(__version__)),
        "fleet_manager_manage_packages": False,
        "fleet_manager_manage_user": False,
        "fleet_manager_user": user,
        "fleet_manager_group": grp.getgrgid(os.getgid()).gr_name,
        "fleet_manager_python": sys.executable,
        "fleet_manager_venv_extra_site_dirs": [str(reused_site_dir)],
        "fleet_manager_install_torch": False,
        "fleet_manager_pip_extra_args": "--no-deps --no-index",
        "fleet_manager_mqtt_password": PASSWORD,
        "fleet_manager_run_config_src": str(run_config),
    }
    inventory = write_inventory(tmp_path / "hosts.yml", {"fleet": {"hub": host}})
    first = ansible.playbook("site.yml", inventory)
    assert first.returncode == 0, first.explain()
    second = ansible.playbook("site.yml", inventory)
    assert second.returncode == 0, second.explain()
    assert second.changed("hub") == 0, second.explain()
    assert PASSWORD not in first.output + second.output

    venv = root / "opt/sparsefleet/venv"
    state = root / "var/lib/sparsefleet"
    fleet = subprocess.run(
        [str(venv / "bin/fleet"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=state,
    )
    assert __version__ in fleet.stdout
    # rollout.yml runs the health check with this Python.
    health = subprocess.run(
        [str(venv / "bin/python"), "-m", "fleet.ops.health", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=state,
    )
    assert health.returncode == 0, health.stderr
    secret = root / "etc/sparsefleet/secrets/mqtt.password"
    assert secret.read_text() == f"{PASSWORD}\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    unit = (root / "etc/systemd/system/sparsefleet-fleet.service").read_text()
    assert "Restart=on-failure\n" in unit
    assert f"--state-dir {state} run start {root}/etc/sparsefleet/run.yaml" in unit

"""fleet_device's model deployments: tasks/model_deploy.yml and the deploy section of
device.yaml.j2, including the pin of the deployed model version (fleet_device_model_version).

A rollout that pins a version the device does not keep must stop for that device before its
configuration changes (the agent would otherwise restart into a pin it cannot serve), and the
message must say which versions it does keep. Fast: local hosts, no virtualenv, no agent (the
agent's side of the pin is tests/deploy/test_pin.py).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Any

from ansible_harness import REPO, Ansible, PlaybookRun, write_inventory

from device.settings import load_device_config
from device.trust import load_trusted_keys
from fleet.deploy.signing import PUBLIC_NAME, generate_key

PLAYBOOK = """
- name: The fleet_device role's model deployment tasks
  hosts: all
  gather_facts: false
  tasks:
    - name: Run the model deployment task file
      ansible.builtin.include_role:
        name: fleet_device
        tasks_from: model_deploy.yml
        public: true
    - name: Render the agent's configuration
      ansible.builtin.template:
        src: "{{ playbook_dir_of_role }}/templates/device.yaml.j2"
        dest: "{{ rendered_config }}"
        mode: "0644"
"""

ROLE = REPO / "ansible" / "roles" / "fleet_device"


def _host(root: Path, **extra: Any) -> dict[str, Any]:
    """Host variables of a scratch device under ``root`` (handlers: nothing to restart)."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "ansible_connection": "local",
        "fleet_device_config_dir": str(root / "etc"),
        "fleet_device_data_dir": str(root / "data"),
        "fleet_device_systemd_active": False,
        "fleet_device_restart_command": [],
        "fleet_device_password_configured": False,
        "fleet_device_user": pwd.getpwuid(os.getuid()).pw_name,
        "fleet_device_group": grp.getgrgid(os.getgid()).gr_name,
        "playbook_dir_of_role": str(ROLE),
        "rendered_config": str(root / "device.yaml"),
        **extra,
    }


def _keeps(root: Path, *versions: str) -> None:
    """The models directory as the agent leaves it after installing ``versions``."""
    directory = root / "data" / "models" / "versions"
    directory.mkdir(parents=True)
    for version in versions:
        (directory / f"{version}.sfm").write_bytes(b"an artefact")
        (directory / f"{version}.plan.json").write_text("{}")


def _text(run: PlaybookRun, host: str) -> str:
    blocks = re.split(r"\n(?=TASK \[|PLAY RECAP|RUNNING HANDLER)", run.output)
    return "\n".join(b for b in blocks if f"[{host}]" in b)


def test_pin_is_written_only_for_a_kept_version(ansible: Ansible, tmp_path: Path) -> None:
    """The kept version is pinned in device.yaml (which the agent's loader accepts, with the
    copied key loadable); a version not kept, or a pin without deployments, stops the play for
    that device with the reason, and a device without keys gets no deploy section."""
    key = generate_key(tmp_path / "pki")
    public = tmp_path / "pki" / PUBLIC_NAME
    _keeps(tmp_path / "pinned", "lab-r1-int8", "lab-r2-int8")
    _keeps(tmp_path / "missing", "lab-r1-int8")
    keys = {"fleet_device_deploy_trusted_keys": [str(public)]}
    hosts = {
        "pinned": _host(tmp_path / "pinned", fleet_device_model_version="lab-r1-int8", **keys),
        "missing": _host(tmp_path / "missing", fleet_device_model_version="lab-r9-int8", **keys),
        "no-keys": _host(tmp_path / "no-keys", fleet_device_model_version="lab-r1-int8"),
        "follows": _host(tmp_path / "follows", fleet_device_remote_inference=True, **keys),
        "plain": _host(tmp_path / "plain"),
    }
    playbook = tmp_path / "model_deploy.yml"
    playbook.write_text(PLAYBOOK)
    inventory = write_inventory(tmp_path / "hosts.yml", {"devices": hosts})
    run = ansible.playbook(str(playbook), inventory, timeout_s=600)
    assert set(run.recap) == set(hosts), run.explain()
    for host in ("pinned", "follows", "plain"):
        assert run.recap[host]["failed"] == 0, _text(run, host)

    deploy = load_device_config(tmp_path / "pinned" / "device.yaml").deploy
    assert deploy is not None and deploy.pin == "lab-r1-int8"
    assert deploy.models_dir == tmp_path / "pinned" / "data" / "models"
    assert deploy.trusted_keys == (tmp_path / "pinned" / "etc" / "deploy-keys" / PUBLIC_NAME,)
    assert load_trusted_keys(deploy.trusted_keys).key_ids == (key.key_id,)
    assert stat.S_IMODE(deploy.models_dir.stat().st_mode) == 0o750

    follows = load_device_config(tmp_path / "follows" / "device.yaml").deploy
    assert follows is not None and follows.pin is None and follows.remote_inference
    assert load_device_config(tmp_path / "plain" / "device.yaml").deploy is None

    assert run.recap["missing"]["failed"] == 1
    missing = _text(run, "missing")
    assert '"lab-r9-int8" is not kept' in missing and "(kept: lab-r1-int8)" in missing
    assert not (tmp_path / "missing" / "device.yaml").exists()
    assert run.recap["no-keys"]["failed"] == 1
    assert "needs fleet_device_deploy_trusted_keys" in _text(run, "no-keys")

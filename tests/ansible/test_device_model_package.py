"""fleet_device's model package and local data: tasks/model_package.yml and device.yaml.j2.

A user's model code reaches the devices as a wheel or a project directory (built into a wheel
on the controller); the play builds every offered model with the agent's own code on the
device, so a broken factory stops the play there, before the agent restarts with it. The data
directory of the device's own data is laid out for the agent.

The fast test runs the task file and renders the agent's config on local hosts (no virtualenv,
seconds); the slow one installs real packages into scratch virtualenvs, twice (idempotence),
then once more after the project's code changed under the same version.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from ansible_harness import REPO, Ansible, PlaybookRun, write_inventory

from device.settings import load_device_config

PLAYBOOK = """
- name: The fleet_device role's model package tasks
  hosts: all
  gather_facts: false
  tasks:
    - name: Run the model package task file
      ansible.builtin.include_role:
        name: fleet_device
        tasks_from: model_package.yml
        public: true
    - name: Render the agent's configuration
      ansible.builtin.template:
        src: "{{ playbook_dir_of_role }}/templates/device.yaml.j2"
        dest: "{{ rendered_config }}"
        mode: "0644"
      when: rendered_config is defined
"""

ROLE = REPO / "ansible" / "roles" / "fleet_device"


def _owner() -> dict[str, Any]:
    return {
        "fleet_device_user": pwd.getpwuid(os.getuid()).pw_name,
        "fleet_device_group": grp.getgrgid(os.getgid()).gr_name,
    }


def _host(root: Path, **extra: Any) -> dict[str, Any]:
    """Host variables of a scratch device under ``root`` (handlers: nothing to restart)."""
    return {
        "ansible_connection": "local",
        "fleet_device_data_dir": str(root / "data"),
        "fleet_device_venv_dir": str(root / "venv"),
        "fleet_device_wheel_dir": str(root / "wheels"),
        "fleet_device_model_package_cache": str(root.parent / "cache"),
        "fleet_device_systemd_active": False,
        "fleet_device_restart_command": [],
        "playbook_dir_of_role": str(ROLE),
        **_owner(),
        **extra,
    }


def _play(ansible: Ansible, base: Path, hosts: dict[str, dict[str, Any]]) -> PlaybookRun:
    playbook = base / "model_package.yml"
    playbook.write_text(PLAYBOOK)
    inventory = write_inventory(base / "hosts.yml", {"devices": hosts})
    return ansible.playbook(str(playbook), inventory, timeout_s=600)


def _text(run: PlaybookRun, host: str) -> str:
    blocks = re.split(r"\n(?=TASK \[|PLAY RECAP|RUNNING HANDLER)", run.output)
    return "\n".join(b for b in blocks if f"[{host}]" in b)


def test_data_directory_config_and_refusals(ansible: Ansible, tmp_path: Path) -> None:
    """The data directory is the agent's (mode 0750); device.yaml carries the offered models and
    the local data section, which the agent's own loader accepts; a package that is neither a
    wheel nor a project is refused, naming the setting."""
    hosts = {
        "plain": _host(
            tmp_path / "plain",
            rendered_config=str(tmp_path / "plain.yaml"),
            fleet_device_password_configured=False,
            # The models are built with this test environment's agent (no install here).
            fleet_device_venv_dir=sys.prefix,
            fleet_device_models=["mlp", {"name": "mlp", "kwargs": {"hidden": 4}}],
            fleet_device_local_data={"format": "imagefolder", "classes": ["cat", "dog"]},
        ),
        "not-a-package": _host(
            tmp_path / "bad", fleet_device_model_package=str(tmp_path / "missing.whl")
        ),
    }
    run = _play(ansible, tmp_path, hosts)
    assert set(run.recap) == set(hosts), run.explain()
    assert run.recap["plain"]["failed"] == 0, _text(run, "plain")
    data = tmp_path / "plain" / "data" / "local"
    assert data.is_dir() and stat.S_IMODE(data.stat().st_mode) == 0o750
    config = load_device_config(tmp_path / "plain.yaml")
    assert [r.text for r in config.model_refs()] == ["mlp", 'mlp{"hidden":4}']
    assert re.search(r'- mlp\{"hidden":4\} [0-9a-f]{16}\n', _text(run, "plain"))  # built, digest
    assert getattr(config.data, "path", None) == data
    assert run.recap["not-a-package"]["failed"] == 1
    assert "fleet_device_model_package must be empty, a wheel file" in _text(run, "not-a-package")


# -- real installs ------------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "1.0"

[project.entry-points."sparsefleet.models"]
{entry} = "{name}.models:build"
"""

MODELS = """\
from torch import nn


def build(width={width}):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def broken():
    raise RuntimeError("this factory is broken")
"""


def _project(root: Path, name: str, entry: str, width: int = 8) -> Path:
    (root / name).mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(name=name, entry=entry))
    (root / name / "__init__.py").write_text("")
    (root / name / "models.py").write_text(MODELS.format(width=width))
    return root


def _wheel(project: Path, out: Path) -> Path:
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
            *("--no-build-isolation", "--no-index", "-w", str(out), str(project)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("*.whl"))


def _venv(path: Path, site_dir: Path) -> None:
    """A virtualenv that sees this checkout (the agent's code) and the reused packages."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    purelib = subprocess.run(
        [
            str(path / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "reuse.pth").write_text(f"{site_dir}\n{REPO}\n")


def _python(root: Path, code: str) -> str:
    return subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    ).stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheels_and_directories_install_idempotently_and_broken_factories_stop_the_play(
    ansible: Ansible, reused_site_dir: Path, tmp_path: Path
) -> None:
    wheel = _wheel(_project(tmp_path / "src-wheel", "wheel_models", "wheel_tiny"), tmp_path / "w")
    project = _project(tmp_path / "src-dir", "dir_models", "dir_tiny", width=8)
    install = {
        "fleet_device_pip_extra_args": "--no-index",
        "fleet_device_model_package_build_args": "--no-build-isolation --no-index",
    }
    hosts = {
        "pkg-wheel": _host(
            tmp_path / "pkg-wheel",
            fleet_device_model_package=str(wheel),
            fleet_device_models=["wheel_tiny", {"name": "wheel_tiny", "kwargs": {"width": 3}}],
            **install,
        ),
        "pkg-dir": _host(
            tmp_path / "pkg-dir",
            fleet_device_model_package=str(project),
            fleet_device_models=["dir_tiny"],
            **install,
        ),
        "pkg-broken": _host(
            tmp_path / "pkg-broken",
            fleet_device_model_package=str(wheel),
            fleet_device_models=["wheel_models.models:broken"],
            **install,
        ),
    }
    for name in hosts:  # what python.yml and user.yml make before this task file runs
        _venv(tmp_path / name / "venv", reused_site_dir)
        (tmp_path / name / "wheels").mkdir()

    first = _play(ansible, tmp_path, hosts)
    assert first.recap["pkg-wheel"]["failed"] == 0, _text(first, "pkg-wheel")
    assert first.recap["pkg-dir"]["failed"] == 0, _text(first, "pkg-dir")
    assert re.search(r'- wheel_tiny\{"width":3\} [0-9a-f]{16}\n', _text(first, "pkg-wheel"))
    broken = " ".join(_text(first, "pkg-broken").replace("''", "'").split())  # YAML-quoted
    assert first.recap["pkg-broken"]["failed"] == 1
    assert "model factory 'wheel_models.models:broken' raised RuntimeError" in broken

    second = _play(ansible, tmp_path, {k: v for k, v in hosts.items() if k != "pkg-broken"})
    assert second.changed("pkg-wheel") == 0, _text(second, "pkg-wheel")
    assert second.changed("pkg-dir") == 0, _text(second, "pkg-dir")

    # New code under the same version: rebuilt, reinstalled, and what the agent imports.
    (project / "dir_models" / "models.py").write_text(MODELS.format(width=5))
    third = _play(ansible, tmp_path, {"pkg-dir": hosts["pkg-dir"]})
    assert third.recap["pkg-dir"]["failed"] == 0, _text(third, "pkg-dir")
    assert third.changed("pkg-dir") > 0
    code = textwrap.dedent(
        """
        from device.models import create_model
        print(create_model("dir_tiny").state_dict()["1.weight"].shape[0])
        """
    )
    assert _python(tmp_path / "pkg-dir", code) == "5"

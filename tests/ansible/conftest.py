"""Fixtures for the Ansible tests: tools, wheels, scratch inventories, brokers and agents.

Playbooks run for real with ``ansible-playbook`` against ``ansible_connection=local`` hosts (or an
sshd on loopback) that converge into scratch roots under ``tmp_path``. Every test that needs
Ansible is skipped, naming the install command, when ``ansible-playbook`` is missing.

For speed, the scratch virtualenvs reuse this test environment's packages (PyTorch above all)
through ``fleet_device_venv_extra_site_dirs``: a session directory of symbolic links to this
virtualenv's site-packages, minus sparsefleet itself (installed here in editable mode; the
playbook must install its own wheel) and minus pip and setuptools (each virtualenv has its own).
The sparsefleet wheels are built once per session from a copy of the source tree, with the
version rewritten for the upgrade tests.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

# The helpers live next to this file; with --import-mode=importlib the test directory is not on
# sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ansible_harness import (
    ANSIBLE_DIR,
    NOT_REUSED,
    VENV_BIN,
    AgentProcesses,
    Ansible,
    BrokerFactory,
    WheelBuilder,
    require_mosquitto,
    require_tool,
)

from device.wire.broker import MosquittoBroker


@pytest.fixture(scope="session")
def ansible(tmp_path_factory: pytest.TempPathFactory) -> Ansible:
    """Ansible from this virtualenv; skips when ansible-core is not installed."""
    playbook = require_tool("ansible-playbook", "ansible-core")
    home = tmp_path_factory.mktemp("ansible-home")
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return Ansible(Path(playbook).parent, env)


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> WheelBuilder:
    """``wheels(version)`` -> path of a sparsefleet wheel reporting that agent version."""
    return WheelBuilder(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def reused_site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This virtualenv's site-packages as symbolic links, without sparsefleet, pip, setuptools."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp_path_factory.mktemp("reused-site")
    for entry in site.iterdir():
        if NOT_REUSED.match(entry.name) or entry.suffix == ".pth":
            continue
        (out / entry.name).symlink_to(entry)
    return out


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """``broker_factory(accounts={user: password})``: a mosquitto on a free loopback port that
    accepts only those accounts (no ACL); stopped after the test."""
    require_mosquitto()
    from fleet.ops.enroll import set_password

    brokers: list[MosquittoBroker] = []

    def start(accounts: Mapping[str, str] | None = None) -> MosquittoBroker:
        state = tmp_path / f"broker-{len(brokers)}"
        state.mkdir()
        extra: list[str] = []
        if accounts:
            passwd = state / "passwd"
            for user, password in accounts.items():
                set_password(passwd, user, password)
            extra.append(f"password_file {passwd}")
        broker = MosquittoBroker(state_dir=state, allow_anonymous=not accounts, extra_config=extra)
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.cleanup()


@pytest.fixture
def agents() -> Iterator[AgentProcesses]:
    procs = AgentProcesses()
    yield procs
    procs.stop_all()

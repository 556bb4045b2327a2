"""Helpers of the Ansible tests (see conftest.py for the fixtures built on them)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from device import __version__
from device.errors import BrokerUnavailableError
from device.wire.broker import MosquittoBroker, find_mosquitto

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENV_BIN = Path(sys.executable).parent
PLAYBOOKS = ("site.yml", "enroll.yml", "rollout.yml")

#: The user the converged files belong to: a dedicated system user when the tests run as root
#: (the role creates it, as on a Pi), else the current user (the role cannot create users then).
TEST_SYSTEM_USER = "sparsefleet-test"

RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+"
    r"rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.MULTILINE,
)


def find_tool(name: str) -> str | None:
    """``name`` from this virtualenv's bin directory, else from PATH."""
    local = VENV_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed: .venv/bin/pip install {package}")
    return path


# -- running playbooks ------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaybookRun:
    """One ``ansible-playbook`` run: exit code, combined output, and the PLAY RECAP per host."""

    returncode: int
    output: str
    recap: Mapping[str, Mapping[str, int]]

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]

    def explain(self) -> str:
        """The end of the output, for assertion messages."""
        return self.output[-6000:]


_TASK_HEADER = re.compile(r"^(TASK \[|RUNNING HANDLER \[|PLAY RECAP|PLAY \[)", re.MULTILINE)


def task_output(output: str, task: str) -> str:
    """The result lines of the first run of ``task`` ("role : name") in a playbook's output."""
    header = f"TASK [{task}]"
    start = output.index(header)
    body_start = output.index("\n", start) + 1
    following = _TASK_HEADER.search(output, body_start)
    return output[body_start : following.start() if following else len(output)].strip()


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    tail = output.rsplit("PLAY RECAP", 1)[-1] if "PLAY RECAP" in output else ""
    for match in RECAP_LINE.finditer(tail):
        fields = match.groupdict()
        host = fields.pop("host")
        recap[host] = {key: int(value) for key, value in fields.items()}
    return recap


@dataclass
class Ansible:
    """Runs Ansible commands with this repository's ansible.cfg and a private ANSIBLE_HOME."""

    bin_dir: Path
    env: dict[str, str]

    def playbook(
        self,
        playbook: str,
        inventory: Path,
        *args: str,
        timeout_s: float = 600.0,
    ) -> PlaybookRun:
        cmd = [str(self.bin_dir / "ansible-playbook"), "-i", str(inventory), playbook, *args]
        proc = subprocess.run(
            cmd,
            cwd=ANSIBLE_DIR,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return PlaybookRun(proc.returncode, proc.stdout, parse_recap(proc.stdout))


# -- wheels and the reused site-packages --------------------------------------------------------


def bumped_version(version: str = __version__) -> str:
    """A PEP 440 version newer than ``version`` (a post-release), for upgrade tests."""
    return f"{version}.post1"


@dataclass
class WheelBuilder:
    """Builds sparsefleet wheels of given versions from a copy of the source tree (cached)."""

    root: Path
    built: dict[str, Path] = field(default_factory=dict)

    def __call__(self, version: str = __version__) -> Path:
        if version in self.built:
            return self.built[version]
        src = self.root / f"src-{version}"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for part in ("device", "fleet"):
            shutil.copytree(REPO / part, src / part, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        init = src / "device" / "__init__.py"
        text = init.read_text()
        pattern = re.compile(r'^__version__ = "[^"]*"$', re.MULTILINE)
        assert pattern.search(text), "device/__init__.py has no __version__ line"
        init.write_text(pattern.sub(f'__version__ = "{version}"', text))
        dist = self.root / "dist"
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
                *("--no-build-isolation", "--no-index", "-w", str(dist), str(src)),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        wheel = dist / f"sparsefleet-{version}-py3-none-any.whl"
        assert wheel.is_file(), f"pip wheel did not produce {wheel.name}"
        self.built[version] = wheel
        return wheel


NOT_REUSED = re.compile(
    r"^(sparsefleet|__editable__|_?pip\b|pip-|setuptools|_distutils_hack|distutils-precedence"
    r"|wheel\b|wheel-)",
)


# -- inventories -----------------------------------------------------------------------------------


def account_vars() -> dict[str, Any]:
    """Who owns the converged files (see TEST_SYSTEM_USER)."""
    if os.geteuid() == 0:
        return {
            "fleet_device_manage_user": True,
            "fleet_device_user": TEST_SYSTEM_USER,
            "fleet_device_group": TEST_SYSTEM_USER,
            "fleet_device_user_home": "/nonexistent",
        }
    return {
        "fleet_device_manage_user": False,
        "fleet_device_user": pwd.getpwuid(os.getuid()).pw_name,
        "fleet_device_group": grp.getgrgid(os.getgid()).gr_name,
    }


def device_vars(
    root: Path,
    *,
    wheel: Path,
    version: str,
    site_dir: Path,
    broker_port: int,
    password: str = "",
    restart_command: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """Host variables of a scratch device converging into ``root`` (see the module docstring)."""
    return {
        "fleet_device_root": str(root),
        "fleet_device_version": version,
        "fleet_device_wheel": str(wheel),
        "fleet_device_manage_packages": False,
        "fleet_device_python": sys.executable,
        "fleet_device_venv_extra_site_dirs": [str(site_dir)],
        # PyTorch and the other dependencies come from the reused site-packages: nothing is
        # downloaded (torch's own requirements, e.g. setuptools>=77, would need an index).
        "fleet_device_install_torch": False,
        "fleet_device_pip_extra_args": "--no-deps --no-index",
        "fleet_device_broker_host": "127.0.0.1",
        "fleet_device_broker_port": broker_port,
        "fleet_device_mqtt_password": password,
        "fleet_device_restart_command": list(restart_command),
        "fleet_device_log_level": "DEBUG",
        # The bundled data set: no MNIST files needed.
        "fleet_device_dataset": "digits",
        **account_vars(),
        **extra,
    }


def write_inventory(
    path: Path,
    groups: Mapping[str, Mapping[str, Mapping[str, Any]]],
    all_vars: Mapping[str, Any] | None = None,
) -> Path:
    """An Ansible YAML inventory: ``groups`` maps group -> host -> host variables."""
    data: dict[str, Any] = {
        "all": {
            "vars": {
                "ansible_python_interpreter": sys.executable,
                # The playbooks become root (and the fleet manager's user): the tests run as
                # whoever runs them, into scratch roots, without sudo.
                "ansible_become": False,
                **(all_vars or {}),
            },
            "children": {name: {"hosts": dict(hosts)} for name, hosts in groups.items()},
        }
    }
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))
    return path


# -- brokers --------------------------------------------------------------------------------------


def require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs a mosquitto broker: {exc}")


BrokerFactory = Callable[..., MosquittoBroker]


# -- the installed agent ---------------------------------------------------------------------------


def exec_start(unit: Path) -> list[str]:
    """The argv of a systemd unit's ExecStart line (no quoting is used in our units)."""
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").split()
    raise AssertionError(f"{unit} has no ExecStart line")


def agent_run_available(fleet_device: str) -> bool:
    """True when the installed ``fleet-device`` has the ``run`` subcommand."""
    proc = subprocess.run(
        [fleet_device, "run", "--help"], capture_output=True, timeout=60, check=False
    )
    return proc.returncode == 0


def skip_without_agent_run(fleet_device: str) -> None:
    if not agent_run_available(fleet_device):
        pytest.skip(
            "the installed 'fleet-device' has no 'run' subcommand yet (the MQTT runtime issue "
            "adds it): the agent cannot be started from the unit's ExecStart line"
        )


@dataclass
class AgentProcesses:
    """Agents started by the tests, stopped (SIGTERM, then SIGKILL) at teardown."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pidfiles: list[Path] = field(default_factory=list)

    def start(self, argv: Sequence[str], log: Path, cwd: Path | None = None) -> None:
        with open(log, "ab") as out:
            self.processes.append(
                subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    start_new_session=True,
                )
            )

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pidfile in self.pidfiles:
            _stop_pidfile(pidfile)


def _stop_pidfile(pidfile: Path) -> None:
    """Stop the process a restart_agent.py pidfile names (the tests started it)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.1)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its adoptive parent) is not
    alive."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return state is not None and state.group(1) not in ("Z", "X")


# -- reading playbook output and watching statuses ------------------------------------------------

_EVENT_HEADER = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?:[\w.-]+ : )?(?P<task>[^\]]+)\]")
_EVENT_RESULT = re.compile(r"^(?P<status>ok|changed|skipping|fatal|failed): \[(?P<host>[^\]]+)\]")


@dataclass(frozen=True)
class PlaybookEvent:
    """One host's result of one task or handler, in output order."""

    task: str
    status: str
    host: str


def playbook_events(output: str) -> list[PlaybookEvent]:
    """Every "status: [host]" line of a playbook's default output with the task it belongs to
    (role prefixes dropped; a delegated result "[host -> other]" counts for ``host``)."""
    events: list[PlaybookEvent] = []
    task = ""
    for line in output.splitlines():
        header = _EVENT_HEADER.match(line)
        if header:
            task = header.group("task")
            continue
        result = _EVENT_RESULT.match(line)
        if result and task:
            host = result.group("host").split(" -> ")[0]
            events.append(PlaybookEvent(task, result.group("status"), host))
    return events


@dataclass(frozen=True)
class StatusEvent:
    """A status message seen live (not a retained replay): when, whose, online, version."""

    at: float
    device_id: str
    online: bool
    version: str


class StatusRecorder:
    """Records every live status message under ``{prefix}/dev/+/status`` (paho, MQTT 5)."""

    def __init__(
        self, host: str, port: int, username: str, password: str, prefix: str = "fl/v1"
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from device.wire.topics import Topics

        self.events: list[StatusEvent] = []
        self._subscribed = False
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self._client.username_pw_set(username, password)
        self._client.on_connect = lambda client, *_: client.subscribe(
            Topics(prefix).all_status(), qos=1
        )
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        deadline = time.monotonic() + 10
        while not self._subscribed:
            if time.monotonic() > deadline:
                raise AssertionError("status recorder could not subscribe")
            time.sleep(0.02)

    def _on_subscribe(self, *_: Any) -> None:
        self._subscribed = True

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        from device.wire import envelope
        from device.wire.messages import DeviceStatus

        if message.retain:
            return  # a replay of the state before the recorder started
        env = envelope.decode(bytes(message.payload))
        if isinstance(env.body, DeviceStatus):
            device = message.topic.split("/")[-2]
            self.events.append(
                StatusEvent(time.monotonic(), device, env.body.online, env.body.agent_version)
            )

    def first(self, device_id: str, *, online: bool, version: str | None = None) -> float | None:
        """Time of the first event of ``device_id`` with that state (None if there was none)."""
        for event in self.events:
            wanted = version is None or event.version == version
            if event.device_id == device_id and event.online == online and wanted:
                return event.at
        return None

    def of(self, device_id: str) -> list[StatusEvent]:
        return [event for event in self.events if event.device_id == device_id]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

"""The development broker behind ``fleet broker start|stop|status``.

``fleet broker start`` must outlive the command that started it, so its state lives in files of
the state directory (``<state-dir>/broker/``): ``broker.json`` says how it was started (mode,
host, port, pid) and is the only thing ``status`` and ``stop`` trust, after checking that the
process (or the container's port) is still there.

How it is started, in order of preference:

1. the ``mosquitto`` binary (``device.wire.broker.find_mosquitto``: ``$SPARSEFLEET_MOSQUITTO``,
   ``PATH``, ``/usr/sbin``), with a generated configuration (loopback only, persistence in the
   state directory) on port 1883, or on a free port when 1883 is taken (a Debian ``mosquitto``
   service usually holds it). Like the production template it is authenticated: a password file
   and the fleet's ACL (``passwd`` and ``acl`` beside ``broker.json``), the fleet manager's
   account created first (its password in ``<state-dir>/secrets/fleet-manager.password``), and
   devices enrolled with ``fleet devices enroll`` (simulations enrol theirs). Anonymous access
   only when asked for (``anonymous=True``, ``fleet broker start --anonymous``, which warns).
   Packets are limited to ``MAX_PACKET_BYTES``, one default chunk plus headroom, so an oversized
   payload is refused by the broker instead of travelling to the fleet manager;
2. else ``docker compose -f broker/docker-compose.yml up -d`` when Docker works; that broker is
   the hardened development configuration (passwords, ACL) on 127.0.0.1:1883, so the fleet
   manager's account is created first (``fleet.ops.enroll``) and recorded in ``broker.json``;
3. else ``BrokerUnavailableError`` naming both ways to install one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from device.errors import BrokerUnavailableError
from device.wire.broker import MosquittoBroker, find_mosquitto, free_port, is_listening
from device.wire.chunking import DEFAULT_CHUNK_BYTES
from fleet.ops.certs import FLEET_MANAGER_USER
from fleet.ops.enroll import (
    Credentials,
    enroll,
    enroll_fleet_manager,
    ensure_acl,
    reload_broker,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "INSTALL_OPTIONS",
    "BrokerState",
    "LocalBroker",
    "compose_file",
]

DEFAULT_PORT = 1883
STATE_FILE = "broker.json"
INSTALL_OPTIONS = (
    "install mosquitto ('sudo apt-get install mosquitto' on Debian/Ubuntu, "
    "'brew install mosquitto' on macOS), or install Docker "
    "(https://docs.docker.com/engine/install/) so that 'fleet broker start' can run "
    "broker/docker-compose.yml"
)
FLEET_MANAGER_SECRET = "secrets/fleet-manager.password"
#: The development broker's maximum packet size: one default chunk (4 MiB) plus 64 KiB for the
#: topic, properties and envelope. Senders read it from the CONNACK and chunk below it.
MAX_PACKET_BYTES = DEFAULT_CHUNK_BYTES + 64 * 1024


@dataclass(frozen=True)
class BrokerState:
    """How the local broker was started (the content of ``broker.json``).

    ``mode`` "binary": ``pid`` is the mosquitto process. "docker": the container of
    ``compose_file`` (no pid). ``username``/``password_file`` are the fleet manager's account on
    a password-protected broker (both modes unless ``anonymous``); ``broker_passwords`` is the
    broker's own password file, where devices are enrolled (None in docker mode and when
    anonymous). ``started_at`` is Unix seconds. A ``broker.json`` written before these fields
    existed reads as an anonymous binary broker, which is what such a broker was.
    """

    mode: Literal["binary", "docker"]
    host: str
    port: int
    pid: int | None
    started_at: float
    state_dir: str
    compose_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    anonymous: bool = False
    broker_passwords: str | None = None
    max_packet_bytes: int | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "url": self.url}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "anonymous" not in known and known.get("mode") == "binary":
            known["anonymous"] = known.get("username") is None  # written before auth existed
        return cls(**known)


def compose_file(start: Path | None = None) -> Path | None:
    """``broker/docker-compose.yml`` of the source tree this package runs from, else of the
    current directory; None when neither exists."""
    candidates = [Path(__file__).resolve().parents[1], (start or Path.cwd()).resolve()]
    for root in candidates:
        path = root / "broker" / "docker-compose.yml"
        if path.is_file():
            return path
    return None


def _pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (a broker started by this very
    process, e.g. in tests, stays a zombie until reaped)."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_mosquitto(pid: int) -> bool:
    """Guard against a recycled pid: the process's command line names mosquitto (True where
    /proc is not available)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"mosquitto" in cmdline


class LocalBroker:
    """The development broker recorded under ``state_dir`` (usually ``<state-dir>/broker``).

    ``binary``: a mosquitto executable (default: ``find_mosquitto``). ``docker``: the docker
    executable (default: ``docker`` on PATH). ``compose``: the compose file for docker mode.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        binary: str | None = None,
        docker: str | None = None,
        compose: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / STATE_FILE
        self._binary = binary
        self._docker = docker
        self._compose = compose

    # -- state -----------------------------------------------------------------------------

    def recorded(self) -> BrokerState | None:
        """What ``broker.json`` says, whether or not the broker still runs."""
        try:
            return BrokerState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)
            return None

    def is_running(self, state: BrokerState) -> bool:
        """The recorded broker is alive: its process exists (binary) and its port listens."""
        if state.mode == "binary" and (
            state.pid is None or not _pid_alive(state.pid) or not _is_mosquitto(state.pid)
        ):
            return False
        return is_listening(state.host, state.port)

    def running(self) -> BrokerState | None:
        """The recorded broker if it is running, else None."""
        state = self.recorded()
        return state if state is not None and self.is_running(state) else None

    def _write(self, state: BrokerState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
        os.replace(tmp, self.state_path)

    # -- start -----------------------------------------------------------------------------

    def start(
        self, *, host: str = "127.0.0.1", port: int | None = None, anonymous: bool = False
    ) -> tuple[BrokerState, bool]:
        """Start the broker unless it runs already; returns (state, started now).

        ``port`` None: 1883 if free, else a free port. An explicit port that is taken fails
        with ``BrokerUnavailableError`` (mosquitto's own log says why). ``anonymous``: let any
        local client connect without an account (binary mode only; the caller warns).
        """
        current = self.running()
        if current is not None:
            return current, False
        try:
            binary = find_mosquitto(self._binary)
        except BrokerUnavailableError as no_binary:
            docker = self._docker_command()
            compose = self._compose or compose_file()
            if docker is None or compose is None:
                missing = (
                    "Docker is not available"
                    if docker is None
                    else "no broker/docker-compose.yml was found"
                )
                raise BrokerUnavailableError(
                    f"cannot start a local broker: {_first_clause(str(no_binary))}, and "
                    f"{missing}; {INSTALL_OPTIONS}"
                ) from None
            return self._start_docker(docker, compose), True
        return self._start_binary(binary, host, port, anonymous), True

    def _start_binary(
        self, binary: str, host: str, port: int | None, anonymous: bool
    ) -> BrokerState:
        if port is None:
            port = DEFAULT_PORT if not is_listening(host, DEFAULT_PORT) else free_port(host)
        elif is_listening(host, port):
            raise BrokerUnavailableError(
                f"port {port} on {host} is already in use; pick another with --port, or leave "
                "--port out to get a free one"
            )
        extra: list[str] = []
        username = secret = passwords = None
        if not anonymous:
            username, secret = self._fleet_manager_account()
            passwords = self.passwords
            extra = [f"password_file {passwords}", f"acl_file {self.acl}"]
        broker = MosquittoBroker(
            host=host,
            port=port,
            state_dir=self.state_dir,
            persistence=True,
            max_packet_size=MAX_PACKET_BYTES,
            allow_anonymous=anonymous,
            extra_config=extra,
            binary=binary,
        )
        broker.start()
        assert broker.pid is not None
        state = BrokerState(
            mode="binary",
            host=host,
            port=port,
            pid=broker.pid,
            started_at=time.time(),
            state_dir=str(self.state_dir.resolve()),
            username=username,
            password_file=None if secret is None else str(secret),
            anonymous=anonymous,
            broker_passwords=None if passwords is None else str(passwords),
            max_packet_bytes=MAX_PACKET_BYTES,
        )
        self._write(state)
        log.info("mosquitto pid %d listening on %s", broker.pid, state.url)
        return state

    # -- accounts ---------------------------------------------------------------------------

    @property
    def passwords(self) -> Path:
        """The binary broker's mosquitto password file (hashes only)."""
        return self.state_dir / "passwd"

    @property
    def acl(self) -> Path:
        return self.state_dir / "acl"

    @property
    def secrets_dir(self) -> Path:
        """Where plain-text passwords live (mode 0600 files): ``<state-dir>/secrets``."""
        return self.state_dir.parent / "secrets"

    def _fleet_manager_account(self) -> tuple[str, Path]:
        """The fleet manager's account on the binary broker (username, password file), created
        on first start and kept afterwards: a restart must not change the password that running
        clients use."""
        secret = self.state_dir.parent / FLEET_MANAGER_SECRET
        ensure_acl(self.acl)
        if not (secret.exists() and self.passwords.exists()):
            enroll_fleet_manager(
                password_file=self.passwords, secrets_file=secret, acl_file=self.acl
            )
        return FLEET_MANAGER_USER, secret

    def enroll_devices(self, device_ids: Sequence[str]) -> dict[str, Credentials]:
        """Give each device an account on the running authenticated broker (a fresh password
        each time, also written to ``<state-dir>/secrets/DEVICE.password``) and make the broker
        read it; returns each device's credentials.

        For simulations and tests on the development broker; real devices are enrolled with
        ``fleet devices enroll``. ``BrokerUnavailableError`` when no authenticated binary broker
        runs here (docker mode mounts its password file read-only into the container).
        """
        state = self.running()
        if state is None or state.mode != "binary" or state.broker_passwords is None:
            raise BrokerUnavailableError(
                "no authenticated local broker runs here to enrol devices on "
                "('fleet broker start' starts one)"
            )
        accounts = {
            device_id: enroll(
                device_id,
                password_file=state.broker_passwords,
                secrets_file=self.secrets_dir / f"{device_id}.password",
                acl_file=self.acl,
            )
            for device_id in device_ids
        }
        assert state.pid is not None
        reload_broker(state.pid)
        return accounts

    def _docker_command(self) -> str | None:
        docker = self._docker or shutil.which("docker")
        if docker is None:
            return None
        try:
            probe = subprocess.run(
                [docker, "compose", "version"], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return docker if probe.returncode == 0 else None

    def _start_docker(self, docker: str, compose: Path, timeout_s: float = 30.0) -> BrokerState:
        # The compose file mounts <repo>/.sparsefleet/broker (passwd, acl) next to itself.

        repo_state = compose.parent.parent / ".sparsefleet"
        password_file = repo_state / "broker" / "passwd"
        secret = repo_state / FLEET_MANAGER_SECRET
        if not secret.exists() or not password_file.exists():
            enroll_fleet_manager(
                password_file=password_file,
                secrets_file=secret,
                acl_file=repo_state / "broker" / "acl",
            )
        env = {
            **os.environ,
            "SPARSEFLEET_UID": str(os.getuid()),
            "SPARSEFLEET_GID": str(os.getgid()),
        }
        result = subprocess.run(
            [docker, "compose", "-f", str(compose), "up", "-d", "mosquitto"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise BrokerUnavailableError(
                f"'docker compose -f {compose} up -d' failed ({result.returncode}): {tail}"
            )
        state = BrokerState(
            mode="docker",
            host="127.0.0.1",
            port=DEFAULT_PORT,
            pid=None,
            started_at=time.time(),
            state_dir=str(self.state_dir.resolve()),
            compose_file=str(compose),
            username="fleet-manager",
            password_file=str(secret),
        )
        deadline = time.monotonic() + timeout_s
        while not is_listening(state.host, state.port):
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"docker compose started the broker container but nothing listens on "
                    f"{state.host}:{state.port} after {timeout_s:.0f} s; see "
                    f"'docker compose -f {compose} logs'"
                )
            time.sleep(0.2)
        self._write(state)
        return state

    # -- stop ------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> BrokerState | None:
        """Stop the recorded broker (SIGTERM, SIGKILL after ``timeout_s``; ``docker compose
        down`` in docker mode) and forget it. Returns what was stopped, None if nothing ran."""
        state = self.recorded()
        if state is None:
            return None
        alive = self.is_running(state)
        if alive and state.mode == "binary" and state.pid is not None:
            _terminate(state.pid, timeout_s)
        elif alive and state.mode == "docker" and state.compose_file is not None:
            docker = self._docker or shutil.which("docker") or "docker"
            subprocess.run(
                [docker, "compose", "-f", state.compose_file, "down"],
                capture_output=True,
                timeout=120,
                check=False,
            )
        self.state_path.unlink(missing_ok=True)
        return state if alive else None


def _terminate(pid: int, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    killed = False
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            if killed:
                raise BrokerUnavailableError(f"mosquitto pid {pid} survived SIGKILL")
            log.warning("mosquitto pid %d ignored SIGTERM; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + timeout_s
        time.sleep(0.02)


def _first_clause(message: str) -> str:
    """``find_mosquitto``'s message without its own install hint (ours names both options)."""
    return message.split(";", 1)[0]

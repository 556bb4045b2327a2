"""`fleet broker start|stop|status` against the real mosquitto binary on a free loopback port,
and the failure paths: no broker to be had, a port in use, an unreachable broker."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.errors import BrokerUnavailableError
from device.wire.broker import find_mosquitto, free_port, is_listening
from fleet.ops.local_broker import LocalBroker
from tests.cli.helpers import Fleet, error_line


def _require_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs the mosquitto binary: {exc}")


@pytest.fixture
def local(fleet: Fleet) -> Iterator[Fleet]:
    """``fleet`` whose local broker, if a test starts one, is stopped afterwards."""
    yield fleet
    LocalBroker(fleet.state_dir / "broker").stop()


@pytest.mark.integration
def test_start_status_stop(local: Fleet) -> None:
    """The broker outlives `start`, `status` finds it from the state files, `stop` ends it."""
    _require_mosquitto()
    port = free_port()
    result = local("broker", "start", "--port", str(port))
    assert result.exit_code == 0, result.output
    assert f"local broker started at mqtt://127.0.0.1:{port}" in result.stdout
    assert is_listening("127.0.0.1", port)

    status = json.loads(local("broker", "status", "--json").stdout)
    assert status["running"] is True and status["port"] == port and status["mode"] == "binary"
    assert status["url"] == f"mqtt://127.0.0.1:{port}"
    assert "running at" in local("broker", "status").stdout

    again = local("broker", "start")
    assert again.exit_code == 0 and "already running" in again.stdout  # not a second broker

    stopped = local("broker", "stop")
    assert stopped.exit_code == 0 and "stopped the local broker" in stopped.stdout
    assert not is_listening("127.0.0.1", port)
    assert json.loads(local("broker", "status", "--json").stdout) == {"running": False}


@pytest.mark.integration
def test_the_local_broker_is_the_default_for_other_commands(local: Fleet) -> None:
    """Once `fleet broker start` ran, runs connect to it without --broker."""
    _require_mosquitto()
    port = free_port()
    assert local("broker", "start", "--port", str(port)).exit_code == 0
    from fleet.cli.context import Env

    env = Env(state_dir=local.state_dir, broker=None, verbose=0, console=None)
    assert env.broker_url() == (f"mqtt://127.0.0.1:{port}", "the local broker")
    assert env.broker_url("mqtt://elsewhere:1") == ("mqtt://elsewhere:1", "the run file")


def test_stop_and_status_without_a_broker(fleet: Fleet) -> None:
    assert "no local broker was running" in fleet("broker", "stop").stdout
    assert "not running" in fleet("broker", "status").stdout


def test_a_dead_recorded_broker_is_reported_as_gone(fleet: Fleet) -> None:
    """A broker.json whose process died (a reboot) must not be trusted."""
    directory = fleet.state_dir / "broker"
    directory.mkdir(parents=True)
    (directory / "broker.json").write_text(
        json.dumps(
            {
                "mode": "binary",
                "host": "127.0.0.1",
                "port": free_port(),
                "pid": 2**22 + 12345,  # above the default pid_max: no such process
                "started_at": 0.0,
                "state_dir": str(directory),
            }
        )
    )
    status = json.loads(fleet("broker", "status", "--json").stdout)
    assert status["running"] is False and status["mode"] == "binary"
    assert "is gone" in fleet("broker", "status").stdout


@pytest.mark.integration
def test_an_explicit_port_in_use_is_refused(fleet: Fleet) -> None:
    _require_mosquitto()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fleet("broker", "start", "--port", str(port))
    assert result.exit_code == 4
    assert f"port {port} on 127.0.0.1 is already in use" in error_line(result)


def _empty_path(tmp_path: Path) -> dict[str, str]:
    """An environment where neither mosquitto nor docker can be found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return {"PATH": str(empty), "SPARSEFLEET_MOSQUITTO": str(tmp_path / "no-mosquitto")}


def test_no_mosquitto_and_no_docker_names_both_install_options(
    fleet: Fleet, tmp_path: Path
) -> None:
    result = fleet("broker", "start", env=_empty_path(tmp_path))
    assert result.exit_code == 4
    line = error_line(result)
    assert "apt-get install mosquitto" in line and "install Docker" in line


def test_without_mosquitto_docker_compose_is_used(fleet: Fleet, tmp_path: Path) -> None:
    """The fallback runs `docker compose -f broker/docker-compose.yml up -d` after creating the
    fleet manager's account that compose file's broker requires. A fake docker records what it
    was asked; nothing listens afterwards, which must be reported, not waited on forever."""
    env = _empty_path(tmp_path)
    log = tmp_path / "docker.log"
    docker = Path(env["PATH"]) / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    repo = tmp_path / "repo"
    compose = repo / "broker" / "docker-compose.yml"
    compose.parent.mkdir(parents=True)
    compose.write_text("services: {}\n")
    if is_listening("127.0.0.1", 1883):
        pytest.skip("something listens on 127.0.0.1:1883, the port the compose broker uses")
    broker = LocalBroker(fleet.state_dir / "broker", docker=str(docker), compose=compose)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        with pytest.raises(BrokerUnavailableError, match=r"nothing listens on 127\.0\.0\.1:1883"):
            broker._start_docker(str(docker), compose, timeout_s=0.3)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert f"compose -f {compose} up -d mosquitto" in log.read_text()
    secret = repo / ".sparsefleet" / "secrets" / "fleet-manager.password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (repo / ".sparsefleet" / "broker" / "passwd").read_text().startswith("fleet-manager:")


def test_an_unreachable_broker_gives_exit_4_and_what_to_do(fleet: Fleet) -> None:
    """Nothing listens on the port: one line naming the broker and how to get one."""
    port = free_port()
    path = fleet.write_config()
    result = fleet("--broker", f"mqtt://127.0.0.1:{port}", "run", "start", path, "--wait-s", "1")
    assert result.exit_code == 4
    line = error_line(result)
    assert f"127.0.0.1:{port}" in line and "fleet broker start" in line


def test_a_malformed_broker_url_is_a_usage_error(fleet: Fleet) -> None:
    result = fleet("--broker", "http://x", "status")
    assert result.exit_code == 2
    assert "scheme must be mqtt://" in result.stderr

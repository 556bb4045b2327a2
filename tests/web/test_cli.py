"""``fleet dashboard``: the state directory of the root group, the token from the option or the
environment, and the refusals an operator sees as one line (exit code 3, like other config
errors)."""

from __future__ import annotations

import importlib
import socket
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet.cli.context import Env
from fleet.cli.dashboard import dashboard
from fleet.cli.errors import FleetGroup
from fleet.web.server import DashboardServer

TOKEN = "0123456789abcdef0123"


def _root(state_dir: Path) -> click.Group:
    """A stand-in for ``fleet``'s root group: FleetGroup's error handling and the Env object."""

    @click.group(cls=FleetGroup)
    @click.pass_context
    def fleet(ctx: click.Context) -> None:
        ctx.obj = Env(state_dir=state_dir, broker=None, verbose=0, console=None)

    fleet.add_command(dashboard)
    return fleet


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[DashboardServer]:
    """Servers the command would run; ``run`` returns at once instead of serving forever."""
    started: list[DashboardServer] = []

    def run(self: DashboardServer) -> None:
        started.append(self)
        self.socket.close()

    monkeypatch.setattr(DashboardServer, "run", run)
    return started


def test_serves_the_root_groups_state_dir_on_loopback(
    tmp_path: Path, served: list[DashboardServer]
) -> None:
    result = CliRunner().invoke(_root(tmp_path), ["dashboard", "--port", "0"])
    assert result.exit_code == 0, result.output
    (server,) = served
    assert server.dashboard.settings.state_dir == tmp_path
    assert server.dashboard.settings.token is None
    assert server.url.startswith("http://127.0.0.1:")
    assert f"{server.url}/" in result.output and "read-only" in result.output


def test_the_token_comes_from_the_environment(
    tmp_path: Path, served: list[DashboardServer]
) -> None:
    result = CliRunner().invoke(
        _root(tmp_path),
        ["dashboard", "--host", "0.0.0.0", "--port", "0"],
        env={"SPARSEFLEET_DASHBOARD_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert served[0].dashboard.settings.token == TOKEN
    assert "token required" in result.output


def test_binding_beyond_loopback_without_a_token_is_one_line_and_exit_3(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _root(tmp_path), ["dashboard", "--host", "0.0.0.0", "--port", "0"], env={}
    )
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet: error: refusing to serve")


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(_root(tmp_path), ["dashboard", "--token", "short", "--port", "0"])
    assert result.exit_code == 3 and "at least 16" in result.output


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(_root(tmp_path), ["dashboard", "--port", str(port)])
    assert result.exit_code == 3
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_the_token_variable_is_the_one_the_docs_and_errors_name() -> None:
    """The command names the variable itself (importing fleet.web would load starlette for
    every `fleet` command); it must stay the one fleet.web's refusal message tells users."""
    from fleet.web import auth

    command = importlib.import_module("fleet.cli.dashboard")  # the module, whatever re-exports
    assert command.TOKEN_ENV == auth.TOKEN_ENV == "SPARSEFLEET_DASHBOARD_TOKEN"

"""``fleet broker``: a local mosquitto for development (state in STATE_DIR/broker)."""

from __future__ import annotations

import contextlib

import click

from device.errors import NotFoundError
from device.wire.topics import Topics
from fleet.cli import render
from fleet.cli.context import Env, emit_json, json_option, pass_env, path_or_none
from fleet.cli.runfile import BrokerConfig
from fleet.ops.local_broker import BrokerState
from fleet.runtime.presence import read_retained, stray_retained
from fleet.state.store import RunStatus


@click.group()
def broker() -> None:
    """A local mosquitto for development (state in STATE_DIR/broker)."""


@broker.command("start")
@click.option("--port", type=click.IntRange(1, 65535), help="Default: 1883, or a free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--anonymous",
    is_flag=True,
    help="Let any local client connect without an account (no ACL either); for throw-away "
    "experiments only.",
)
@pass_env
def broker_start(env: Env, port: int | None, host: str, anonymous: bool) -> None:
    """Start the local broker (mosquitto, else docker compose); it keeps running after this.

    It is authenticated like a production broker: the fleet manager's account is created in
    STATE_DIR/secrets, devices need one (`fleet devices enroll DEVICE`; `fleet simulate` enrols
    its simulated devices itself), and the fleet's ACL applies.
    """
    state, started = env.local_broker().start(host=host, port=port, anonymous=anonymous)
    verb = "started" if started else "already running"
    how = f"pid {state.pid}" if state.mode == "binary" else "docker compose"
    env.console.print(f"local broker {verb} at {state.url} ({how})")
    if state.anonymous:
        env.console.print(
            "[bold yellow]warning:[/] anonymous access: anything on this machine can publish as "
            "any device or as the fleet manager"
        )
    elif started:
        env.console.print(
            f"accounts: the fleet manager's password is in {state.password_file}; give each "
            "device one with `fleet devices enroll DEVICE`"
        )
    if started:
        env.console.print("fleet commands use it by default; stop it with `fleet broker stop`")


@broker.command("stop")
@pass_env
def broker_stop(env: Env) -> None:
    """Stop the local broker."""
    state = env.local_broker().stop()
    if state is None:
        env.console.print("no local broker was running")
    else:
        env.console.print(f"stopped the local broker at {state.url}")


@broker.command("status")
@json_option
@pass_env
def broker_status(env: Env, as_json: bool) -> None:
    """Is the local broker running, and where; and any stray retained messages under the
    fleet's prefix (retained commands, updates, models of ended runs)."""
    local = env.local_broker()
    state = local.recorded()
    running = state is not None and local.is_running(state)
    strays = _stray_retained(env, state) if running and state is not None else []
    if as_json:
        extra = {"stray_retained": strays} if running else {}
        emit_json({"running": running, **(state.to_json() if state else {}), **extra})
        return
    env.console.print(render.broker_status(state, running))
    if strays:
        env.console.print(
            f"[bold yellow]{len(strays)} stray retained message(s)[/] under the fleet's prefix "
            f"(clear one with an empty retained publish): {', '.join(strays[:10])}"
            + (" ..." if len(strays) > 10 else "")
        )


def _stray_retained(env: Env, state: BrokerState) -> list[str]:
    """Retained topics under the default prefix that nothing should hold retained."""
    topics = Topics()
    password = None
    if state.username is not None:
        password = BrokerConfig(
            username=state.username, password_file=path_or_none(state.password_file)
        ).password()
    held = read_retained(
        state.url, f"{topics.prefix}/#", username=state.username, password=password
    )
    running: list[str] = []
    # no store yet: no run is running
    with contextlib.suppress(NotFoundError), env.store() as store:
        running = [r.run_id for r in store.list_runs(status=RunStatus.RUNNING)]
    return stray_retained(topics, [m.topic for m in held], running)

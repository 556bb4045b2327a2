"""``fleet broker``: a local mosquitto for development (state in STATE_DIR/broker)."""

from __future__ import annotations

import click

from fleet.cli import render
from fleet.cli.context import Env, emit_json, json_option, pass_env


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
    """Is the local broker running, and where."""
    local = env.local_broker()
    state = local.recorded()
    running = state is not None and local.is_running(state)
    if as_json:
        emit_json({"running": running, **(state.to_json() if state else {})})
    else:
        env.console.print(render.broker_status(state, running))

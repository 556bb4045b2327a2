"""``fleet dashboard``: the live web dashboard and ``/metrics`` over the state directory."""

from __future__ import annotations

import click

from device.errors import ConfigError
from fleet.cli.context import Env, pass_env

DEFAULT_PORT = 8750
TOKEN_ENV = "SPARSEFLEET_DASHBOARD_TOKEN"  # the same name as fleet.web.auth.TOKEN_ENV


@click.command("dashboard")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --token.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    default=None,
    metavar="TOKEN",
    help=f"Require this token (16+ characters) for every request and enable the write actions "
    f"(cordon, drain, uncordon); ${TOKEN_ENV}.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.05, 10.0),
    default=0.3,
    show_default=True,
    help="Seconds between reads of the store for live updates.",
)
@pass_env
def dashboard(env: Env, host: str, port: int, token: str | None, poll_interval: float) -> None:
    """Serve the live dashboard (runs, fleet) and Prometheus /metrics; Ctrl-C stops it.

    It reads the state directory's store while runs write it and never blocks them. Without
    --token it is read-only and listens on loopback only. docs/dashboard.md has the details.
    """
    # Imported here: starlette and uvicorn are needed only by this command, not by every `fleet`.
    from fleet.web import DashboardServer, DashboardSettings

    settings = DashboardSettings(
        state_dir=env.state_dir, token=token or None, poll_interval_s=poll_interval
    )
    try:
        server = DashboardServer(settings, host=host, port=port, log_level="warning")
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    access = "token required" if settings.token else "read-only, no token"
    click.echo(f"dashboard: {server.url}/ ({access}); metrics: {server.url}/metrics")
    click.echo(f"state: {env.state_dir}; Ctrl-C stops")
    server.run()

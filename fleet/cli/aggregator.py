"""``fleet aggregator``: sharded aggregation workers (docs/scaling.md)."""

from __future__ import annotations

from pathlib import Path

import click

from device.wire.mqtt import parse_broker_url
from fleet.cli.context import Env, pass_env
from fleet.runtime.aggregator import DEFAULT_GROUP, BrokerLogin, run_worker


@click.group()
def aggregator() -> None:
    """Sharded aggregation: workers that decode, validate, store and sum a run's updates."""


@aggregator.command("run")
@click.option("--run", "run_id", required=True, metavar="RUN", help="The run to aggregate.")
@click.option(
    "--worker-id",
    required=True,
    metavar="ID",
    help="MQTT client id; keep it across restarts so the worker resumes its session.",
)
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="Default: the global --broker, else the local broker, else mqtt://127.0.0.1:1883.",
)
@click.option(
    "--state",
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet manager's state directory (default: the global --state-dir).",
)
@click.option("--prefix", default="fl/v1", show_default=True, help="Topic prefix.")
@click.option(
    "--group", default=DEFAULT_GROUP, show_default=True, help="Shared-subscription group."
)
@click.option("--username", help="Broker account (the fleet manager's).")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File whose first line is the password.",
)
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), help="Broker's CA.")
@click.option("--cert-file", type=click.Path(path_type=Path, dir_okay=False), help="Client cert.")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), help="Its key.")
@click.option("--insecure", is_flag=True, help="Skip the TLS host-name check (test certs only).")
@pass_env
def aggregator_run(
    env: Env,
    run_id: str,
    worker_id: str,
    broker_url: str | None,
    state: Path | None,
    prefix: str,
    group: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    insecure: bool,
) -> None:
    """Run one aggregator worker for RUN until Ctrl-C or SIGTERM.

    The same as `python -m fleet.runtime.aggregator run`. It must run where the fleet
    manager's state directory is (it stores the updates it accepts there); `fleet run start
    --workers K` starts K of them itself.
    """
    url = broker_url or env.broker_url()[0]
    try:
        parse_broker_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    state_dir = state or env.state_dir
    env.console.print(f"aggregator worker {worker_id} for run {run_id} on {url}; stop with Ctrl-C")
    run_worker(
        url,
        state_dir,
        run_id,
        worker_id,
        prefix=prefix,
        group=group,
        login=BrokerLogin(username, password_file, ca_file, cert_file, key_file, insecure),
    )
    env.console.print(f"aggregator worker {worker_id} stopped")

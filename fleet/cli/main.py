"""The root ``fleet`` group (global options) and the console-script entry point, ``main``.

Each command group lives in its own module (``fleet.cli.run`` for ``fleet run ...``, and so
on) and is added here; ``fleet.cli.errors.FleetGroup`` turns SparseFleet errors into exit codes,
``fleet.cli.context.Env`` is what every command gets.
"""

from __future__ import annotations

from pathlib import Path

import click

from device import __version__
from device.wire.mqtt import parse_broker_url
from fleet.cli import render
from fleet.cli.aggregator import aggregator
from fleet.cli.broker import broker as broker_group
from fleet.cli.certs import certs
from fleet.cli.config import config
from fleet.cli.context import DEFAULT_STATE_DIR, Env
from fleet.cli.dashboard import dashboard
from fleet.cli.demo import demo
from fleet.cli.devices import devices
from fleet.cli.errors import FleetGroup
from fleet.cli.model import model
from fleet.cli.run import run
from fleet.cli.simulate import simulate_command
from fleet.cli.status import status


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="SPARSEFLEET_STATE",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the store, the local broker and run files live ($SPARSEFLEET_STATE).",
)
@click.option(
    "--broker",
    envvar="SPARSEFLEET_BROKER",
    default=None,
    metavar="URL",
    help="MQTT broker, mqtt://host[:port] or mqtts://... ($SPARSEFLEET_BROKER); default: the "
    "local broker of `fleet broker start`, else mqtt://127.0.0.1:1883.",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, state_dir: Path, broker: str | None, verbose: int) -> None:
    """SparseFleet fleet manager: federated sparse training (FedDST, PruneFL) over MQTT."""
    if broker is not None:
        try:
            parse_broker_url(broker)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--broker") from None
    console = render.make_console()
    render.setup_logging(render.make_console(stderr=True), verbose)
    ctx.obj = Env(state_dir=state_dir, broker=broker, verbose=verbose, console=console)


for _command in (
    broker_group,
    config,
    run,
    simulate_command,
    demo,
    aggregator,
    devices,
    status,
    certs,
    model,
    dashboard,
):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli()

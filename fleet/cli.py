"""The ``fleet`` command (click + rich). The only place that turns SparseFleet errors into exit
codes and one-line messages."""

from __future__ import annotations

import click

from device import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
def cli() -> None:
    """SparseFleet fleet manager: federated sparse training over MQTT."""


def main() -> None:
    cli()

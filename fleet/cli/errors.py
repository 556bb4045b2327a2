"""The one place SparseFleet errors become exit codes (the table is in docs/cli.md).

Commands raise ``SparseFleetError`` subclasses with a message that says what to do; the root
group, ``FleetGroup``, catches every one escaping a command, prints ``fleet: error: <one line>``
on stderr and exits with the exception's ``exit_code``. Ctrl-C exits with 130.
"""

from __future__ import annotations

from typing import Any

import click

from device.errors import SparseFleetError

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT (128 + 2)


class FleetGroup(click.Group):
    """The root group: SparseFleet errors become one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparseFleetError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the message holds
            click.echo(f"fleet: error: {message}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fleet: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)

"""``fleet-device``: the device agent's command line (argparse: no click on a device).

Subcommands arrive with the runtime issue (run, profile, check); errors of the SparseFleet family
exit with their ``exit_code`` and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from device import __version__
from device.errors import SparseFleetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-device",
        description="SparseFleet device agent: trains a sparse subnetwork for a fleet manager.",
    )
    parser.add_argument("--version", action="version", version=f"fleet-device {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 0
    except SparseFleetError as exc:
        print(f"fleet-device: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

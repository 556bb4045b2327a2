"""The ``fleet`` command: one module per command group, and the only place that prints.

The entry point (``fleet = "fleet.cli:main"`` in pyproject.toml) is ``main``; the root group
``cli`` is in ``fleet.cli.main``, ``FleetGroup`` (SparseFleet errors -> exit codes) in
``fleet.cli.errors``.
"""

from fleet.cli.errors import FleetGroup
from fleet.cli.main import cli, main

__all__ = ["FleetGroup", "cli", "main"]

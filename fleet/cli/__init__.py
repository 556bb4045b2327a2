"""The ``fleet`` command: one module per command group, and the only place that prints.

The entry point (``fleet = "fleet.cli:main"`` in pyproject.toml) is ``main`` below.
"""

from fleet.cli.main import cli, main

__all__ = ["cli", "main"]

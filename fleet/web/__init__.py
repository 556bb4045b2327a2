"""The fleet manager's web dashboard and Prometheus metrics (``fleet dashboard``).

Reads a state directory's store (never writes it, except the token-guarded cordon/drain/
uncordon actions) while runs write it: ``reader`` (cached, read-only store access), ``fleet_view``
and ``run_view`` (what the pages show), ``feed`` (live updates as server-sent events),
``metrics`` (a Prometheus collector reading the store at scrape time), ``auth`` (token and
loopback rules), ``pages`` (HTML shells), ``app`` (routes), ``server`` (uvicorn). The static
files under ``static/`` are the only scripts and styles the pages load. docs/dashboard.md
describes it for operators.

Imports ``fleet.state``, ``fleet.ops`` (the registry), ``fleet.report`` (the run series) and
``device``; nothing from the runtime, the simulator or the CLI.
"""

from fleet.web.app import DashboardSettings, create_app
from fleet.web.server import DashboardServer, ServerThread

__all__ = ["DashboardServer", "DashboardSettings", "ServerThread", "create_app"]

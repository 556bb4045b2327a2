"""What every ``fleet`` command shares: the ``Env`` object, where the broker is, ``--json``.

State lives in one directory (``--state-dir``, default ``./.sparsefleet`` or
``$SPARSEFLEET_STATE``): the store (``fleet.db``, ``tensors/``), the local broker
(``broker/``), run control files (``runs/``) and certificates (``pki/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from device.errors import NotFoundError
from fleet.cli.runfile import BrokerConfig
from fleet.ops.local_broker import LocalBroker
from fleet.state.store import Store

DEFAULT_STATE_DIR = Path(".sparsefleet")
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


@dataclass
class Env:
    """What every command gets: the state directory, the broker option and the console."""

    state_dir: Path
    broker: str | None  # --broker / $SPARSEFLEET_BROKER; None: the local broker or the default
    verbose: int
    console: Any  # rich Console (typed loosely: only fleet.cli.render knows rich)

    def store(self, *, create: bool = False) -> Store:
        """The fleet's store; for read commands (``create`` False) its absence is an error that
        says how to get one."""
        try:
            return Store(self.state_dir, create=create)
        except NotFoundError:
            raise NotFoundError(
                f"no fleet state in {self.state_dir}: nothing has run here yet; run `fleet demo` "
                "or `fleet simulate CONFIG`, or pass --state-dir DIR (or set SPARSEFLEET_STATE)"
            ) from None

    def local_broker(self) -> LocalBroker:
        return LocalBroker(self.state_dir / "broker")

    def broker_url(self, configured: str | None = None) -> tuple[str, str]:
        """(url, where it came from): --broker, else the run file, else the local broker of
        ``fleet broker start``, else mqtt://127.0.0.1:1883."""
        if self.broker:
            return self.broker, "--broker"
        if configured:
            return configured, "the run file"
        running = self.local_broker().running()
        if running is not None:
            return running.url, "the local broker"
        return DEFAULT_BROKER_URL, "the default"

    def broker_account(self, configured: BrokerConfig, source: str) -> BrokerConfig:
        """The run file's broker settings, with the local broker's account when the local
        broker is used and needs one (docker mode) and the file names none."""
        local = self.local_broker().running() if source == "the local broker" else None
        if local is None or local.username is None or configured.username is not None:
            return configured
        return dataclasses.replace(
            configured,
            username=local.username,
            password_file=path_or_none(local.password_file),
        )


pass_env = click.make_pass_decorator(Env)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON (NaN becomes null; enums, paths and the like their str)."""
    click.echo(json.dumps(clean(data), indent=2, sort_keys=True, default=str, allow_nan=False))


def clean(value: Any) -> Any:
    """NaN and infinities -> None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def path_or_none(value: Any) -> Path | None:
    return None if value is None else Path(value)

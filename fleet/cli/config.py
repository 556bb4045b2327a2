"""``fleet config check``: validate a run file without running it."""

from __future__ import annotations

from pathlib import Path

import click

from device.config import read_yaml
from fleet.cli.context import Env, emit_json, json_option, pass_env
from fleet.cli.runfile import check_data, describe, load_config


@click.group()
def config() -> None:
    """Run configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@json_option
@pass_env
def config_check(env: Env, file: Path, as_json: bool) -> None:
    """Validate a run file (types, known keys, strategy options, model vs dataset) and check
    that the data it will read is there (the test split; the training split too when the file
    has a `simulation` section)."""
    loaded = load_config(file)
    check_data(loaded, file, simulated="simulation" in (read_yaml(file).value or {}))
    summary = describe(loaded, file)
    if as_json:
        emit_json({"ok": True, **summary})
        return
    run = loaded.run
    data = f" on {loaded.data.dataset}" if loaded.data else ""
    env.console.print(
        f"{file}: OK: {run.strategy} with {run.model}{data}, {run.rounds} rounds, "
        f"{run.clients_per_round} device{'s' if run.clients_per_round != 1 else ''} per round"
    )

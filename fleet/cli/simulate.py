"""``fleet simulate``: a run file on simulated devices, in memory or over real MQTT."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from device.wire.broker import find_mosquitto
from fleet.cli.context import Env, pass_env
from fleet.cli.foreground import check_new_run, finish_message, run_simulation
from fleet.cli.launch import sim_to_json
from fleet.cli.runfile import FleetConfig, default_run_id, load_config, run_spec, sim_spec
from fleet.runtime.run_control import RunFiles


@click.command("simulate")
@click.argument("config_file", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--devices", type=click.IntRange(1), help="Simulated devices (default: the file's).")
@click.option(
    "--transport",
    type=click.Choice(["memory", "mqtt"]),
    default="memory",
    show_default=True,
    help="memory: in-process broker; mqtt: real connections (--broker if given, else the local "
    "broker if running, else a throw-away mosquitto).",
)
@click.option("--run-id", help="Default: run.id of the file, else FILE-STEM-YYYYmmdd-HHMMSS.")
@pass_env
def simulate_command(
    env: Env, config_file: Path, devices: int | None, transport: str, run_id: str | None
) -> None:
    """Run CONFIG on simulated devices, with live progress."""
    loaded = load_config(config_file)
    spec = run_spec(loaded, run_id or loaded.run.id or default_run_id(config_file.stem))
    sim = sim_spec(loaded, devices=devices)
    mode: Literal["memory", "mqtt"] = "mqtt" if transport == "mqtt" else "memory"
    broker_url = _simulation_broker(env, loaded) if mode == "mqtt" else None
    with env.store(create=True) as store:
        check_new_run(store, spec.run_id)
    evaluate = loaded.data is None or loaded.data.evaluate
    RunFiles(env.state_dir, spec.run_id).write_launch(
        {
            "kind": "simulate",
            "config_file": str(config_file.resolve()),
            "sim": sim_to_json(sim),
            "transport": mode,
            "broker_url": broker_url,
            "evaluate": evaluate,
        }
    )
    where = broker_url or ("a throw-away mosquitto" if mode == "mqtt" else "in memory")
    env.console.print(
        f"simulating run {spec.run_id}: {spec.strategy} with {spec.model_name} on {sim.devices} "
        f"devices ({sim.dataset}, {sim.partition}), {spec.rounds} rounds, "
        f"{spec.clients_per_round} per round; transport {mode} ({where})"
    )
    run_simulation(
        env, spec, sim, transport=mode, broker_url=broker_url, evaluate=evaluate, title=spec.run_id
    )
    finish_message(env, spec)


def _simulation_broker(env: Env, loaded: FleetConfig) -> str | None:
    """The broker for an MQTT simulation: explicit (--broker or the file), else the running
    local broker, else None (the simulation starts a throw-away mosquitto)."""
    if env.broker or loaded.broker.url:
        return env.broker or loaded.broker.url
    running = env.local_broker().running()
    if running is not None:
        return running.url
    find_mosquitto()  # fails early, with the install command, when there is none
    return None

"""``fleet demo``: FedDST against dense FedAvg on simulated devices, then a report."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Literal

import click

from device.errors import BrokerUnavailableError
from device.wire.broker import find_mosquitto
from fleet.cli import render
from fleet.cli.context import Env, pass_env
from fleet.cli.foreground import check_new_run, run_simulation
from fleet.cli.launch import sim_to_json
from fleet.cli.runfile import default_run_id, demo_config, dense_baseline, run_spec, sim_spec
from fleet.ops.local_broker import INSTALL_OPTIONS
from fleet.report import load_series, write_report
from fleet.runtime.run_control import RunFiles

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def find_mnist(data_dir: Path | None) -> Path | None:
    """The MNIST directory for the demo: ``data_dir`` if given (it must hold the files), else
    ``$SPARSEFLEET_MNIST_DIR``, else ``../shared/data/mnist``, when they hold the IDX files."""
    if data_dir is not None:
        return data_dir
    candidates = [os.environ.get("SPARSEFLEET_MNIST_DIR"), "../shared/data/mnist"]
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate)
        if all((path / name).exists() or (path / f"{name}.gz").exists() for name in MNIST_FILES):
            return path
    return None


@click.command("demo")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="MNIST IDX files (default: $SPARSEFLEET_MNIST_DIR or ../shared/data/mnist if present, "
    "else the bundled 8x8 digits).",
)
@click.option("--rounds", type=click.IntRange(1), help="Default: 30 (digits) or 8 (MNIST).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-report"),
    show_default=True,
    help="Where the report goes.",
)
@click.option("--devices", type=click.IntRange(1), default=20, show_default=True)
@click.option("--per-round", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--transport",
    type=click.Choice(["mqtt", "memory"]),
    default="mqtt",
    show_default=True,
    help="mqtt: a throw-away local mosquitto, one connection per device; memory: no broker.",
)
@pass_env
def demo(
    env: Env,
    data_dir: Path | None,
    rounds: int | None,
    out: Path,
    devices: int,
    per_round: int,
    transport: str,
) -> None:
    """FedDST vs dense FedAvg on simulated devices, then a summary and a report."""
    mode: Literal["memory", "mqtt"] = "mqtt" if transport == "mqtt" else "memory"
    if mode == "mqtt":
        try:
            find_mosquitto()
        except BrokerUnavailableError:
            raise BrokerUnavailableError(
                f"the demo runs over MQTT and needs mosquitto: {INSTALL_OPTIONS}; or run it "
                "without a broker: `fleet demo --transport memory`"
            ) from None
    mnist = find_mnist(data_dir)
    feddst = demo_config(
        "mnist" if mnist is not None else "digits",
        data_dir=mnist,
        rounds=rounds,
        devices=devices,
        per_round=min(per_round, devices),
    )
    fedavg = dense_baseline(feddst)
    stamp = default_run_id("demo", time.time()).removeprefix("demo-")
    specs = [run_spec(feddst, f"demo-feddst-{stamp}"), run_spec(fedavg, f"demo-fedavg-{stamp}")]
    sim = sim_spec(feddst)
    dataset = (
        f"MNIST from {mnist}" if mnist is not None else "the bundled 8x8 digits (scikit-learn)"
    )
    where = "a throw-away mosquitto on a free loopback port" if mode == "mqtt" else "in memory"
    env.console.print(
        f"SparseFleet demo: FedDST (density {feddst.run.options['density']}) against dense "
        f"FedAvg on {dataset}, model {feddst.run.model}; {sim.devices} simulated devices, "
        f"{feddst.run.clients_per_round} per round, {feddst.run.rounds} rounds; over {where}"
    )
    with env.store(create=True) as store:
        for spec in specs:
            check_new_run(store, spec.run_id)
    started = time.monotonic()
    for spec, label in zip(specs, ("FedDST", "FedAvg (dense)"), strict=True):
        RunFiles(env.state_dir, spec.run_id).write_launch(
            {
                "kind": "simulate",
                "config_file": None,
                "sim": sim_to_json(sim),
                "transport": mode,
                "broker_url": None,
                "evaluate": True,
            }
        )
        run_simulation(
            env,
            spec,
            sim,
            transport=mode,
            broker_url=None,
            evaluate=True,
            title=f"{label:<15}",
        )
    elapsed = time.monotonic() - started
    with env.store() as store:
        series = [load_series(store, spec.run_id, layers=False) for spec in specs]
        files = write_report(store, [s.run_id for s in specs], out)
    dense_bytes = series[1].total_upload_bytes
    rows = [
        render.ComparisonRow(
            label="FedDST",
            series=series[0],
            ratio=series[0].total_upload_bytes / dense_bytes if dense_bytes else math.nan,
        ),
        render.ComparisonRow(
            label="FedAvg (dense)",
            series=series[1],
            ratio=None,
        ),
    ]
    env.console.print(render.comparison_table(rows))
    env.console.print(
        f"FedDST reached {render.percent(series[0].final_accuracy)} test accuracy uploading "
        f"{rows[0].ratio:.1%} of the bytes dense FedAvg uploaded "
        f"({render.percent(series[1].final_accuracy)}); demo took {elapsed:.0f} s"
    )
    env.console.print(f"report: {files.markdown} and {len(files.figures)} PNG figures")
    env.console.print(
        f"next: `fleet run list`, `fleet run status {specs[0].run_id}`, "
        f"`fleet run report {specs[0].run_id} {specs[1].run_id}`"
    )

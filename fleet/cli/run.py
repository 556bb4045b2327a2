"""``fleet run ...``: federated runs against real devices: start, watch, stop, resume, report."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import click

from device.errors import NotFoundError
from fleet.cli import render
from fleet.cli.context import Env, clean, emit_json, json_option, pass_env
from fleet.cli.foreground import finish_message, run_on_broker, run_simulation
from fleet.cli.launch import broker_from_json, broker_to_json, data_to_json, sim_from_json
from fleet.cli.runfile import default_run_id, load_config, run_spec
from fleet.report import load_series, write_report
from fleet.runtime.run_control import RunFiles
from fleet.runtime.runner import RunSpec, check_sharding
from fleet.state.store import RunRecord, RunStatus, Store, StoreConflictError

log = logging.getLogger(__name__)


def _require_run(store: Store, run_id: str) -> RunRecord:
    try:
        return store.get_run(run_id)
    except NotFoundError:
        raise NotFoundError(
            f"no run {run_id!r} in {store.root}; list the runs with `fleet run list`"
        ) from None


@click.group()
def run() -> None:
    """Federated runs: start, watch, stop, resume, report."""


@run.command("start")
@click.argument("config_file", metavar="CONFIG", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run-id", help="Default: run.id of the file, else FILE-STEM-YYYYmmdd-HHMMSS.")
@click.option(
    "--wait-devices",
    type=click.IntRange(1),
    help="Devices to wait for before round 1 (default: clients_per_round).",
)
@click.option(
    "--wait-s",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="How long to wait for them, in seconds.",
)
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Aggregator worker processes to start here (sharded aggregation; 0: the fleet "
    "manager aggregates alone). Same model bits either way.",
)
@pass_env
def run_start(
    env: Env,
    config_file: Path,
    run_id: str | None,
    wait_devices: int | None,
    wait_s: float,
    workers: int,
) -> None:
    """Run CONFIG in the foreground against the devices online at the broker.

    If the run id exists and is not finished, the run is continued (as `fleet run resume`
    would), so that a fleet manager restarted by its service manager picks up where it was.
    With --workers K, K local aggregator workers decode, validate, store and sum the updates
    (docs/scaling.md); they stop with the run, Ctrl-C included.
    """
    loaded = load_config(config_file)
    spec = run_spec(loaded, run_id or loaded.run.id or default_run_id(config_file.stem))
    check_sharding(spec, workers)  # before anything starts
    url, source = env.broker_url(loaded.broker.url)
    broker_config = env.broker_account(loaded.broker, source)
    with env.store(create=True) as store:
        existing = _existing_run(store, spec)
    files = RunFiles(env.state_dir, spec.run_id)
    if existing is not None:
        _check_not_running(files)
        files.clear_stop()
        spec = existing
        check_sharding(spec, workers)
    data = data_to_json(loaded.data)
    devices_wanted = wait_devices or spec.clients_per_round
    files.write_launch(
        {
            "kind": "broker",
            "config_file": str(config_file.resolve()),
            "broker": broker_to_json(broker_config, url),
            "data": data,
            "wait_devices": devices_wanted,
            "wait_s": wait_s,
            "workers": workers,
        }
    )
    verb = "continuing run" if existing is not None else "run"
    env.console.print(
        f"{verb} {spec.run_id}: {spec.strategy} with {spec.model_name}, {spec.rounds} rounds, "
        f"{spec.clients_per_round} devices per round; broker {url} ({source})"
    )
    run_on_broker(
        env,
        spec,
        broker_config,
        url,
        source,
        data,
        wait_devices=devices_wanted,
        wait_s=wait_s,
        workers=workers,
    )
    finish_message(env, spec)


def _existing_run(store: Store, spec: RunSpec) -> RunSpec | None:
    """The stored spec of an unfinished run with ``spec``'s id (None if there is no such run).

    The stored spec wins over the file (the rounds already run followed it); a file that now
    says something else is reported, not silently applied.
    """
    try:
        record = store.get_run(spec.run_id)
    except NotFoundError:
        return None
    if record.status is RunStatus.FINISHED:
        raise StoreConflictError(
            f"run {spec.run_id!r} is finished; start a new one under another id (--run-id ID, "
            "or change run.id)"
        )
    stored = RunSpec.from_json(record.config)
    if stored != spec:
        log.warning(
            "run %s exists with settings other than the file's; continuing with the stored ones",
            spec.run_id,
        )
    return stored


def _check_not_running(files: RunFiles) -> None:
    pid = files.running_pid()
    if pid is not None and pid != os.getpid():
        raise StoreConflictError(
            f"run {files.run_id!r} is running in process {pid}; stop it with "
            f"`fleet run stop {files.run_id}` first"
        )


@run.command("resume")
@click.argument("run_id", metavar="RUN")
@pass_env
def run_resume(env: Env, run_id: str) -> None:
    """Continue a stopped or interrupted run from the store, launched as it was."""
    with env.store() as store:
        record = _require_run(store, run_id)
    if record.status is RunStatus.FINISHED:
        raise StoreConflictError(f"run {run_id!r} is finished; there is nothing to resume")
    files = RunFiles(env.state_dir, run_id)
    _check_not_running(files)
    files.clear_stop()
    spec = RunSpec.from_json(record.config)
    launch = files.read_launch() or {"kind": "broker", "broker": {}, "data": None}
    env.console.print(f"resuming run {run_id} after round {record.current_round}")
    if launch["kind"] == "simulate":
        broker_url = env.broker or launch.get("broker_url")
        run_simulation(
            env,
            spec,
            sim_from_json(launch["sim"]),
            transport=launch["transport"],
            broker_url=broker_url,
            evaluate=bool(launch.get("evaluate", True)),
            title=run_id,
        )
    else:
        recorded = broker_from_json(launch.get("broker", {}))
        url, source = env.broker_url(recorded.url)
        broker_config = env.broker_account(recorded, source)
        workers = int(launch.get("workers", 0))
        check_sharding(spec, workers)
        run_on_broker(
            env,
            spec,
            broker_config,
            url,
            source,
            launch.get("data"),
            wait_devices=int(launch.get("wait_devices", spec.clients_per_round)),
            wait_s=float(launch.get("wait_s", 30.0)),
            workers=workers,
        )
    finish_message(env, spec)


@run.command("stop")
@click.argument("run_id", metavar="RUN")
@pass_env
def run_stop(env: Env, run_id: str) -> None:
    """Ask a run to stop after its current round (resume it later)."""
    with env.store() as store:
        record = _require_run(store, run_id)
        if record.status not in (RunStatus.RUNNING, RunStatus.CREATED):
            env.console.print(f"run {run_id} is {record.status}; nothing to stop")
            return
        files = RunFiles(env.state_dir, run_id)
        pid = files.running_pid()
        if pid is None:
            store.set_run_status(
                run_id, RunStatus.STOPPED, error="stopped by request (no process was running it)"
            )
            env.console.print(
                f"run {run_id} was not running in any process; marked stopped "
                f"(continue it with `fleet run resume {run_id}`)"
            )
            return
    files.request_stop()
    env.console.print(
        f"stop requested: run {run_id} (process {pid}) stops after round "
        f"{max(record.current_round, 1)}"
    )


@run.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in RunStatus]),
    help="Only runs in this status.",
)
@json_option
@pass_env
def run_list(env: Env, status: str | None, as_json: bool) -> None:
    """Every run in the store."""
    with env.store() as store:
        runs = store.list_runs(status=status)
        series = {r.run_id: load_series(store, r.run_id, layers=False) for r in runs}
    if as_json:
        emit_json(
            [
                clean(
                    {
                        "run_id": r.run_id,
                        "status": str(r.status),
                        "strategy": r.strategy,
                        "model": r.model_name,
                        "rounds_closed": len(series[r.run_id].rounds),
                        "rounds": r.config.get("rounds"),
                        "accuracy": series[r.run_id].final_accuracy,
                        "upload_bytes": series[r.run_id].total_upload_bytes,
                        "download_bytes": series[r.run_id].total_download_bytes,
                        "density": series[r.run_id].final_density,
                        "created_at": r.created_at,
                    }
                )
                for r in runs
            ]
        )
        return
    if not runs:
        env.console.print("no runs yet: try `fleet demo` or `fleet simulate CONFIG`")
        return
    env.console.print(render.runs_table(runs, series))


@run.command("status")
@click.argument("run_id", metavar="RUN")
@json_option
@pass_env
def run_status(env: Env, run_id: str, as_json: bool) -> None:
    """A run's state, its open round and its latest rounds."""
    with env.store() as store:
        record = _require_run(store, run_id)
        series = load_series(store, run_id, layers=False)
        open_round = store.find_open_round(run_id)
        answered = (
            len(store.updates_for_round(run_id, open_round.round)) if open_round is not None else 0
        )
    if as_json:
        emit_json(
            clean(
                {
                    "run_id": record.run_id,
                    "status": str(record.status),
                    "error": record.error,
                    "strategy": record.strategy,
                    "model": record.model_name,
                    "config": record.config,
                    "current_round": record.current_round,
                    "federated_accuracy": series.final_federated_accuracy,
                    "open_round": None
                    if open_round is None
                    else {
                        "round": open_round.round,
                        "selected": list(open_round.selected),
                        "answered": answered,
                        "deadline": open_round.deadline,
                    },
                    "rounds": [
                        {
                            "round": series.rounds[i],
                            "accuracy": series.accuracy[i],
                            "loss": series.loss[i],
                            "density": series.density[i],
                            "received": series.received[i],
                            "selected": series.selected[i],
                            "upload_bytes": series.upload_bytes[i],
                            "download_bytes": series.download_bytes[i],
                            "wall_s": series.wall_s[i],
                            "federated_accuracy": series.federated_accuracy[i],
                            "federated_loss": series.federated_loss[i],
                            "federated_examples": _whole(series.federated_examples[i]),
                            "federated_devices": _whole(series.federated_devices[i]),
                        }
                        for i in range(len(series.rounds))
                    ],
                }
            )
        )
        return
    env.console.print(render.run_status(record, series, open_round, answered))


def _whole(value: float) -> int | None:
    """A count stored as a float metric, as an integer (None where the round has none)."""
    return None if math.isnan(value) else int(value)


@run.command("report")
@click.argument("run_ids", metavar="RUN...", nargs=-1, required=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for report.md and the PNGs (default: reports/RUN[_RUN...]).",
)
@pass_env
def run_report(env: Env, run_ids: tuple[str, ...], out: Path | None) -> None:
    """Plots and a markdown summary of one run, or several overlaid."""
    out = out or Path("reports") / "_".join(run_ids)[:120]
    with env.store() as store:
        for run_id in run_ids:
            _require_run(store, run_id)
        files = write_report(store, list(run_ids), out)
    env.console.print(f"wrote {files.markdown}")
    for path in files.figures:
        env.console.print(f"wrote {path}")

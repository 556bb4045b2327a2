"""Running a run in this process, in the foreground: live progress, stop files, Ctrl-C.

A run started here marks its process in the run files (``fleet run stop`` finds it there); a stop
request ends it after the current round, and Ctrl-C records it as stopped, so that
``fleet run resume`` continues it either way. Used by ``fleet run``, ``fleet simulate`` and
``fleet demo``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from device.errors import BrokerUnavailableError, NotFoundError
from device.wire.broker import is_listening
from device.wire.mqtt import parse_broker_url
from device.wire.topics import Topics
from fleet.cli import render
from fleet.cli.connection import mqtt_transport, start_sharding
from fleet.cli.context import Env, path_or_none
from fleet.cli.runfile import BrokerConfig
from fleet.report import load_series
from fleet.runtime.run_control import RunFiles, StopRequested, StopWatcher
from fleet.runtime.runner import ProgressCallback, RoundReport, Runner, RunSpec
from fleet.sim import BrokerLogins, SimSpec, device_ids, make_evaluator, simulate
from fleet.state.store import RunStatus, Store, StoreConflictError


def check_new_run(store: Store, run_id: str) -> None:
    """Refuse to start ``run_id`` when the store already holds a run of that id."""
    try:
        store.get_run(run_id)
    except NotFoundError:
        return
    raise StoreConflictError(
        f"run {run_id!r} already exists in {store.root}; pick another id with --run-id, or "
        f"continue it with `fleet run resume {run_id}`"
    )


def finish_message(env: Env, spec: RunSpec) -> None:
    """What happened to the run, read back from the store."""
    with env.store() as store:
        series = load_series(store, spec.run_id, layers=False)
        status = store.get_run(spec.run_id).status
    if status is RunStatus.STOPPED:
        env.console.print(
            f"run {spec.run_id} stopped after round {len(series.rounds)}/{spec.rounds}; "
            f"continue it with `fleet run resume {spec.run_id}`"
        )
        return
    env.console.print(
        f"run {spec.run_id} {status}: {len(series.rounds)} rounds, accuracy "
        f"{render.percent(series.final_accuracy)}, uploaded "
        f"{render.human_bytes(series.total_upload_bytes)}, downloaded "
        f"{render.human_bytes(series.total_download_bytes)}; report: "
        f"`fleet run report {spec.run_id}`"
    )


def _mark_stopped(env: Env, run_id: str, why: str) -> None:
    with env.store(create=True) as store:
        try:
            run = store.get_run(run_id)
        except NotFoundError:
            return
        if run.status in (RunStatus.RUNNING, RunStatus.CREATED):
            store.set_run_status(run_id, RunStatus.STOPPED, error=why)


@contextmanager
def _controlled(env: Env, run_id: str) -> Iterator[RunFiles]:
    """Mark this process as running ``run_id``; on Ctrl-C record the run as stopped."""
    files = RunFiles(env.state_dir, run_id)
    with files.running():
        try:
            yield files
        except KeyboardInterrupt:
            _mark_stopped(env, run_id, "interrupted")
            env.console.print(f"interrupted; continue with `fleet run resume {run_id}`")
            raise


def run_simulation(
    env: Env,
    spec: RunSpec,
    sim: SimSpec,
    *,
    transport: Literal["memory", "mqtt"],
    broker_url: str | None,
    evaluate: bool,
    title: str,
) -> list[RoundReport]:
    """Simulate ``spec`` with live progress; a stop request ends it after the current round."""
    files = RunFiles(env.state_dir, spec.run_id)
    logins = simulation_logins(env, broker_url, sim) if transport == "mqtt" else None
    with env.store(create=True) as store:
        done = sum(1 for r in store.rounds(spec.run_id) if r.closed_at is not None)
    with (
        _controlled(env, spec.run_id),
        render.RunProgress(env.console, title, spec.rounds, done=done) as progress,
        StopWatcher(files, lambda: None) as watcher,
    ):
        callback = _stopping(progress, watcher, spec.rounds)
        try:
            return simulate(
                spec,
                sim,
                env.state_dir,
                transport=transport,
                broker_url=broker_url,
                on_progress=callback,
                evaluate_on_test=evaluate,
                logins=logins,
            )
        except StopRequested:
            _mark_stopped(env, spec.run_id, "stopped by request")
            return progress.reports
        finally:
            _simulated_devices_gone(env, sim)


def simulation_logins(env: Env, broker_url: str | None, sim: SimSpec) -> BrokerLogins | None:
    """Accounts for a simulation on the running local broker when it is authenticated: the
    simulated devices are enrolled on it (fresh passwords), as real devices would be with
    ``fleet devices enroll``. None for any other broker (a throw-away one is anonymous)."""
    local = env.local_broker()
    state = local.running()
    if broker_url is None or state is None or state.url != broker_url or state.anonymous:
        return None
    if state.username is None or state.broker_passwords is None:
        return None  # docker mode: its password file is the container's; enrol by hand
    password = BrokerConfig(
        username=state.username, password_file=path_or_none(state.password_file)
    ).password()
    assert password is not None
    accounts = local.enroll_devices(device_ids(sim.devices))
    return BrokerLogins(
        fleet_manager=state.username,
        fleet_manager_password=password,
        devices={device_id: creds.password for device_id, creds in accounts.items()},
    )


def _simulated_devices_gone(env: Env, sim: SimSpec) -> None:
    """Record the simulated devices as offline once their simulation ended.

    Their agents close cleanly (no will) and the runner has disconnected anyway, so without this
    `fleet status` would show a fleet that no longer exists as online. The record gets session
    epoch 0, below every real session (agents, simulated or not, take theirs from the clock),
    so the next simulation's births, with the same device ids, supersede it
    (``status_supersedes``).
    """
    with env.store(create=True) as store:
        for device_id in device_ids(sim.devices):
            record = store.get_device(device_id)
            if record is None or not record.online:
                continue
            store.update_device_status(
                device_id,
                online=False,
                session_epoch=0,
                agent_version=record.agent_version,
                status=record.status,
            )


def _stopping(progress: ProgressCallback, watcher: StopWatcher, rounds: int) -> ProgressCallback:
    """Pass events to ``progress``; after a round closes, stop the simulation if asked to.

    ``simulate`` owns its runner, so a stop is raised from the callback the runner calls right
    after it stored the closed round: the run is left exactly as ``Runner.stop`` leaves it.
    """

    def callback(event: str, data: Mapping[str, Any]) -> None:
        progress(event, data)
        if event == "round_closed" and watcher.requested and data["report"].round < rounds:
            raise StopRequested

    return callback


def run_on_broker(
    env: Env,
    spec: RunSpec,
    broker: BrokerConfig,
    url: str,
    source: str,
    data: Mapping[str, Any] | None,
    *,
    wait_devices: int,
    wait_s: float,
    workers: int = 0,
) -> list[RoundReport]:
    """Run ``spec`` against the devices online at ``url``, with live progress and stop files;
    with ``workers`` >= 1, aggregation is sharded over that many local worker processes."""
    address = parse_broker_url(url)
    if not is_listening(address.host, address.port, timeout_s=5.0):
        # Fail at once (connect() would wait for its timeout) and say what to do.
        raise BrokerUnavailableError(
            f"nothing accepts connections at {url} (broker from {source}); start a local broker "
            "with `fleet broker start`, or pass --broker mqtt://HOST:PORT"
        )
    evaluator = None
    if data is not None and data.get("evaluate", True):
        data_dir = data.get("data_dir")
        evaluator = make_evaluator(
            data["dataset"], None if data_dir is None else Path(data_dir), data.get("options")
        )
    transport = mqtt_transport(broker, url)
    files = RunFiles(env.state_dir, spec.run_id)
    with (
        env.store(create=True) as store,
        _controlled(env, spec.run_id),
        contextlib.ExitStack() as stack,
    ):
        done = sum(1 for r in store.rounds(spec.run_id) if r.closed_at is not None)
        with render.RunProgress(env.console, spec.run_id, spec.rounds, done=done) as progress:
            try:
                coordinator, pool = (
                    start_sharding(stack, env, spec, broker, url, workers)
                    if workers
                    else (None, None)
                )
                runner = Runner(
                    spec,
                    transport,
                    store,
                    topics=Topics(broker.prefix),
                    evaluator=evaluator,
                    on_progress=progress,
                    coordinator=coordinator,
                    supervise=None if pool is None else pool.respawn_dead,
                )
                runner.connect()
            except BrokerUnavailableError as exc:
                raise BrokerUnavailableError(
                    f"{exc} (broker from {source}); start a local one with `fleet broker start`"
                    " or pass --broker mqtt://HOST:PORT"
                ) from None
            try:
                eligible = runner.wait_for_devices(wait_devices, timeout_s=wait_s)
                if eligible == 0:
                    raise NotFoundError(
                        f"no eligible device came online at {url} within {wait_s:.0f} s "
                        f"(tags {list(spec.tags)}); start the devices' agents (`fleet-device "
                        "run --config DEVICE.yaml`), check them with `fleet status`, and try "
                        "again"
                    )
                with StopWatcher(files, runner.stop):
                    return runner.run()
            finally:
                transport.close()

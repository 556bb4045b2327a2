"""The ``fleet`` command (click + rich): broker, runs, devices, simulation, the demo, certificates.

The only place that turns SparseFleet errors into exit codes: ``FleetGroup.invoke`` catches every
``SparseFleetError`` escaping a command, prints ``fleet: error: <one line>`` on stderr and exits
with the exception's ``exit_code`` (table in docs/cli.md). Commands raise those errors with a
message that says what to do; everything printed goes through ``fleet.cli.render``.

State lives in one directory (``--state-dir``, default ``./.sparsefleet`` or
``$SPARSEFLEET_STATE``): the store (``fleet.db``, ``tensors/``), the local broker
(``broker/``), run control files (``runs/``) and certificates (``pki/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from device import __version__
from device.errors import BrokerUnavailableError, NotFoundError, SparseFleetError
from device.wire.broker import find_mosquitto, is_listening
from device.wire.mqtt import MqttTransport, TlsSettings, parse_broker_url
from device.wire.topics import Topics
from fleet.cli import render
from fleet.cli.runfile import (
    BrokerConfig,
    DataConfig,
    FleetConfig,
    TlsConfig,
    default_run_id,
    demo_config,
    dense_baseline,
    describe,
    load_config,
    run_spec,
    sim_spec,
)
from fleet.ops.local_broker import INSTALL_OPTIONS, LocalBroker
from fleet.ops.registry import DeviceInfo, DeviceRegistry
from fleet.report import load_series, write_report
from fleet.runtime.aggregator import (
    DEFAULT_GROUP,
    BrokerLogin,
    Coordinator,
    LocalWorkers,
    run_worker,
)
from fleet.runtime.presence import refresh_presence
from fleet.runtime.run_control import RunFiles, StopRequested, StopWatcher
from fleet.runtime.runner import ProgressCallback, RoundReport, Runner, RunSpec, check_sharding
from fleet.sim import Faults, SimSpec, device_ids, make_evaluator, simulate
from fleet.state.store import RunRecord, RunStatus, Store, StoreConflictError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".sparsefleet")
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
EXIT_INTERRUPTED = 130
WORKER_START_S = 120.0  # worker processes import numpy and torch: seconds each on a busy host
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


# -- the one place errors become exit codes -----------------------------------------------------


class FleetGroup(click.Group):
    """The root group: SparseFleet errors become one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparseFleetError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the message holds
            click.echo(f"fleet: error: {message}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fleet: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


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
            password_file=_path_or_none(local.password_file),
        )


pass_env = click.make_pass_decorator(Env)


def _emit_json(data: Any) -> None:
    """Print ``data`` as JSON (NaN becomes null; enums, paths and the like their str)."""
    click.echo(json.dumps(_clean(data), indent=2, sort_keys=True, default=str, allow_nan=False))


def _clean(value: Any) -> Any:
    """NaN and infinities -> None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="SPARSEFLEET_STATE",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the store, the local broker and run files live ($SPARSEFLEET_STATE).",
)
@click.option(
    "--broker",
    envvar="SPARSEFLEET_BROKER",
    default=None,
    metavar="URL",
    help="MQTT broker, mqtt://host[:port] or mqtts://... ($SPARSEFLEET_BROKER); default: the "
    "local broker of `fleet broker start`, else mqtt://127.0.0.1:1883.",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, state_dir: Path, broker: str | None, verbose: int) -> None:
    """SparseFleet fleet manager: federated sparse training (FedDST, PruneFL) over MQTT."""
    if broker is not None:
        try:
            parse_broker_url(broker)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--broker") from None
    console = render.make_console()
    render.setup_logging(render.make_console(stderr=True), verbose)
    ctx.obj = Env(state_dir=state_dir, broker=broker, verbose=verbose, console=console)


# -- broker -----------------------------------------------------------------------------------


@cli.group()
def broker() -> None:
    """A local mosquitto for development (state in STATE_DIR/broker)."""


@broker.command("start")
@click.option("--port", type=click.IntRange(1, 65535), help="Default: 1883, or a free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@pass_env
def broker_start(env: Env, port: int | None, host: str) -> None:
    """Start the local broker (mosquitto, else docker compose); it keeps running after this."""
    state, started = env.local_broker().start(host=host, port=port)
    verb = "started" if started else "already running"
    how = f"pid {state.pid}" if state.mode == "binary" else "docker compose"
    env.console.print(f"local broker {verb} at {state.url} ({how})")
    if started:
        env.console.print("fleet commands use it by default; stop it with `fleet broker stop`")


@broker.command("stop")
@pass_env
def broker_stop(env: Env) -> None:
    """Stop the local broker."""
    state = env.local_broker().stop()
    if state is None:
        env.console.print("no local broker was running")
    else:
        env.console.print(f"stopped the local broker at {state.url}")


@broker.command("status")
@json_option
@pass_env
def broker_status(env: Env, as_json: bool) -> None:
    """Is the local broker running, and where."""
    local = env.local_broker()
    state = local.recorded()
    running = state is not None and local.is_running(state)
    if as_json:
        _emit_json({"running": running, **(state.to_json() if state else {})})
    else:
        env.console.print(render.broker_status(state, running))


# -- config -----------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Run configuration files."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@json_option
@pass_env
def config_check(env: Env, file: Path, as_json: bool) -> None:
    """Validate a run file (types, known keys, strategy options, model vs dataset)."""
    loaded = load_config(file)
    summary = describe(loaded, file)
    if as_json:
        _emit_json({"ok": True, **summary})
        return
    run = loaded.run
    data = f" on {loaded.data.dataset}" if loaded.data else ""
    env.console.print(
        f"{file}: OK: {run.strategy} with {run.model}{data}, {run.rounds} rounds, "
        f"{run.clients_per_round} device{'s' if run.clients_per_round != 1 else ''} per round"
    )


# -- runs: shared machinery -------------------------------------------------------------------


def _require_run(store: Store, run_id: str) -> RunRecord:
    try:
        return store.get_run(run_id)
    except NotFoundError:
        raise NotFoundError(
            f"no run {run_id!r} in {store.root}; list the runs with `fleet run list`"
        ) from None


def _sim_to_json(sim: SimSpec) -> dict[str, Any]:
    data = dataclasses.asdict(sim)
    data["data_dir"] = None if sim.data_dir is None else str(Path(sim.data_dir).resolve())
    return data


def _sim_from_json(data: Mapping[str, Any]) -> SimSpec:
    values = dict(data)
    values["data_dir"] = None if values.get("data_dir") is None else Path(values["data_dir"])
    values["faults"] = Faults(**values.get("faults", {}))
    return SimSpec(**values)


def _broker_to_json(broker: BrokerConfig, url: str) -> dict[str, Any]:
    tls = broker.tls
    return {
        "url": url,
        "username": broker.username,
        "password_file": None if broker.password_file is None else str(broker.password_file),
        "tls": None if tls is None else {k: _str_or_none(v) for k, v in vars(tls).items()},
        "prefix": broker.prefix,
    }


def _str_or_none(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _broker_from_json(data: Mapping[str, Any]) -> BrokerConfig:
    tls = data.get("tls")
    return BrokerConfig(
        url=data.get("url"),
        username=data.get("username"),
        password_file=None if data.get("password_file") is None else Path(data["password_file"]),
        tls=None
        if tls is None
        else TlsConfig(
            ca_file=_path_or_none(tls.get("ca_file")),
            cert_file=_path_or_none(tls.get("cert_file")),
            key_file=_path_or_none(tls.get("key_file")),
            insecure=bool(tls.get("insecure", False)),
        ),
        prefix=data.get("prefix", "fl/v1"),
    )


def _path_or_none(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _data_to_json(data: DataConfig | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {
        "dataset": data.dataset,
        "data_dir": None if data.data_dir is None else str(data.data_dir.resolve()),
        "evaluate": data.evaluate,
    }


def _check_new_run(store: Store, run_id: str) -> None:
    try:
        store.get_run(run_id)
    except NotFoundError:
        return
    raise StoreConflictError(
        f"run {run_id!r} already exists in {store.root}; pick another id with --run-id, or "
        f"continue it with `fleet run resume {run_id}`"
    )


def _finish_message(env: Env, spec: RunSpec) -> None:
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


def _run_simulation(
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
            )
        except StopRequested:
            _mark_stopped(env, spec.run_id, "stopped by request")
            return progress.reports
        finally:
            _simulated_devices_gone(env, sim)


def _simulated_devices_gone(env: Env, sim: SimSpec) -> None:
    """Record the simulated devices as offline once their simulation ended.

    Their agents close cleanly (no will) and the runner has disconnected anyway, so without this
    `fleet status` would show a fleet that no longer exists as online. The record gets session
    epoch 0, below every real session (simulated agents use epoch 1, real ones the clock), so
    the next simulation's births, with the same device ids, supersede it (``status_supersedes``).
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


def _mqtt_transport(broker: BrokerConfig, url: str, role: str = "") -> MqttTransport:
    """The fleet manager's connection; ``role`` makes a second client id ("coordinator")."""
    address = parse_broker_url(url)
    tls: TlsSettings | None = broker.tls.settings() if broker.tls is not None else None
    if address.tls and tls is None:
        tls = TlsSettings()
    client_id = broker.username or "fleet-manager"
    if role:
        client_id = f"{client_id}-{role}"
    return MqttTransport(
        client_id,
        host=address.host,
        port=address.port,
        username=broker.username,
        password=broker.password(),
        tls=tls,
        manual_ack=True,
    )


def _login(broker: BrokerConfig) -> BrokerLogin:
    """The fleet manager's broker account and TLS files, for its aggregator workers."""
    tls = broker.tls
    return BrokerLogin(
        username=broker.username,
        password_file=broker.password_file,
        ca_file=None if tls is None else tls.ca_file,
        cert_file=None if tls is None else tls.cert_file,
        key_file=None if tls is None else tls.key_file,
        insecure=False if tls is None else tls.insecure,
    )


def _start_sharding(
    stack: contextlib.ExitStack,
    env: Env,
    spec: RunSpec,
    broker: BrokerConfig,
    url: str,
    workers: int,
) -> tuple[Coordinator, LocalWorkers]:
    """Connect the coordinator, start ``workers`` local worker processes and wait until each
    has joined the shared subscription. ``stack`` stops and reaps them (and closes the
    coordinator's connection) however the run ends, Ctrl-C included."""
    transport = _mqtt_transport(broker, url, role="coordinator")
    stack.callback(transport.close)
    coordinator = Coordinator(transport, env.store(), spec.run_id, topics=Topics(broker.prefix))
    stack.callback(coordinator.store.close)
    coordinator.connect()  # before the workers start: their hello must not be missed
    pool = LocalWorkers(
        workers,
        url,
        env.state_dir.resolve(),
        spec.run_id,
        prefix=broker.prefix,
        login=_login(broker),
    )
    stack.callback(pool.stop)
    pool.start()
    try:
        coordinator.wait_for_workers(pool.ids, timeout_s=WORKER_START_S)
    except TimeoutError as exc:
        exited = {f"pid {p.pid}": p.returncode for p in pool.procs.values() if p.poll() is not None}
        # Not BrokerUnavailableError: the broker answered the coordinator; the workers did not.
        raise SparseFleetError(
            f"{exc} within {WORKER_START_S:.0f} s at {url}"
            + (f"; exited: {exited} (their log is above)" if exited else "")
        ) from None
    env.console.print(f"{workers} aggregator worker(s) running: {', '.join(pool.ids)}")
    return coordinator, pool


def _run_on_broker(
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
        evaluator = make_evaluator(data["dataset"], None if data_dir is None else Path(data_dir))
    transport = _mqtt_transport(broker, url)
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
                    _start_sharding(stack, env, spec, broker, url, workers)
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


# -- run --------------------------------------------------------------------------------------


@cli.group()
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
    data = _data_to_json(loaded.data)
    devices_wanted = wait_devices or spec.clients_per_round
    files.write_launch(
        {
            "kind": "broker",
            "config_file": str(config_file.resolve()),
            "broker": _broker_to_json(broker_config, url),
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
    _run_on_broker(
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
    _finish_message(env, spec)


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
        _run_simulation(
            env,
            spec,
            _sim_from_json(launch["sim"]),
            transport=launch["transport"],
            broker_url=broker_url,
            evaluate=bool(launch.get("evaluate", True)),
            title=run_id,
        )
    else:
        recorded = _broker_from_json(launch.get("broker", {}))
        url, source = env.broker_url(recorded.url)
        broker_config = env.broker_account(recorded, source)
        workers = int(launch.get("workers", 0))
        check_sharding(spec, workers)
        _run_on_broker(
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
    _finish_message(env, spec)


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
        _emit_json(
            [
                _clean(
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
        _emit_json(
            _clean(
                {
                    "run_id": record.run_id,
                    "status": str(record.status),
                    "error": record.error,
                    "strategy": record.strategy,
                    "model": record.model_name,
                    "config": record.config,
                    "current_round": record.current_round,
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
                        }
                        for i in range(len(series.rounds))
                    ],
                }
            )
        )
        return
    env.console.print(render.run_status(record, series, open_round, answered))


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


# -- simulate ---------------------------------------------------------------------------------


@cli.command("simulate")
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
        _check_new_run(store, spec.run_id)
    evaluate = loaded.data is None or loaded.data.evaluate
    RunFiles(env.state_dir, spec.run_id).write_launch(
        {
            "kind": "simulate",
            "config_file": str(config_file.resolve()),
            "sim": _sim_to_json(sim),
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
    _run_simulation(
        env, spec, sim, transport=mode, broker_url=broker_url, evaluate=evaluate, title=spec.run_id
    )
    _finish_message(env, spec)


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


# -- demo -------------------------------------------------------------------------------------


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


@cli.command("demo")
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
            _check_new_run(store, spec.run_id)
    started = time.monotonic()
    for spec, label in zip(specs, ("FedDST", "FedAvg (dense)"), strict=True):
        RunFiles(env.state_dir, spec.run_id).write_launch(
            {
                "kind": "simulate",
                "config_file": None,
                "sim": _sim_to_json(sim),
                "transport": mode,
                "broker_url": None,
                "evaluate": True,
            }
        )
        _run_simulation(
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


# -- aggregator workers -----------------------------------------------------------------------


@cli.group()
def aggregator() -> None:
    """Sharded aggregation: workers that decode, validate, store and sum a run's updates."""


@aggregator.command("run")
@click.option("--run", "run_id", required=True, metavar="RUN", help="The run to aggregate.")
@click.option(
    "--worker-id",
    required=True,
    metavar="ID",
    help="MQTT client id; keep it across restarts so the worker resumes its session.",
)
@click.option(
    "--broker",
    "broker_url",
    metavar="URL",
    help="Default: the global --broker, else the local broker, else mqtt://127.0.0.1:1883.",
)
@click.option(
    "--state",
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet manager's state directory (default: the global --state-dir).",
)
@click.option("--prefix", default="fl/v1", show_default=True, help="Topic prefix.")
@click.option(
    "--group", default=DEFAULT_GROUP, show_default=True, help="Shared-subscription group."
)
@click.option("--username", help="Broker account (the fleet manager's).")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File whose first line is the password.",
)
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), help="Broker's CA.")
@click.option("--cert-file", type=click.Path(path_type=Path, dir_okay=False), help="Client cert.")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), help="Its key.")
@click.option("--insecure", is_flag=True, help="Skip the TLS host-name check (test certs only).")
@pass_env
def aggregator_run(
    env: Env,
    run_id: str,
    worker_id: str,
    broker_url: str | None,
    state: Path | None,
    prefix: str,
    group: str,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    insecure: bool,
) -> None:
    """Run one aggregator worker for RUN until Ctrl-C or SIGTERM.

    The same as `python -m fleet.runtime.aggregator run`. It must run where the fleet
    manager's state directory is (it stores the updates it accepts there); `fleet run start
    --workers K` starts K of them itself.
    """
    url = broker_url or env.broker_url()[0]
    try:
        parse_broker_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from None
    state_dir = state or env.state_dir
    env.console.print(f"aggregator worker {worker_id} for run {run_id} on {url}; stop with Ctrl-C")
    run_worker(
        url,
        state_dir,
        run_id,
        worker_id,
        prefix=prefix,
        group=group,
        login=BrokerLogin(username, password_file, ca_file, cert_file, key_file, insecure),
    )
    env.console.print(f"aggregator worker {worker_id} stopped")


# -- devices and fleet status -----------------------------------------------------------------


def _require_device(registry: DeviceRegistry, device_id: str) -> DeviceInfo:
    info = registry.find(device_id)
    if info is None:
        raise NotFoundError(
            f"no device {device_id!r} in {registry.store.root}; list the devices with "
            "`fleet devices list`"
        )
    return info


def _device_json(info: DeviceInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["schedulable"] = info.schedulable
    return data


def job_states(store: Store) -> dict[str, str]:
    """Each device's current job, from the store: in the open round of a running run it is
    "training rN" until its update is stored, then "uploaded rN" (job events themselves are not
    stored; a device that reported failure shows in the failures column)."""
    jobs: dict[str, str] = {}
    for run in store.list_runs(status=RunStatus.RUNNING):
        open_round = store.find_open_round(run.run_id)
        if open_round is None:
            continue
        answered = {u.device_id for u in store.updates_for_round(run.run_id, open_round.round)}
        for device_id in open_round.selected:
            state = "uploaded" if device_id in answered else "training"
            jobs[device_id] = f"{state} r{open_round.round}"
    return jobs


@cli.group()
def devices() -> None:
    """The device registry: list, inspect, cordon, drain, tag, enroll."""


@devices.command("list")
@click.option("--online/--offline", "online", default=None, help="Only online (offline) devices.")
@json_option
@pass_env
def devices_list(env: Env, online: bool | None, as_json: bool) -> None:
    """Every known device."""
    with env.store() as store:
        infos = DeviceRegistry(store).devices(online=online)
    if as_json:
        _emit_json([_device_json(d) for d in infos])
    elif not infos:
        env.console.print("no devices yet: devices appear when they connect to the broker")
    else:
        env.console.print(render.devices_table(infos, time.time()))


@devices.command("show")
@click.argument("device_id", metavar="DEVICE")
@json_option
@pass_env
def devices_show(env: Env, device_id: str, as_json: bool) -> None:
    """One device in detail, with its recent rejections."""
    with env.store() as store:
        info = _require_device(DeviceRegistry(store), device_id)
        rejections = store.rejections(device_id=device_id, limit=10)
    if as_json:
        _emit_json(
            {
                **_device_json(info),
                "recent_rejections": [dataclasses.asdict(r) for r in rejections],
            }
        )
    else:
        env.console.print(render.device_panel(info, rejections, time.time()))


def _flag_command(
    name: str, action: Callable[[DeviceRegistry, str], DeviceInfo], done: str, help_text: str
) -> None:
    @devices.command(name, help=help_text)
    @click.argument("device_ids", metavar="DEVICE...", nargs=-1, required=True)
    @pass_env
    def command(env: Env, device_ids: tuple[str, ...]) -> None:
        with env.store() as store:
            registry = DeviceRegistry(store)
            for device_id in device_ids:
                _require_device(registry, device_id)
            for device_id in device_ids:
                action(registry, device_id)
                env.console.print(f"{device_id}: {done}")


_flag_command(
    "cordon",
    DeviceRegistry.cordon,
    "cordoned (no new rounds; a running job finishes)",
    "No new rounds for DEVICE; a job it is running finishes.",
)
_flag_command(
    "uncordon",
    DeviceRegistry.uncordon,
    "schedulable again",
    "Make DEVICE schedulable again (clears cordon and drain).",
)
_flag_command(
    "drain",
    DeviceRegistry.drain,
    "drained (no new rounds; its current job is cancelled)",
    "No new rounds for DEVICE, and its current job is cancelled.",
)


@devices.command("tag")
@click.argument("device_id", metavar="DEVICE")
@click.argument("tags", metavar="[KEY=VALUE|LABEL]...", nargs=-1)
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove a tag (repeat).")
@pass_env
def devices_tag(env: Env, device_id: str, tags: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Add or override operator tags of DEVICE (runs select devices by tags)."""
    if not tags and not remove:
        raise click.UsageError("give tags to set (KEY=VALUE or LABEL) or --remove KEY")
    with env.store() as store:
        registry = DeviceRegistry(store)
        _require_device(registry, device_id)
        if remove:
            registry.untag(device_id, list(remove))
        info = registry.tag(device_id, list(tags)) if tags else registry.get(device_id)
    shown = ",".join(k if not v else f"{k}={v}" for k, v in sorted(info.tags.items())) or "-"
    env.console.print(f"{device_id}: tags {shown}")


@devices.command("enroll")
@click.argument("device_id", metavar="DEVICE")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The broker's mosquitto password file (default: STATE_DIR/broker/passwd).",
)
@click.option(
    "--secrets-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the device's password goes, mode 0600 (default: "
    "STATE_DIR/secrets/DEVICE.password).",
)
@click.option(
    "--acl-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The broker's ACL, created if absent (default: STATE_DIR/broker/acl).",
)
@click.option("--reload-pid", type=int, help="SIGHUP this mosquitto so it reads the new password.")
@pass_env
def devices_enroll(
    env: Env,
    device_id: str,
    password_file: Path | None,
    secrets_file: Path | None,
    acl_file: Path | None,
    reload_pid: int | None,
) -> None:
    """Give DEVICE a broker account: a random password, its hash, the ACL."""
    from fleet.ops.enroll import enroll, reload_broker

    credentials = enroll(
        device_id,
        password_file=password_file or env.state_dir / "broker" / "passwd",
        secrets_file=secrets_file or env.state_dir / "secrets" / f"{device_id}.password",
        acl_file=acl_file or env.state_dir / "broker" / "acl",
    )
    env.console.print(
        f"enrolled {credentials.username}: password in {credentials.secrets_file} (mode 0600); "
        "copy it to the device"
    )
    if reload_pid is not None:
        reload_broker(reload_pid)
        env.console.print(f"asked mosquitto pid {reload_pid} to reload its password file")
    else:
        env.console.print("the broker picks it up after `kill -HUP <mosquitto pid>`")


def _refresh_presence(env: Env, store: Store) -> str:
    """Bring the registry's online/offline up to date from the broker's retained statuses when
    a broker is known (--broker, or the local broker); returns a note saying where presence
    came from."""
    local = env.local_broker().running()
    url = env.broker or (local.url if local is not None else None)
    if url is None:
        return (
            "presence as last recorded: pass --broker URL (or run `fleet broker start`) to read "
            "it from the broker"
        )
    username = password = None
    if env.broker is None and local is not None and local.username is not None:
        username = local.username
        password = BrokerConfig(
            username=local.username, password_file=_path_or_none(local.password_file)
        ).password()
    try:
        refresh_presence(DeviceRegistry(store), url, username=username, password=password)
    except BrokerUnavailableError:
        return f"broker {url} is unreachable: presence as last recorded"
    return f"presence from {url}"


@cli.command("status")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(0.2), default=2.0, show_default=True, help="Seconds."
)
@click.option(
    "--refresh/--no-refresh",
    default=True,
    show_default=True,
    help="Read who is online from the broker's retained statuses first (when a broker is "
    "known: --broker or the local broker).",
)
@json_option
@pass_env
def status(env: Env, watch: bool, interval: float, refresh: bool, as_json: bool) -> None:
    """The live fleet: who is online, what each device does, its counters."""

    def snapshot() -> tuple[list[DeviceInfo], dict[str, str], list[str], str]:
        with env.store() as store:
            note = _refresh_presence(env, store) if refresh else "presence as last recorded"
            infos = DeviceRegistry(store).devices()
            jobs = job_states(store)
            active = []
            for r in store.list_runs(status=RunStatus.RUNNING):
                open_round = store.find_open_round(r.run_id)
                total = r.config.get("rounds", "?")
                if open_round is None:
                    active.append(f"run {r.run_id}: round {r.current_round}/{total}")
                else:
                    answered = len(store.updates_for_round(r.run_id, open_round.round))
                    active.append(
                        f"run {r.run_id}: round {open_round.round}/{total}, "
                        f"{answered}/{len(open_round.selected)} answered"
                    )
        return infos, jobs, active, note

    if as_json:
        infos, jobs, active, note = snapshot()
        _emit_json(
            {
                "presence": note,
                "runs": active,
                "devices": [
                    {**_device_json(d), "job": jobs.get(d.device_id, "idle")} for d in infos
                ],
            }
        )
        return

    def view() -> Any:
        infos, jobs, active, note = snapshot()
        return render.fleet_view(infos, jobs, active, note, time.time())

    if watch:
        render.watch(env.console, view, interval)
    else:
        env.console.print(view())


# -- certificates -----------------------------------------------------------------------------


@cli.group()
def certs() -> None:
    """A small CA: the broker's TLS certificate and one client certificate per device."""


pki_option = click.option(
    "--pki",
    type=click.Path(path_type=Path, file_okay=False),
    help="The CA directory (default: STATE_DIR/pki).",
)


@certs.command("init-ca")
@pki_option
@click.option("--cn", default="SparseFleet CA", show_default=True, help="The CA's name.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates its certs).")
@pass_env
def certs_init_ca(env: Env, pki: Path | None, cn: str, days: int, force: bool) -> None:
    """Create the CA (ca.crt, and ca.key mode 0600: keep it off the broker)."""
    from fleet.ops.certs import init_ca

    files = init_ca(pki or env.state_dir / "pki", cn=cn, days=days, overwrite=force)
    env.console.print(f"created CA {cn!r}: {files.cert_file} and {files.key_file}")


@certs.command("issue")
@click.argument("device_id", metavar="DEVICE")
@pki_option
@click.option("--days", type=click.IntRange(1, 36500), default=365, show_default=True)
@pass_env
def certs_issue(env: Env, device_id: str, pki: Path | None, days: int) -> None:
    """Issue DEVICE's client certificate (its CN is the device id)."""
    from fleet.ops.certs import issue

    files = issue(pki or env.state_dir / "pki", device_id, days=days)
    env.console.print(f"issued {device_id}: {files.cert_file} and {files.key_file} (mode 0600)")


@certs.command("server")
@click.argument("hosts", metavar="HOST...", nargs=-1, required=True)
@pki_option
@click.option("--days", type=click.IntRange(1, 36500), default=825, show_default=True)
@pass_env
def certs_server(env: Env, hosts: tuple[str, ...], pki: Path | None, days: int) -> None:
    """Issue the broker's TLS certificate for HOST names and IP addresses devices dial."""
    from fleet.ops.certs import issue_server

    files = issue_server(pki or env.state_dir / "pki", hosts=hosts, days=days)
    env.console.print(f"issued the server certificate: {files.cert_file} and {files.key_file}")


def main() -> None:
    """Console-script entry point."""
    cli()

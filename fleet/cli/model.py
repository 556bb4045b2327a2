"""``fleet model ...``: export a run's model, deploy it to devices, roll back, watch them.

    fleet model keygen                           the deployment signing key (pki/deploy-signing.*)
    fleet model export RUN -o FILE               the run's global model as a signed sparse artefact
    fleet model inspect FILE                     an artefact's manifest, its signature checked
    fleet model deploy FILE --to all|DEVICE|tag=K=V [--canary N%]
    fleet model rollback [--to VERSION]          the version before (or VERSION) on those devices
    fleet model status                           per device: version, since, inferences, errors
    fleet model history                          every deployment and rollback
    fleet model devices [--count N]              simulated devices that follow deployments

docs/deployment.md describes the artefact, the protocol and the device's side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from device.errors import ConfigError, NotFoundError
from device.trust import TrustedKeys
from device.wire.artefact import read_artefact
from device.wire.mqtt import MqttTransport, TlsSettings, parse_broker_url
from device.wire.topics import Topics
from fleet.cli import render_model
from fleet.cli.context import Env, emit_json, json_option, pass_env
from fleet.cli.runfile import BrokerConfig
from fleet.deploy.export import DATASET_PRESETS, export_dense, export_run
from fleet.deploy.rollout import Rollout, RolloutOptions, RolloutResult
from fleet.deploy.signing import PUBLIC_NAME, ensure_key, generate_key, load_key
from fleet.deploy.targets import resolve_targets
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.presence import read_retained
from fleet.runtime.run_control import RunFiles

PKI_DIR = "pki"


def _pki(env: Env) -> Path:
    return env.state_dir / PKI_DIR


@click.group()
def model() -> None:
    """Export a run's model, deploy it to devices over MQTT, roll back, watch it."""


@model.command("keygen")
@click.option(
    "--force", is_flag=True, help="Replace an existing key (devices must trust the new one)."
)
@pass_env
def keygen(env: Env, force: bool) -> None:
    """Make the fleet manager's deployment signing key (Ed25519)."""
    key = generate_key(_pki(env), force=force)
    env.console.print(f"deployment key {key.key_id}: private {key.private_file} (keep it here)")
    env.console.print(
        f"public {key.public_file}: copy it to every device and list it in the device "
        "config's deploy.trusted_keys"
    )


@model.command("export")
@click.argument("run_id", metavar="RUN")
@click.option("--round", "round_", type=click.IntRange(0), help="Round (default: the last).")
@click.option(
    "--values",
    type=click.Choice(["int8", "fp16", "fp32"]),
    default="int8",
    show_default=True,
    help="Value precision (int8: one scale per tensor).",
)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--version", "label", help="Version label (default: RUN-rROUND-VALUES).")
@click.option("--classes", help="Class names, comma-separated (class i is logit i).")
@click.option(
    "--dataset",
    type=click.Choice(sorted(DATASET_PRESETS)),
    help="Built-in dataset the run trained on: its classes and pixel normalisation "
    "(default: from the run's launch record).",
)
@click.option(
    "--torchscript",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also a dense TorchScript file.",
)
@click.option(
    "--onnx",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also a dense ONNX file (needs the onnx package).",
)
@json_option
@pass_env
def export(
    env: Env,
    run_id: str,
    round_: int | None,
    values: str,
    output: Path,
    label: str | None,
    classes: str | None,
    dataset: str | None,
    torchscript: Path | None,
    onnx: Path | None,
    as_json: bool,
) -> None:
    """The global model of RUN (its last round, or --round N) as a compact, signed artefact."""
    with env.store() as store:
        store.get_run(run_id)  # an unknown run is an error before any key is made
    key, made = ensure_key(_pki(env))
    if made:
        env.console.print(
            f"made deployment key {key.key_id} ({key.public_file}: devices must trust it)"
        )
    if dataset is None:
        launch = RunFiles(env.state_dir, run_id).read_launch() or {}
        known = (launch.get("data") or {}).get("dataset")
        dataset = known if known in DATASET_PRESETS else None
    names = [c.strip() for c in classes.split(",")] if classes else None
    with env.store() as store:
        try:
            exported = export_run(
                store,
                run_id,
                key,
                round_=round_,
                values=values,
                version=label,
                classes=names,
                dataset=dataset,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    output.write_bytes(exported.data)
    dense = {}
    for kind, path in (("torchscript", torchscript), ("onnx", onnx)):
        if path is not None:
            export_dense(exported.artefact, path, kind)  # type: ignore[arg-type]
            dense[kind] = str(path)
    if as_json:
        emit_json(
            {
                "file": str(output),
                "bytes": len(exported.data),
                "sha256": exported.artefact.sha256.hex(),
                "manifest": exported.manifest.to_json(),
                "dense": dense,
            }
        )
        return
    env.console.print(
        render_model.manifest_table(
            exported.manifest, len(exported.data), exported.artefact.sha256.hex()
        )
    )
    env.console.print(f"wrote {output}" + "".join(f", {p}" for p in dense.values()))


@model.command("inspect")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@json_option
@pass_env
def inspect(env: Env, path: Path, as_json: bool) -> None:
    """An artefact's manifest; its digests and signature are checked (with this fleet's key)."""
    data = path.read_bytes()
    artefact = read_artefact(data)
    key = load_key(_pki(env))
    TrustedKeys([key.public_raw]).verify(artefact)
    if as_json:
        emit_json({"sha256": artefact.sha256.hex(), "manifest": artefact.manifest.to_json()})
    else:
        env.console.print(
            render_model.manifest_table(artefact.manifest, len(data), artefact.sha256.hex())
        )
        env.console.print(f"signature: valid (key {artefact.key_id})")


# -- the broker ---------------------------------------------------------------------------------

broker_options = [
    click.option("--username", help="Broker account (default: the local broker's)."),
    click.option(
        "--password-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="File holding the account's password (mode 0600).",
    ),
    click.option(
        "--ca-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="CA certificate of an mqtts:// broker.",
    ),
    click.option("--prefix", default="fl/v1", show_default=True, help="Topic prefix."),
]


def _with_broker_options(func: Any) -> Any:
    for option in reversed(broker_options):
        func = option(func)
    return func


def _connect(
    env: Env, username: str | None, password_file: Path | None, ca_file: Path | None
) -> MqttTransport:
    """A clean, throw-away session of the fleet manager's account (client id ``{user}-deploy``,
    so a running run's connection is never taken over)."""
    url, source = env.broker_url()
    broker = env.broker_account(
        BrokerConfig(username=username, password_file=password_file), source
    )
    address = parse_broker_url(url)
    tls = (
        TlsSettings(ca_file=str(ca_file))
        if ca_file is not None
        else (TlsSettings() if address.tls else None)
    )
    transport = MqttTransport(
        f"{broker.username or 'fleet-manager'}-deploy",
        host=address.host,
        port=address.port,
        username=broker.username,
        password=broker.password(),
        tls=tls,
        session_expiry_s=0,
        connect_timeout_s=10.0,
    )
    transport.connect()
    return transport


def _report(env: Env, result: RolloutResult, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "deployment": result.record.deployment_id,
                "version": result.record.version,
                "status": result.record.status.value,
                "reason": result.record.reason,
                "devices": [
                    {"device": d.device_id, "role": d.role, "state": d.state, "reason": d.reason}
                    for d in result.devices
                ],
            }
        )
    else:
        env.console.print(render_model.rollout_table(result.record, result.devices))
        pending = result.count("pending") + result.count("downloading") + result.count("verified")
        if pending:
            env.console.print(
                f"{pending} device(s) not done yet (offline ones install when they connect): "
                "`fleet model status`"
            )
    if result.record.status.value == "failed":
        raise click.exceptions.Exit(1)


@model.command("deploy")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--to", "to", required=True, help="all, a device id, or tag=KEY=VALUE.")
@click.option("--canary", default="0%", show_default=True, help="Share installed first, e.g. 10%.")
@click.option(
    "--canary-timeout", type=click.FloatRange(1), default=300.0, show_default=True, help="Seconds."
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for online devices (0: publish and return).",
)
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    help="Canaries' self-test accuracy must reach this.",
)
@_with_broker_options
@json_option
@pass_env
def deploy(
    env: Env,
    path: Path,
    to: str,
    canary: str,
    canary_timeout: float,
    wait_s: float,
    min_accuracy: float | None,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    prefix: str,
    as_json: bool,
) -> None:
    """Publish the artefact at PATH to devices over MQTT and follow them."""
    try:
        percent = float(canary.rstrip("%"))
    except ValueError:
        raise click.BadParameter(f"{canary!r} is not a percentage", param_hint="--canary") from None
    data = path.read_bytes()
    artefact = read_artefact(data)
    TrustedKeys([load_key(_pki(env)).public_raw]).verify(artefact)  # never publish a bad one
    options = RolloutOptions(
        canary_percent=percent,
        canary_timeout_s=canary_timeout,
        wait_s=wait_s,
        min_selftest_accuracy=min_accuracy,
    )
    transport = _connect(env, username, password_file, ca_file)
    try:
        with env.store(create=True) as store:
            rollout = Rollout(store, transport, Topics(prefix), progress=env.console.print)
            rollout.listen()
            rollout.pump(0.5)
            targets = resolve_targets(to, DeviceRegistry(store).devices())
            result = rollout.deploy(data, targets, options)
    finally:
        transport.close()
    _report(env, result, as_json)


@model.command("rollback")
@click.option("--to", "to_version", help="Version to return to (default: the one before).")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=120.0,
    show_default=True,
    help="Seconds to wait for online devices.",
)
@_with_broker_options
@json_option
@pass_env
def rollback(
    env: Env,
    to_version: str | None,
    wait_s: float,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    prefix: str,
    as_json: bool,
) -> None:
    """Deploy the previous version (or --to VERSION) to the devices of the newest deployment."""
    with env.store() as store:
        history = store.deployments.list_deployments()
    if not history:
        raise NotFoundError("nothing was ever deployed: no version to roll back to")
    transport = _connect(env, username, password_file, ca_file)
    try:
        with env.store() as store:
            rollout = Rollout(store, transport, Topics(prefix), progress=env.console.print)
            result = rollout.rollback(to_version, RolloutOptions(wait_s=wait_s))
    finally:
        transport.close()
    _report(env, result, as_json)


@model.command("status")
@click.option(
    "--refresh/--no-refresh",
    default=True,
    show_default=True,
    help="Read the devices' retained statuses from the broker first (when one is known).",
)
@_with_broker_options
@json_option
@pass_env
def status(
    env: Env,
    refresh: bool,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    prefix: str,
    as_json: bool,
) -> None:
    """Per device: the version it serves, since when, inferences, errors, last deployment."""
    with env.store() as store:
        note = _refresh(env, store, prefix, username, password_file) if refresh else ""
        infos = DeviceRegistry(store).devices()
        models = store.deployments.device_models()
        latest = {}
        for device_id in {i.device_id for i in infos} | set(models):
            history = store.deployments.device_history(device_id)
            if history:
                latest[device_id] = history[0]
    if as_json:
        emit_json(
            {
                "devices": [
                    {
                        "device": device_id,
                        "version": models[device_id].version if device_id in models else None,
                        "since": models[device_id].since if device_id in models else None,
                        "inferences": models[device_id].inferences if device_id in models else 0,
                        "errors": models[device_id].errors if device_id in models else 0,
                        "deployment": latest[device_id][0].deployment_id
                        if device_id in latest
                        else None,
                        "state": latest[device_id][1].state if device_id in latest else None,
                        "reason": latest[device_id][1].reason if device_id in latest else "",
                    }
                    for device_id in sorted({i.device_id for i in infos} | set(models))
                ]
            }
        )
        return
    env.console.print(render_model.status_table(infos, models, latest, time.time()))
    if note:
        env.console.print(note)


def _refresh(
    env: Env, store: Any, prefix: str, username: str | None, password_file: Path | None
) -> str:
    """Apply the broker's retained device statuses (deployed model, last deployment state)."""
    from device.errors import BrokerUnavailableError
    from fleet.deploy.tracking import apply_message

    url, source = env.broker_url()
    if source == "the default" and env.local_broker().running() is None:
        return "as last recorded: pass --broker URL (or run `fleet broker start`) to refresh"
    broker = env.broker_account(
        BrokerConfig(username=username, password_file=password_file), source
    )
    try:
        messages = read_retained(
            url, Topics(prefix).all_status(), username=broker.username, password=broker.password()
        )
    except BrokerUnavailableError:
        return f"broker {url} is unreachable: as last recorded"
    for message in messages:
        apply_message(store, Topics(prefix), message)
    return f"statuses from {url}"


@model.command("devices")
@click.option("--count", type=click.IntRange(1, 500), default=3, show_default=True)
@click.option("--remote-inference", is_flag=True, help="Answer inference requests over MQTT.")
@click.option(
    "--for",
    "duration",
    type=click.FloatRange(0),
    default=0.0,
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
@click.option("--prefix", default="fl/v1", show_default=True, help="Topic prefix.")
@pass_env
def devices(env: Env, count: int, remote_inference: bool, duration: float, prefix: str) -> None:
    """Simulated devices that follow deployments (sim-0000, ...), for trying deploy, rollback
    and `fleet-device predict` on this machine; their models are in STATE_DIR/sim-devices/."""
    from fleet.sim.core import device_ids
    from fleet.sim.deploy_devices import start_deploy_devices

    public = _pki(env) / PUBLIC_NAME
    if not public.exists():
        raise NotFoundError(f"no deployment key at {public}: run `fleet model keygen` first")
    url, source = env.broker_url()
    address = parse_broker_url(url)
    ids = device_ids(count)
    passwords: dict[str, str] = {}
    local = env.local_broker()
    running = local.running() if source == "the local broker" else None
    if running is not None and not running.anonymous and running.broker_passwords is not None:
        passwords = {d: c.password for d, c in local.enroll_devices(ids).items()}

    def transport(device_id: str) -> MqttTransport:
        return MqttTransport(
            device_id,
            host=address.host,
            port=address.port,
            username=device_id if device_id in passwords else None,
            password=passwords.get(device_id),
            tls=TlsSettings() if address.tls else None,
        )

    root = env.state_dir / "sim-devices"
    fleet_devices = start_deploy_devices(
        ids, transport, root, public, topics=Topics(prefix), remote_inference=remote_inference
    )
    env.console.print(
        f"{count} simulated device(s) online at {url}: {', '.join(ids)}; models in {root}"
        + ("" if duration else "; Ctrl-C stops them")
    )
    try:
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        fleet_devices.stop()
    env.console.print(f"{count} simulated device(s) stopped")


@model.command("history")
@json_option
@pass_env
def history(env: Env, as_json: bool) -> None:
    """Every deployment and rollback, newest first."""
    with env.store() as store:
        records = store.deployments.list_deployments()
    if as_json:
        emit_json(
            [
                {
                    "deployment": r.deployment_id,
                    "sequence": r.sequence,
                    "kind": r.kind,
                    "version": r.version,
                    "to": r.target,
                    "status": r.status.value,
                    "reason": r.reason,
                    "bytes": r.artefact_bytes,
                }
                for r in records
            ]
        )
    elif not records:
        env.console.print("nothing deployed yet: `fleet model export`, then `fleet model deploy`")
    else:
        env.console.print(render_model.deployments_table(records))


__all__ = ["model"]

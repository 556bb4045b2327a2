"""``fleet devices ...``: the device registry: list, inspect, cordon, drain, tag, enroll."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from device.errors import NotFoundError
from fleet.cli import render
from fleet.cli.context import Env, emit_json, json_option, pass_env
from fleet.ops.registry import DeviceInfo, DeviceRegistry


def _require_device(registry: DeviceRegistry, device_id: str) -> DeviceInfo:
    info = registry.find(device_id)
    if info is None:
        raise NotFoundError(
            f"no device {device_id!r} in {registry.store.root}; list the devices with "
            "`fleet devices list`"
        )
    return info


def device_json(info: DeviceInfo) -> dict[str, Any]:
    """A device as JSON: its DeviceInfo, ``schedulable``, and ``models`` as references with
    hex architecture digests (``[]``: none announced, an older agent: the built-ins)."""
    data = dataclasses.asdict(info)
    data["schedulable"] = info.schedulable
    data["models"] = [offer.to_json() for offer in info.models]
    return data


@click.group()
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
        emit_json([device_json(d) for d in infos])
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
        emit_json(
            {
                **device_json(info),
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
@click.option(
    "--reload-pid",
    type=int,
    help="SIGHUP this mosquitto so it reads the new password (default: the local broker of "
    "`fleet broker start` when the account is made in its password file).",
)
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

    passwords = password_file or env.state_dir / "broker" / "passwd"
    credentials = enroll(
        device_id,
        password_file=passwords,
        secrets_file=secrets_file or env.state_dir / "secrets" / f"{device_id}.password",
        acl_file=acl_file or env.state_dir / "broker" / "acl",
    )
    env.console.print(
        f"enrolled {credentials.username}: password in {credentials.secrets_file} (mode 0600); "
        "copy it to the device"
    )
    local = env.local_broker().running()
    if (
        reload_pid is None
        and local is not None
        and local.broker_passwords is not None
        and Path(local.broker_passwords).resolve() == passwords.resolve()
    ):
        reload_pid = local.pid
    if reload_pid is not None:
        reload_broker(reload_pid)
        env.console.print(f"asked mosquitto pid {reload_pid} to reload its password file")
    else:
        env.console.print("the broker picks it up after `kill -HUP <mosquitto pid>`")

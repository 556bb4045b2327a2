"""``fleet status``: the live fleet: who is online, what each device does, its counters."""

from __future__ import annotations

import time
from typing import Any

import click

from device.errors import BrokerUnavailableError
from fleet.cli import render
from fleet.cli.context import Env, emit_json, json_option, pass_env, path_or_none
from fleet.cli.devices import device_json
from fleet.cli.runfile import BrokerConfig
from fleet.ops.registry import DeviceInfo, DeviceRegistry
from fleet.runtime.presence import refresh_presence
from fleet.state.store import RunStatus, Store


def job_states(store: Store) -> dict[str, str]:
    """Each device's current job, from the store: in the open round of a running run it is
    "training rN" until its update is stored, then "uploaded rN @ density D" (the density it
    trained at, when recorded; job events themselves are not
    stored; a device that reported failure shows in the failures column)."""
    jobs: dict[str, str] = {}
    for run in store.list_runs(status=RunStatus.RUNNING):
        open_round = store.find_open_round(run.run_id)
        if open_round is None:
            continue
        answered = {u.device_id: u for u in store.updates_for_round(run.run_id, open_round.round)}
        for device_id in open_round.selected:
            update = answered.get(device_id)
            if update is None:
                jobs[device_id] = f"training r{open_round.round}"
                continue
            # The density it trained at (per-device budgets: docs/heterogeneity.md).
            density = update.meta.get("density")
            at = f" @ density {density:.3f}" if isinstance(density, int | float) else ""
            jobs[device_id] = f"uploaded r{open_round.round}{at}"
    return jobs


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
            username=local.username, password_file=path_or_none(local.password_file)
        ).password()
    try:
        refresh_presence(DeviceRegistry(store), url, username=username, password=password)
    except BrokerUnavailableError:
        return f"broker {url} is unreachable: presence as last recorded"
    return f"presence from {url}"


@click.command("status")
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
        emit_json(
            {
                "presence": note,
                "runs": active,
                "devices": [
                    {**device_json(d), "job": jobs.get(d.device_id, "idle")} for d in infos
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

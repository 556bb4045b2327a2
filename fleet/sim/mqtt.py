"""The simulation over a real MQTT broker: agents in worker processes, one connection each.

A local mosquitto is started on a free loopback port unless a broker URL is given. Device agents
are spread over ``SimSpec.processes`` worker processes (spawned, so each has its own torch thread
pool and GIL); every agent has its own MQTT connection, exactly as on a real fleet.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.synchronize
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from device.wire.broker import MosquittoBroker
from device.wire.mqtt import MqttTransport, parse_broker_url
from device.wire.topics import Topics
from fleet.runtime.runner import ProgressCallback, RoundReport, Runner, RunSpec
from fleet.sim.core import (
    FleetData,
    SimSpec,
    device_ids,
    fault_plan,
    fleet_data,
    make_evaluator,
    partition_lookup,
    sim_data_root,
    start_agents,
)
from fleet.state.store import Store

log = logging.getLogger(__name__)

BIRTH_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BrokerLogins:
    """Accounts on an authenticated broker: the fleet manager's and each simulated device's.

    ``devices`` maps a device id to its password (the username is the device id, as on a real
    fleet); a device missing from it connects without credentials. Passwords are left out of
    ``repr`` so that logging the object never leaks them.
    """

    fleet_manager: str
    fleet_manager_password: str = field(repr=False)
    devices: Mapping[str, str] = field(default_factory=dict, repr=False)


def _worker(
    host: str,
    port: int,
    sim: SimSpec,
    data: FleetData,
    indices: Sequence[int],
    ready: mp.synchronize.Event,
    stop: mp.synchronize.Event,
    prefix: str,
    passwords: Mapping[str, str],
) -> None:  # runs in a child process
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, sim.torch_threads))
    agents = start_agents(
        lambda device_id: MqttTransport(
            device_id,
            host=host,
            port=port,
            username=device_id if device_id in passwords else None,
            password=passwords.get(device_id),
        ),
        sim,
        data,
        Topics(prefix),
        fault_plan(sim),
        indices,
        sharers=sim.processes,
    )
    ready.set()
    stop.wait()
    for agent in agents:
        try:
            agent.stop(timeout_s=5.0)
        except Exception:  # a killed agent's transport is already gone
            log.debug("agent stop failed", exc_info=True)


class DeviceFleet:
    """Simulated devices in worker processes, connected to ``host:port``."""

    def __init__(
        self,
        host: str,
        port: int,
        sim: SimSpec,
        data: FleetData,
        *,
        prefix: str = "fl/v1",
        passwords: Mapping[str, str] | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._procs: list[Any] = []
        self._ready: list[mp.synchronize.Event] = []
        workers = max(1, min(sim.processes, sim.devices))
        for w in range(workers):
            ready = ctx.Event()
            indices = list(range(w, sim.devices, workers))
            ids = device_ids(sim.devices)
            mine = {ids[i]: passwords[ids[i]] for i in indices if passwords and ids[i] in passwords}
            proc = ctx.Process(
                target=_worker,
                args=(host, port, sim, data, indices, ready, self._stop, prefix, mine),
                name=f"sim-devices-{w}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._ready.append(ready)

    def wait_ready(self, timeout_s: float = BIRTH_TIMEOUT_S) -> None:
        for proc, ready in zip(self._procs, self._ready, strict=True):
            if not ready.wait(timeout_s) or not proc.is_alive():
                raise TimeoutError(f"simulated device process {proc.name} did not start")

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(15.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def simulate_mqtt(
    run: RunSpec,
    sim: SimSpec,
    store_dir: Path,
    *,
    broker_url: str | None = None,
    on_progress: ProgressCallback | None = None,
    evaluate_on_test: bool = True,
    logins: BrokerLogins | None = None,
) -> list[RoundReport]:
    """Run ``run`` over MQTT with ``sim.devices`` simulated devices; return the round reports.

    ``logins``: the accounts to use on an authenticated ``broker_url``; the throw-away broker
    started when ``broker_url`` is None is anonymous and needs none.
    """
    data = fleet_data(sim, sim_data_root(store_dir, run.run_id), hold_out=evaluate_on_test)
    broker: MosquittoBroker | None = None
    if broker_url is None:
        broker = MosquittoBroker(state_dir=Path(tempfile.mkdtemp(prefix="sparsefleet-sim-")))
        broker.start()
        host, port = broker.host, broker.port
    else:
        address = parse_broker_url(broker_url)
        host, port = address.host, address.port
    fleet = DeviceFleet(host, port, sim, data, passwords=None if logins is None else logins.devices)
    store = Store(store_dir)
    try:
        fleet.wait_ready()
        transport = MqttTransport(
            "fleet-manager" if logins is None else logins.fleet_manager,
            host=host,
            port=port,
            manual_ack=True,
            username=None if logins is None else logins.fleet_manager,
            password=None if logins is None else logins.fleet_manager_password,
        )
        runner = Runner(
            run,
            transport,
            store,
            evaluator=make_evaluator(sim.dataset, sim.data_dir, sim.data_options)
            if evaluate_on_test
            else None,
            partition_for=partition_lookup(sim.devices),
            on_progress=on_progress,
        )
        runner.connect()
        try:
            runner.wait_for_devices(sim.devices, timeout_s=BIRTH_TIMEOUT_S)
            return runner.run()
        finally:
            transport.close()
    finally:
        fleet.stop()
        store.close()
        if broker is not None:
            broker.stop()

"""Simulated devices on one machine, over the in-memory broker or a real MQTT broker.

``simulate`` is the room's front door; ``core`` holds what both transports share, ``memory``
runs everything in one process, ``mqtt`` gives every agent its own connection to mosquitto
(spread over worker processes; a throw-away broker on a free loopback port unless one is given).
``userdata`` splits a user's dataset (a device-local format) into per-device directories that
the simulated devices read as real devices read theirs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from fleet.runtime.runner import ProgressCallback, RoundReport, RunSpec
from fleet.sim.core import Faults, SimSpec, device_ids, make_evaluator
from fleet.sim.memory import simulate_memory
from fleet.sim.mqtt import BrokerLogins, simulate_mqtt

__all__ = ["BrokerLogins", "Faults", "SimSpec", "device_ids", "make_evaluator", "simulate"]


def simulate(
    run: RunSpec,
    sim: SimSpec,
    store_dir: Path,
    *,
    transport: Literal["memory", "mqtt"] = "memory",
    broker_url: str | None = None,
    on_progress: ProgressCallback | None = None,
    evaluate_on_test: bool = True,
    logins: BrokerLogins | None = None,
) -> list[RoundReport]:
    """Run ``run`` on ``sim.devices`` simulated devices and return the round reports.

    ``broker_url`` and ``logins`` (accounts on an authenticated broker) apply to ``mqtt``.
    Simulated devices run this process's code, so unless ``sim.models`` says otherwise they
    announce the run's model.
    """
    if not sim.models:
        sim = dataclasses.replace(sim, models=(run.model,))
    torch.set_num_threads(max(1, sim.torch_threads))
    if transport == "memory":
        return simulate_memory(run, sim, store_dir, on_progress, evaluate_on_test)
    return simulate_mqtt(
        run,
        sim,
        store_dir,
        broker_url=broker_url,
        on_progress=on_progress,
        evaluate_on_test=evaluate_on_test,
        logins=logins,
    )

"""The simulation over the in-memory broker: every agent and the runner in one process."""

from __future__ import annotations

from pathlib import Path

from device.wire.memory import MemoryBroker, MemoryTransport
from device.wire.topics import Topics
from fleet.runtime.runner import ProgressCallback, RoundReport, Runner, RunSpec
from fleet.sim.core import (
    SimSpec,
    fault_plan,
    fleet_data,
    make_evaluator,
    partition_lookup,
    sim_data_root,
    start_agents,
)
from fleet.state.store import Store


def simulate_memory(
    run: RunSpec,
    sim: SimSpec,
    store_dir: Path,
    on_progress: ProgressCallback | None,
    evaluate_on_test: bool,
) -> list[RoundReport]:
    """Run ``run`` on ``sim.devices`` agents that share one in-process ``MemoryBroker``."""
    broker = MemoryBroker()
    topics = Topics()
    data = fleet_data(sim, sim_data_root(store_dir, run.run_id), hold_out=evaluate_on_test)
    plan = fault_plan(sim)
    agents = start_agents(
        lambda device_id: MemoryTransport(broker, device_id),
        sim,
        data,
        topics,
        plan,
        range(sim.devices),
    )
    store = Store(store_dir)
    try:
        runner = Runner(
            run,
            MemoryTransport(broker, "fleet-manager"),
            store,
            topics=topics,
            evaluator=make_evaluator(sim.dataset, sim.data_dir, sim.data_options)
            if evaluate_on_test
            else None,
            partition_for=partition_lookup(sim.devices),
            on_progress=on_progress,
        )
        runner.connect()
        runner.wait_for_devices(sim.devices, timeout_s=30.0)
        return runner.run()
    finally:
        for agent in agents:
            agent.stop(timeout_s=5.0)
        store.close()

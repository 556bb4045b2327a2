"""Stores with known content for the dashboard's tests and bench/dashboard.py.

Everything is written through the public ``Store`` API, as a runner writes it: devices through
the registry (births), rounds opened and closed with their updates, late updates, rejections and
checkpoints whose masks give known per-layer densities. ``Clock`` makes the times exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device.wire.messages import DeviceStatus, Hardware
from fleet.ops.registry import DeviceRegistry
from fleet.state.store import Store

T0 = 1_700_000_000.0
LAYERS = {"fc1.weight": (16, 8), "fc2.weight": (8, 4)}


@dataclass
class Clock:
    """A settable clock (Unix seconds) for ``Store(clock=...)``."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def add_devices(
    store: Store, count: int, *, prefix: str = "dev-", offline_every: int = 4, at: float = T0
) -> list[str]:
    """``count`` devices with births (every ``offline_every``-th then sends its will), tagged
    ``site=lab|field`` and ``arm64``; returns their ids in order."""
    registry = DeviceRegistry(store, clock=lambda: at)
    ids = [f"{prefix}{i:04d}" for i in range(count)]
    for i, device_id in enumerate(ids):
        status = DeviceStatus(
            online=True,
            session_epoch=1,
            agent_version="0.9.0" if i % 3 else "0.8.1",
            hardware=Hardware(machine="aarch64", cpu_count=4, memory_bytes=4 << 30),
            dataset_size=100 + i,
            tags=("site=lab" if i % 2 == 0 else "site=field", "arm64"),
            timestamp_unix_s=at,
        )
        registry.apply_status(device_id, status, received_at=at + i * 0.001)
        if offline_every and i % offline_every == offline_every - 1:
            will = DeviceStatus(online=False, session_epoch=1, agent_version=status.agent_version)
            registry.apply_status(device_id, will, received_at=at + i * 0.001)
    return ids


def _model(density: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    weights: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for k, (name, shape) in enumerate(LAYERS.items()):
        size = int(np.prod(shape))
        kept = round(size * min(1.0, density * (1 + k)))  # layer k keeps (k+1) times as much
        mask = np.zeros(size, dtype=bool)
        mask[:kept] = True
        masks[name] = mask.reshape(shape)
        weights[name] = np.where(masks[name], 0.5, 0.0).astype(np.float32)
    return weights, masks


def layer_densities(density: float) -> dict[str, float]:
    """The per-layer densities ``add_run`` stores for a model of global setting ``density``."""
    _, masks = _model(density)
    return {name: float(m.mean()) for name, m in masks.items()}


def add_run(
    store: Store,
    clock: Clock,
    run_id: str,
    devices: Sequence[str],
    *,
    rounds: int,
    per_round: int,
    planned: int | None = None,
    round_s: float = 2.0,
    late_every: int = 0,
    reject_every: int = 0,
    leave_open: bool = False,
    payload_bytes: int = 1000,
    density: float = 0.25,
) -> None:
    """A run with ``rounds`` closed rounds (then one open round if ``leave_open``).

    Round r selects ``per_round`` devices starting at ``(r * per_round) % len(devices)``; all but
    the last answer in time; the last answers late (after the close) in rounds divisible by
    ``late_every``, and in rounds divisible by ``reject_every`` the one before it sends a
    rejected update (reason ``non_finite``) instead. Each round takes ``round_s`` seconds,
    uploads ``payload_bytes`` per update, and stores accuracy ``0.5 + r / 100`` and federated
    accuracy ``0.4 + r / 100``.
    """
    store.create_run(
        run_id,
        config={
            "run_id": run_id,
            "rounds": planned or rounds + int(leave_open),
            "clients_per_round": per_round,
            "strategy_options": {"density": density},
        },
        strategy="feddst",
        model_name="mlp",
    )
    store.set_run_status(run_id, "running")
    weights, masks = _model(density)
    store.save_checkpoint(run_id, 0, weights, masks)
    version = 0
    late_key: tuple[int, str] | None = None
    for r in range(1, rounds + 1 + int(leave_open)):
        start = (r * per_round) % len(devices)
        selected = [devices[(start + i) % len(devices)] for i in range(per_round)]
        store.open_round(
            run_id, r, selected=selected, deadline=clock.now + 60, model_version_in=version
        )
        store.add_traffic(run_id, r, None, down=payload_bytes * per_round)
        answering = list(selected)
        late_device = selected[-1] if late_every and r % late_every == 0 else None
        if late_device is not None:
            answering.remove(late_device)
        if reject_every and r % reject_every == 0 and len(answering) > 1:
            rejected = answering.pop()
            store.record_rejection(run_id, r, rejected, "non_finite", "NaN in fc1.weight")
        for device_id in answering:
            clock.advance(round_s / (per_round + 1))
            payload = f"{run_id}/{r}/{device_id}".encode().ljust(payload_bytes, b".")
            store.record_update(run_id, r, device_id, payload, 10)
        if leave_open and r == rounds + 1:
            return
        clock.now = clock.now + round_s / (per_round + 1)
        version = r  # round r produces model version r
        weights, masks = _model(density * (1 - r / (4 * rounds)))
        store.save_checkpoint(run_id, version, weights, masks, round=r)
        dropped = [late_key] if late_key is not None else []
        store.close_round(
            run_id,
            r,
            model_version_out=version,
            counted=[(r, d) for d in answering],
            dropped=dropped,
            metrics={
                "accuracy": 0.5 + r / 100,
                "federated_accuracy": 0.4 + r / 100,
                "loss": 1.0 / r,
                "density": density * (1 - r / (4 * rounds)),
                "received": len(answering),
                "selected": per_round,
                "aggregate_s": 0.01 * r,
            },
        )
        late_key = None
        if late_device is not None:
            clock.advance(0.1)
            payload = f"late/{run_id}/{r}/{late_device}".encode().ljust(payload_bytes, b".")
            store.record_update(run_id, r, late_device, payload, 10, status="late")
            late_key = (r, late_device)
        clock.advance(0.5)
    store.set_run_status(run_id, "finished")

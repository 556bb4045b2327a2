"""A run as the report reads it: one series of per-round figures, loaded from the store.

Units: bytes as stored; ``MB`` is 10^6 bytes, the unit the plots and tables use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.state.store import RoundStatus, Store

MB = 1_000_000.0


@dataclass(frozen=True)
class RunSeries:
    """One run's closed rounds as parallel tuples (index i = ``rounds[i]``).

    ``accuracy`` is in [0, 1] and NaN for rounds that were not evaluated; bytes are per round
    (``up``: devices to the fleet manager). ``federated_*`` are the federated evaluation's
    (``fleet.runtime.evaluation``: the devices' own held-out data, weighted by example count),
    NaN for rounds it did not measure; ``federated_examples`` and ``federated_devices`` are the
    examples and devices it combined. ``layer_density`` maps each pruned tensor to
    ``(round, density)`` points from the checkpoints (round 0 = the model before round 1); it is
    empty for a dense run.
    """

    run_id: str
    strategy: str
    model_name: str
    status: str
    config: Mapping[str, Any]
    rounds: tuple[int, ...] = ()
    accuracy: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()
    density: tuple[float, ...] = ()
    upload_bytes: tuple[int, ...] = ()
    download_bytes: tuple[int, ...] = ()
    received: tuple[int, ...] = ()
    selected: tuple[int, ...] = ()
    wall_s: tuple[float, ...] = ()
    federated_accuracy: tuple[float, ...] = ()
    federated_loss: tuple[float, ...] = ()
    federated_examples: tuple[float, ...] = ()
    federated_devices: tuple[float, ...] = ()
    layer_density: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.run_id} ({self.strategy})"

    @property
    def cumulative_upload_mb(self) -> tuple[float, ...]:
        total = 0
        out = []
        for b in self.upload_bytes:
            total += b
            out.append(total / MB)
        return tuple(out)

    def evaluated(self) -> list[int]:
        """Indices of the rounds that have an accuracy."""
        return [i for i, a in enumerate(self.accuracy) if not math.isnan(a)]

    def federated_evaluated(self) -> list[int]:
        """Indices of the rounds that have a federated accuracy."""
        return [i for i, a in enumerate(self.federated_accuracy) if not math.isnan(a)]

    @property
    def final_federated_accuracy(self) -> float:
        idx = self.federated_evaluated()
        return self.federated_accuracy[idx[-1]] if idx else math.nan

    @property
    def final_accuracy(self) -> float:
        idx = self.evaluated()
        return self.accuracy[idx[-1]] if idx else math.nan

    @property
    def best_accuracy(self) -> float:
        idx = self.evaluated()
        return max(self.accuracy[i] for i in idx) if idx else math.nan

    @property
    def total_upload_bytes(self) -> int:
        return sum(self.upload_bytes)

    @property
    def total_download_bytes(self) -> int:
        return sum(self.download_bytes)

    @property
    def final_density(self) -> float:
        return self.density[-1] if self.density else math.nan

    @property
    def total_wall_s(self) -> float:
        return sum(self.wall_s)


def _float(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def load_series(store: Store, run_id: str, *, layers: bool = True) -> RunSeries:
    """Read a run's closed rounds (and, with ``layers``, per-layer densities from its
    checkpoints' masks). ``NotFoundError`` if the run does not exist."""
    run = store.get_run(run_id)
    closed = [r for r in store.rounds(run_id) if r.status is RoundStatus.CLOSED]
    layer_density: dict[str, list[tuple[int, float]]] = {}
    if layers:
        by_round: dict[int, int] = {}  # round -> newest checkpoint version produced by it
        for record in store.checkpoints(run_id):
            by_round[record.round or 0] = max(record.version, by_round.get(record.round or 0, -1))
        for round_, version in sorted(by_round.items()):
            checkpoint = store.load_checkpoint(run_id, version)
            for name, mask in checkpoint.masks.items():
                kept = float(mask.mean()) if mask.size else 1.0
                layer_density.setdefault(name, []).append((round_, kept))
    return RunSeries(
        run_id=run.run_id,
        strategy=run.strategy,
        model_name=run.model_name,
        status=str(run.status),
        config=run.config,
        rounds=tuple(r.round for r in closed),
        accuracy=tuple(_float(r.metrics, "accuracy") for r in closed),
        loss=tuple(_float(r.metrics, "loss") for r in closed),
        density=tuple(_float(r.metrics, "density") for r in closed),
        upload_bytes=tuple(r.bytes_up for r in closed),
        download_bytes=tuple(r.bytes_down for r in closed),
        received=tuple(int(r.metrics.get("received", 0)) for r in closed),
        selected=tuple(len(r.selected) for r in closed),
        wall_s=tuple(_float(r.metrics, "wall_s") for r in closed),
        federated_accuracy=tuple(_float(r.metrics, "federated_accuracy") for r in closed),
        federated_loss=tuple(_float(r.metrics, "federated_loss") for r in closed),
        federated_examples=tuple(_float(r.metrics, "federated_examples") for r in closed),
        federated_devices=tuple(_float(r.metrics, "federated_devices") for r in closed),
        layer_density={k: tuple(v) for k, v in layer_density.items()},
    )


# -- figures ----------------------------------------------------------------------------------

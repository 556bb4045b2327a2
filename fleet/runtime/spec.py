"""What defines a run and what it reports: ``RunSpec``, ``RoundReport``, the callbacks' types,
the run's totals, and whether a run may be aggregated on sharded workers.

Sharding needs exact partial sums: aggregation is exact
(``fleet.strategies.accumulate.aggregate_exact``: integer partial sums), so the new model does
not depend on the order or the split of the updates, and K aggregator workers give the same bits
as the runner alone. Robust aggregation (trimmed mean, median, clipping) and the "next" late
policy need every update in the runner, so they are refused with workers (``check_sharding``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from device.errors import ConfigError
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import kind_of
from fleet.strategies.base import GlobalModel, Strategy
from fleet.strategies.robust import RobustOptions

Evaluator = Callable[[GlobalModel], Mapping[str, float]]
"""Evaluates a global model on held-out data: ``{"accuracy": 0..1, "loss": ...}``."""

ProgressCallback = Callable[[str, Mapping[str, Any]], None]
"""``(kind, payload)``: "update", "event", "initial_job" and "round_closed" (payload
``{"report": RoundReport}``) as the run goes; called on the runner's thread."""

ClosedBy = Literal["k_of_n", "deadline", "all_answered"]
"""Why a round closed: k updates arrived, its deadline passed, or every selected device
answered (an update or a failure)."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run. Stored as JSON with the run, so ``resume`` needs nothing else.

    ``clients_per_round`` (k) updates close a round early; ``over_select`` >= 1 selects
    ``ceil(k * over_select)`` devices so that stragglers do not hold it open; the deadline closes
    it otherwise, with whatever arrived (at least ``min_updates`` for an aggregation to happen).
    """

    run_id: str
    model_name: str
    strategy: str
    rounds: int
    clients_per_round: int
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    over_select: float = 1.0
    min_updates: int = 1
    round_timeout_s: float = 600.0
    late_policy: Literal["drop", "next"] = "drop"
    eval_every: int = 1
    seed: int = 0
    tags: tuple[str, ...] = ()
    max_update_bytes: int = 256 * 1024 * 1024
    init_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategy_options"] = dict(self.strategy_options)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        values = dict(data)
        values["tags"] = tuple(values.get("tags", ()))
        return cls(**values)


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round; passed to the progress callback and stored with the round."""

    round: int
    selected: tuple[str, ...]
    received: tuple[str, ...]
    failed: tuple[str, ...]
    rejected: int
    model_version: int
    density: float
    upload_bytes: int
    download_bytes: int
    wall_s: float
    max_train_s: float
    closed_by: ClosedBy
    metrics: Mapping[str, float]


def global_density(model: GlobalModel) -> float:
    """Kept fraction over all pruned tensors (1.0 when nothing is pruned)."""
    if not model.masks:
        return 1.0
    kept = sum(int(m.sum()) for m in model.masks.values())
    total = sum(m.size for m in model.masks.values())
    return kept / total if total else 1.0


def summarize(reports: Sequence[RoundReport]) -> dict[str, float]:
    """Totals over a run's reports: bytes up and down, final accuracy if evaluated."""
    final = next((r.metrics for r in reversed(reports) if "accuracy" in r.metrics), {})
    return {
        "rounds": float(len(reports)),
        "upload_bytes": float(sum(r.upload_bytes for r in reports)),
        "download_bytes": float(sum(r.download_bytes for r in reports)),
        "accuracy": float(final.get("accuracy", math.nan)),
        "density": reports[-1].density if reports else 1.0,
    }


def exact_aggregation_applies(strategy: Strategy) -> bool:
    """Whether ``strategy``'s rounds can be aggregated from exact partial sums
    (``aggregate_exact``): its kind is known to ``fleet.strategies.accumulate`` and it has no
    robust aggregation enabled (a trimmed mean, a median or clipping needs every update)."""
    try:
        kind_of(strategy.name)
    except ValueError:
        return False
    robust = getattr(getattr(strategy, "options", None), "robust", None)
    return not (isinstance(robust, RobustOptions) and robust.enabled)


def check_sharding(spec: RunSpec, workers: int, strategy: Strategy | None = None) -> None:
    """Raise ``ConfigError`` when ``spec`` cannot run with ``workers`` aggregator workers.

    ``workers`` >= 0 (0: the runner aggregates alone, always possible). With workers, the
    strategy must aggregate from sums (no robust aggregation) and the late policy must be
    "drop" (workers refuse updates of a closed round). ``strategy`` defaults to the spec's.
    """
    if workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {workers}")
    if workers == 0:
        return
    if strategy is None:
        try:
            strategy = create_strategy(spec.strategy, **dict(spec.strategy_options))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"run {spec.run_id!r}: {exc}") from None
    robust = getattr(getattr(strategy, "options", None), "robust", None)
    if isinstance(robust, RobustOptions) and robust.enabled:
        raise ConfigError(
            f"run {spec.run_id!r}: robust aggregation (method {robust.method!r}, clip_norm "
            f"{robust.clip_norm!r}) cannot run on aggregator workers: a trimmed mean, a median "
            "or clipping needs every update, and workers hand over only sums; run without "
            "--workers, or remove run.options.robust"
        )
    if not exact_aggregation_applies(strategy):
        raise ConfigError(
            f"run {spec.run_id!r}: strategy {strategy.name!r} has no partial-sum aggregation; "
            "run it without --workers"
        )
    if spec.late_policy != "drop":
        raise ConfigError(
            f"run {spec.run_id!r}: late_policy {spec.late_policy!r} cannot run on aggregator "
            "workers (they refuse updates of a closed round); use late_policy drop or run "
            "without --workers"
        )

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
from device.model_ref import ModelRef
from fleet.runtime.async_options import AsyncOptions
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import kind_of
from fleet.strategies.base import GlobalModel, Strategy
from fleet.strategies.budgets import BudgetPolicy
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
class FederatedEvaluation:
    """Federated evaluation (``fleet.runtime.evaluation``): after every ``every``-th round's
    aggregation (and the last round's), the current model is sent with an ``EvaluateCommand``
    to a sample of the online devices (idle ones too): ``ceil(fraction * eligible)`` of them, at
    least ``min_devices``. Their loss and accuracy, weighted by their example counts, are stored
    with the round when at least ``min_devices`` answered within ``timeout_s`` seconds.

    ``every`` >= 1 rounds; ``fraction`` in (0, 1]; ``min_devices`` >= 1; ``timeout_s`` > 0.
    """

    every: int = 1
    fraction: float = 1.0
    min_devices: int = 1
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name, ok, rule in (
            ("every", self.every >= 1, "at least 1 round"),
            ("fraction", 0.0 < self.fraction <= 1.0, "a fraction in (0, 1]"),
            ("min_devices", self.min_devices >= 1, "at least 1"),
            ("timeout_s", self.timeout_s > 0, "more than 0 seconds"),
        ):
            if not ok:
                raise ValueError(f"{name}: must be {rule}, got {getattr(self, name)!r}")

    def due(self, round_: int, rounds: int) -> bool:
        """Whether round ``round_`` of a run of ``rounds`` rounds is evaluated."""
        return round_ % self.every == 0 or round_ == rounds


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run. Stored as JSON with the run, so ``resume`` needs nothing else.

    ``clients_per_round`` (k) updates close a round early; ``over_select`` >= 1 selects
    ``ceil(k * over_select)`` devices so that stragglers do not hold it open; the deadline closes
    it otherwise, with whatever arrived (at least ``min_updates`` for an aggregation to happen).

    The model: ``model_name`` is the text of its reference (``device.model_ref``: a registered
    name, or a factory with kwargs), ``model_ref`` the reference itself (None: read from
    ``model_name``; filled in on construction, so ``model`` is always the reference).
    ``prunable``: regular expressions naming the tensors the strategy may prune
    (``device.models.prunable_names``); empty: the weights of every Linear and Conv layer.
    ``classes``: the run's label space in order (class ``i`` is logit ``i``), sent to every
    device with the model; empty: not declared (devices then need their own).
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
    model_ref: ModelRef | None = None
    prunable: tuple[str, ...] = ()
    evaluate: FederatedEvaluation | None = None  # federated evaluation; None: none
    classes: tuple[str, ...] = ()
    # Per-device density budgets: "none", "auto" or {tag: density} (fleet.strategies.budgets).
    budgets: str | Mapping[str, float] = "none"
    # "sync": rounds; "async": buffered asynchronous aggregation (fleet.runtime.async_rounds)
    # with ``async_options`` (None: the defaults).
    mode: Literal["sync", "async"] = "sync"
    async_options: AsyncOptions | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"run {self.run_id!r}: mode must be sync or async, got {self.mode!r}")
        try:
            budgeted = BudgetPolicy.parse(self.budgets).active
        except ConfigError as exc:
            raise ConfigError(f"run {self.run_id!r}: {exc}") from None
        if budgeted and self.late_policy == "next" and self.mode == "sync":
            raise ConfigError(
                f"run {self.run_id!r}: budgets {self.budgets!r} need late_policy drop (a late "
                "update is judged against the next round's model, not its own subnetwork)"
            )
        if self.model_ref is None:
            try:
                object.__setattr__(self, "model_ref", ModelRef.parse(self.model_name))
            except ValueError as exc:
                raise ConfigError(f"run {self.run_id!r}: {exc}") from None
        elif not self.model_name:
            object.__setattr__(self, "model_name", self.model_ref.text)
        elif self.model_name != self.model_ref.text:
            raise ConfigError(
                f"run {self.run_id!r}: model_name {self.model_name!r} is not the text of its "
                f"model_ref {self.model_ref.text!r}"
            )
        object.__setattr__(self, "prunable", tuple(self.prunable))
        object.__setattr__(self, "classes", tuple(self.classes))
        problem = classes_problem(self.classes, self.model.num_classes)
        if problem is not None:
            raise ConfigError(f"run {self.run_id!r}: classes: {problem}")

    @property
    def model(self) -> ModelRef:
        """The run's model reference (never None after construction)."""
        assert self.model_ref is not None
        return self.model_ref

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategy_options"] = dict(self.strategy_options)
        data["tags"] = list(self.tags)
        data["model_ref"] = self.model.to_json()
        data["prunable"] = list(self.prunable)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        values = dict(data)
        values["tags"] = tuple(values.get("tags", ()))
        if values.get("model_ref") is not None:
            values["model_ref"] = ModelRef.from_json(values["model_ref"])
        values["prunable"] = tuple(values.get("prunable", ()))
        values["classes"] = tuple(values.get("classes", ()))
        if values.get("evaluate") is not None:
            values["evaluate"] = FederatedEvaluation(**values["evaluate"])
        if isinstance(values.get("async_options"), Mapping):
            values["async_options"] = AsyncOptions(**values["async_options"])
        return cls(**values)


def classes_problem(classes: tuple[str, ...], num_classes: int | None) -> str | None:
    """What is wrong with a run's ``classes`` (None: nothing). Empty is fine (not declared);
    otherwise at least 2 distinct non-empty names, no more than the model's logits when the model
    declares ``num_classes`` (fewer is allowed: the extra logits are never a label)."""
    if not classes:
        return None
    if len(classes) < 2:
        return f"needs at least 2 classes, got {len(classes)}"
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        return f"class names must be non-empty text: {bad[0]!r}"
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        return f"listed more than once: {', '.join(repeated)}"
    if num_classes and len(classes) > num_classes:
        return f"{len(classes)} names but the model has only {num_classes} outputs (num_classes)"
    return None


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
    if spec.mode == "async":
        raise ConfigError(
            f"run {spec.run_id!r}: mode async cannot run on aggregator workers (the buffer "
            "weights each update by its staleness, in the runner); run without --workers"
        )
    if BudgetPolicy.parse(spec.budgets).active:
        raise ConfigError(
            f"run {spec.run_id!r}: budgets {spec.budgets!r} cannot run on aggregator workers "
            "(budgeted updates are aggregated against each device's subnetwork, in the runner); "
            "run without --workers, or set budgets: none"
        )
    if spec.late_policy != "drop":
        raise ConfigError(
            f"run {spec.run_id!r}: late_policy {spec.late_policy!r} cannot run on aggregator "
            "workers (they refuse updates of a closed round); use late_policy drop or run "
            "without --workers"
        )

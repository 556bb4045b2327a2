"""Runs as the dashboard shows them: the list (the figures of ``fleet run list``) and one run's
page (round progress, accuracy against round and against cumulative uploaded MB, bytes per
round, answered/late/rejected per round with the reasons, density per layer).

Round metrics the runner stores and this module reads (keys of ``RoundRecord.metrics``):
``accuracy`` and ``loss`` (server-side evaluation), ``federated_accuracy`` (devices' own
evaluation, where a run has it), ``density`` (kept fraction of the global model after the
round), ``aggregate_s`` (aggregation time, where stored), ``skipped``. Units: seconds, bytes,
MB = 10^6 bytes, accuracy and density in [0, 1]; a missing figure is None (JSON null).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fleet.report.series import MB, RunSeries
from fleet.state.store import RejectionRecord, RoundRecord, RoundStatus, RunRecord
from fleet.web.reader import FleetReader

ACCURACY = "accuracy"
FEDERATED_ACCURACY = "federated_accuracy"
AGGREGATE_S = "aggregate_s"
LATE_REASON = "late"  # the runner's rejection reason for an update that arrived after the close


def metric(metrics: Mapping[str, Any], key: str) -> float | None:
    """A finite number stored under ``key``, else None."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def series_of(run: RunRecord, rounds: Sequence[RoundRecord]) -> RunSeries:
    """The report's series of a run (closed rounds only), from rounds already read."""
    closed = [r for r in rounds if r.status is RoundStatus.CLOSED]
    return RunSeries(
        run_id=run.run_id,
        strategy=run.strategy,
        model_name=run.model_name,
        status=str(run.status),
        config=run.config,
        rounds=tuple(r.round for r in closed),
        accuracy=tuple(_nan(metric(r.metrics, ACCURACY)) for r in closed),
        loss=tuple(_nan(metric(r.metrics, "loss")) for r in closed),
        density=tuple(_nan(metric(r.metrics, "density")) for r in closed),
        upload_bytes=tuple(r.bytes_up for r in closed),
        download_bytes=tuple(r.bytes_down for r in closed),
        received=tuple(int(metric(r.metrics, "received") or 0) for r in closed),
        selected=tuple(len(r.selected) for r in closed),
        wall_s=tuple(_nan(metric(r.metrics, "wall_s")) for r in closed),
    )


def last_metric(rounds: Sequence[RoundRecord], key: str) -> float | None:
    """The newest closed round's value of ``key`` (rounds without it are skipped)."""
    for r in reversed(rounds):
        value = metric(r.metrics, key)
        if r.status is RoundStatus.CLOSED and value is not None:
            return value
    return None


def run_summary(run: RunRecord, rounds: Sequence[RoundRecord]) -> dict[str, Any]:
    """One row of the runs list: the figures ``fleet run list --json`` prints, and a few more."""
    series = series_of(run, rounds)
    planned = run.config.get("rounds")
    return {
        "run_id": run.run_id,
        "status": str(run.status),
        "strategy": run.strategy,
        "model": run.model_name,
        "error": run.error,
        "rounds": planned if isinstance(planned, int) else None,
        "rounds_closed": len(series.rounds),
        "current_round": run.current_round,
        "accuracy": _finite(series.final_accuracy),
        "federated_accuracy": last_metric(rounds, FEDERATED_ACCURACY),
        "upload_bytes": series.total_upload_bytes,
        "download_bytes": series.total_download_bytes,
        "density": _finite(series.final_density),
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    }


def runs_data(reader: FleetReader, status: str | None) -> dict[str, Any]:
    """The runs list, newest first."""
    runs = reader.runs(status)
    return {
        "has_store": reader.store() is not None,
        "runs": [run_summary(run, reader.rounds(run)) for run in reversed(runs)],
    }


def _rejected_by_round(rejections: Sequence[RejectionRecord]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for rej in rejections:
        if rej.round is not None:
            reasons = out.setdefault(rej.round, {})
            reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
    return out


def round_row(
    r: RoundRecord,
    answered: int,
    late: int,
    rejected: Mapping[str, int],
    cumulative_up: int,
) -> dict[str, Any]:
    """One round of a run's page; ``cumulative_up`` is the bytes uploaded up to and including
    this round (closed rounds only, as in the report's accuracy-vs-MB figure).

    ``late`` counts both kinds of late update: stored after the close (the "next" late policy)
    and refused for arriving after it (a rejection with reason ``late``, the "drop" policy);
    ``rejected`` and ``rejected_by_reason`` are the other refusals.
    """
    closed = r.status is RoundStatus.CLOSED
    refused = {k: v for k, v in sorted(rejected.items()) if k != LATE_REASON}
    late += rejected.get(LATE_REASON, 0)
    return {
        "round": r.round,
        "status": str(r.status),
        "opened_at": r.opened_at,
        "closed_at": r.closed_at,
        "duration_s": None if r.closed_at is None else r.closed_at - r.opened_at,
        "deadline": r.deadline,
        "selected": len(r.selected),
        "answered": answered,
        "late": late,
        "rejected": sum(refused.values()),
        "rejected_by_reason": refused,
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
        "cumulative_upload_mb": cumulative_up / MB if closed else None,
        "accuracy": metric(r.metrics, ACCURACY),
        "federated_accuracy": metric(r.metrics, FEDERATED_ACCURACY),
        "loss": metric(r.metrics, "loss"),
        "density": metric(r.metrics, "density"),
        "aggregate_s": metric(r.metrics, AGGREGATE_S),
        "skipped": bool(r.metrics.get("skipped")),
        "close_reason": r.close_reason,
        "model_version_in": r.model_version_in,
        "model_version_out": r.model_version_out,
    }


def run_detail(reader: FleetReader, run_id: str) -> dict[str, Any] | None:
    """A run's page data; None for an unknown run."""
    run = reader.run(run_id)
    if run is None:
        return None
    rounds = reader.rounds(run)
    answers = reader.answers(run)
    rejected = _rejected_by_round(reader.rejections(run_id=run_id))
    rows = []
    cumulative = 0
    for r in rounds:
        if r.status is RoundStatus.CLOSED:
            cumulative += r.bytes_up
        answered, late = answers.get(r.round, (0, 0))
        rows.append(round_row(r, answered, late, rejected.get(r.round, {}), cumulative))
    open_round = next((r for r in rounds if r.status is RoundStatus.OPEN), None)
    return {
        "run": run_summary(run, rounds),
        "clients_per_round": run.config.get("clients_per_round"),
        "open_round": None
        if open_round is None
        else {
            "round": open_round.round,
            "selected": len(open_round.selected),
            "answered": answers.get(open_round.round, (0, 0))[0],
            "opened_at": open_round.opened_at,
            "deadline": open_round.deadline,
        },
        "rounds": rows,
        "rejected_by_reason": reader.rejection_counts(run_id=run_id),
    }


def layers_data(reader: FleetReader, run_id: str) -> dict[str, Any] | None:
    """Density per pruned layer against round; None for an unknown run."""
    if reader.run(run_id) is None:
        return None
    layers = reader.layer_density(run_id)
    return {"layers": {name: [[r, d] for r, d in points] for name, points in layers.items()}}

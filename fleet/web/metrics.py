"""Prometheus metrics of the fleet, read from the store at scrape time.

``StoreCollector`` is a prometheus-client custom collector: each scrape reads the store once
(runs, their rounds, device rows, rejection counts) and turns what it read into metric families.
Nothing is counted in memory and the runner is not instrumented, so the figures are the store's
(exact after a crash, the same from any process) and a dashboard restarted mid-run loses
nothing. Rounds of runs that are not running come from ``FleetReader``'s cache and the device
figures from one aggregate query, so a scrape costs a few indexed queries, none of which decodes
a row per device (docs/benchmarks.md has the time).

Per-run series carry the label ``run``; only the ``max_runs`` most recently updated runs are
exported, which bounds the number of series a long-lived store produces. Units: seconds, bytes,
accuracy and density in [0, 1]. The metric names are listed in docs/dashboard.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from fleet.state.store import RoundRecord, RoundStatus, RunRecord, RunStatus
from fleet.web.reader import FleetReader
from fleet.web.run_view import ACCURACY, AGGREGATE_S, FEDERATED_ACCURACY, last_metric, metric

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS_S", "StoreCollector", "exposition", "make_registry"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of the round duration histogram's buckets; +Inf is added."""
DEFAULT_MAX_RUNS = 50


def duration_buckets(
    durations: Sequence[float], bounds: Sequence[float] = DURATION_BUCKETS_S
) -> list[tuple[str, float]]:
    """Cumulative histogram buckets ``[(le, count), ..., ("+Inf", total)]`` of ``durations``."""
    ordered = sorted(durations)
    out: list[tuple[str, float]] = []
    i = 0
    for bound in bounds:
        while i < len(ordered) and ordered[i] <= bound:
            i += 1
        out.append((repr(float(bound)), float(i)))
    out.append(("+Inf", float(len(ordered))))
    return out


class StoreCollector(Collector):
    """Collects the fleet's metrics from ``reader`` at every scrape."""

    def __init__(self, reader: FleetReader, *, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self.reader = reader
        self.max_runs = max_runs

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sparsefleet_store_present",
            "1 when the state directory has a fleet database, else 0.",
            value=0.0 if self.reader.store() is None else 1.0,
        )
        yield from self._devices()
        runs = sorted(self.reader.runs(), key=lambda r: r.updated_at)[-self.max_runs :]
        yield from self._runs(runs)

    def _devices(self) -> Iterator[Metric]:
        totals = self.reader.device_totals()  # one aggregate query, not 1,000 rows
        for name, doc, key in (
            ("sparsefleet_devices", "Devices known to the registry.", "devices"),
            ("sparsefleet_devices_online", "Devices online.", "online"),
            ("sparsefleet_devices_cordoned", "Devices cordoned.", "cordoned"),
            ("sparsefleet_devices_drained", "Devices drained.", "drained"),
        ):
            yield GaugeMetricFamily(name, doc, value=float(totals[key]))
        accepted = CounterMetricFamily(
            "sparsefleet_device_updates_accepted",
            "Updates stored from devices, every run (late ones included).",
            value=float(totals["updates_accepted"]),
        )
        yield accepted
        rejected = CounterMetricFamily(
            "sparsefleet_rejections",
            "Rejected device messages by reason, every run (and none).",
            labels=["reason"],
        )
        for reason, count in sorted(self.reader.rejection_counts().items()):
            rejected.add_metric([reason], float(count))
        yield rejected

    def _runs(self, runs: Sequence[RunRecord]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "sparsefleet_run_info",
            "1 per run; labels say its strategy, model and status.",
            labels=["run", "strategy", "model", "status"],
        )
        current = GaugeMetricFamily(
            "sparsefleet_run_current_round", "The last round opened.", labels=["run"]
        )
        completed = CounterMetricFamily(
            "sparsefleet_rounds_completed", "Rounds closed.", labels=["run"]
        )
        duration = HistogramMetricFamily(
            "sparsefleet_round_duration_seconds",
            "Closed rounds' time from opening to closing.",
            labels=["run"],
        )
        up = CounterMetricFamily(
            "sparsefleet_uploaded_bytes", "Payload bytes devices sent.", labels=["run"]
        )
        down = CounterMetricFamily(
            "sparsefleet_downloaded_bytes", "Payload bytes sent to devices.", labels=["run"]
        )
        accepted = CounterMetricFamily(
            "sparsefleet_updates_accepted",
            "Updates that arrived in time and were aggregated by closed rounds.",
            labels=["run"],
        )
        rejected = CounterMetricFamily(
            "sparsefleet_updates_rejected",
            "Rejected device messages of the run by reason.",
            labels=["run", "reason"],
        )
        gauges = {
            key: GaugeMetricFamily(name, doc, labels=["run"])
            for key, name, doc in (
                (ACCURACY, "sparsefleet_accuracy", "Server-side accuracy, newest evaluation."),
                (
                    FEDERATED_ACCURACY,
                    "sparsefleet_federated_accuracy",
                    "Federated (on-device) accuracy, newest evaluation.",
                ),
                ("density", "sparsefleet_density", "Kept fraction of the global model."),
                (AGGREGATE_S, "sparsefleet_aggregation_seconds", "Newest round's aggregation."),
            )
        }
        open_selected = GaugeMetricFamily(
            "sparsefleet_open_round_selected", "Devices selected in the open round.", labels=["run"]
        )
        open_answered = GaugeMetricFamily(
            "sparsefleet_open_round_answered", "Updates stored in the open round.", labels=["run"]
        )
        for run in runs:
            label = [run.run_id]
            rounds = self.reader.rounds(run)
            closed = [r for r in rounds if r.status is RoundStatus.CLOSED]
            info.add_metric([*label, run.strategy, run.model_name, str(run.status)], 1.0)
            current.add_metric(label, float(run.current_round))
            completed.add_metric(label, float(len(closed)))
            durations = [r.closed_at - r.opened_at for r in closed if r.closed_at is not None]
            duration.add_metric(label, duration_buckets(durations), sum(durations))
            up.add_metric(label, float(sum(r.bytes_up for r in rounds)))
            down.add_metric(label, float(sum(r.bytes_down for r in rounds)))
            received = sum(metric(r.metrics, "received") or 0.0 for r in closed)
            accepted.add_metric(label, received)
            for reason, count in sorted(self.reader.rejection_counts(run_id=run.run_id).items()):
                rejected.add_metric([*label, reason], float(count))
            for key, family in gauges.items():
                value = last_metric(rounds, key)
                if value is not None:
                    family.add_metric(label, value)
            self._open_round(run, rounds, open_selected, open_answered)
        yield from (info, current, completed, duration, up, down, accepted, rejected)
        yield from gauges.values()
        yield from (open_selected, open_answered)

    def _open_round(
        self,
        run: RunRecord,
        rounds: Sequence[RoundRecord],
        selected: GaugeMetricFamily,
        answered: GaugeMetricFamily,
    ) -> None:
        if run.status is not RunStatus.RUNNING:
            return
        open_round = next((r for r in rounds if r.status is RoundStatus.OPEN), None)
        if open_round is None:
            return
        selected.add_metric([run.run_id], float(len(open_round.selected)))
        answered.add_metric(
            [run.run_id], float(len(self.reader.updates(run.run_id, open_round.round)))
        )


def make_registry(reader: FleetReader, *, max_runs: int = DEFAULT_MAX_RUNS) -> CollectorRegistry:
    """A registry holding only the store collector (no process metrics of the web server)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(reader, max_runs=max_runs))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format (``CONTENT_TYPE``)."""
    return generate_latest(registry)

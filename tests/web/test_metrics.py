"""The Prometheus collector reports what the store holds, in the exposition format.

Operators alert on these numbers (a fleet going offline, rejections rising), so each must equal
the stored fact it names; and a scrape must not re-read what cannot have changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.state.store import Store
from fleet.web.metrics import DURATION_BUCKETS_S, duration_buckets, exposition, make_registry
from fleet.web.reader import FleetReader


def _samples(
    reader: FleetReader, **kwargs: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition(make_registry(reader, **kwargs)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]


def test_duration_buckets_are_cumulative_and_end_with_inf() -> None:
    buckets = duration_buckets([0.2, 1.0, 1.5, 7.0, 5000.0])
    assert buckets[0] == ("0.5", 1.0)
    assert dict(buckets)["1.0"] == 2.0  # le is inclusive
    assert dict(buckets)["2.0"] == 3.0
    assert dict(buckets)["10.0"] == 4.0
    assert buckets[-2] == (repr(DURATION_BUCKETS_S[-1]), 4.0)
    assert buckets[-1] == ("+Inf", 5.0)


def test_metrics_equal_the_stored_facts(filled: Path) -> None:
    reader = FleetReader(filled)
    samples = _samples(reader)
    v = lambda name, **labels: _value(samples, name, **labels)  # noqa: E731
    assert v("sparsefleet_store_present") == 1.0
    assert (v("sparsefleet_devices"), v("sparsefleet_devices_online")) == (12.0, 9.0)
    assert v("sparsefleet_rounds_completed_total", run="done") == 6.0
    assert v("sparsefleet_rounds_completed_total", run="live") == 2.0
    assert v("sparsefleet_run_current_round", run="live") == 3.0
    assert v("sparsefleet_uploaded_bytes_total", run="done") == 22_000.0
    assert v("sparsefleet_downloaded_bytes_total", run="done") == 24_000.0
    assert v("sparsefleet_updates_accepted_total", run="done") == 19.0  # in time, aggregated
    assert v("sparsefleet_updates_rejected_total", run="done", reason="non_finite") == 2.0
    assert v("sparsefleet_rejections_total", reason="non_finite") == 2.0
    assert v("sparsefleet_accuracy", run="done") == pytest.approx(0.56)
    assert v("sparsefleet_federated_accuracy", run="done") == pytest.approx(0.46)
    assert v("sparsefleet_aggregation_seconds", run="done") == pytest.approx(0.06)
    assert v("sparsefleet_open_round_selected", run="live") == 4.0
    assert v("sparsefleet_open_round_answered", run="live") == 4.0
    assert (
        v("sparsefleet_run_info", run="done", strategy="feddst", model="mlp", status="finished")
        == 1.0
    )


def test_round_duration_histogram_is_built_from_opened_and_closed_times(filled: Path) -> None:
    reader = FleetReader(filled)
    samples = _samples(reader)
    with Store(filled, create=False) as store:
        durations = [r.closed_at - r.opened_at for r in store.rounds("done") if r.closed_at]
    count = _value(samples, "sparsefleet_round_duration_seconds_count", run="done")
    total = _value(samples, "sparsefleet_round_duration_seconds_sum", run="done")
    under_2 = _value(samples, "sparsefleet_round_duration_seconds_bucket", run="done", le="2.0")
    assert count == 6.0 and total == pytest.approx(sum(durations))
    assert under_2 == sum(1 for d in durations if d <= 2.0)


def test_only_the_most_recently_updated_runs_are_exported(filled: Path) -> None:
    """Bounded series: a store with years of runs must not produce a series per run."""
    samples = _samples(FleetReader(filled), max_runs=1)
    runs = {dict(labels).get("run") for name, labels in samples if name == "sparsefleet_run_info"}
    assert runs == {"live"}


class CountingStore(Store):
    calls: dict[str, int]

    def rounds(self, run_id: str):  # type: ignore[no-untyped-def]
        self.calls[run_id] = self.calls.get(run_id, 0) + 1
        return super().rounds(run_id)


def test_a_finished_runs_rounds_are_read_once_a_running_runs_every_scrape(filled: Path) -> None:
    store = CountingStore(filled, create=False)
    store.calls = {}
    reader = FleetReader(filled, open_store=lambda _: store)
    registry = make_registry(reader)
    for _ in range(3):
        exposition(registry)
    assert store.calls == {"done": 1, "live": 3}
    store.close()


def test_no_store_yet_exports_zeroes_not_errors(tmp_path: Path) -> None:
    samples = _samples(FleetReader(tmp_path / "none"))
    assert _value(samples, "sparsefleet_store_present") == 0.0
    assert _value(samples, "sparsefleet_devices") == 0.0


def test_the_grafana_example_uses_only_exported_metrics(filled: Path) -> None:
    """A renamed metric must not leave the example dashboard with empty panels."""
    example = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
    dashboard = json.loads(example.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    used = {name for expr in exprs for name in re.findall(r"sparsefleet_[a-z_]+", expr)}
    exported = {name for name, _ in _samples(FleetReader(filled))}
    assert len(used) >= 10
    assert used <= exported, sorted(used - exported)

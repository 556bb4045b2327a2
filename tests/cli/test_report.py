"""Reports: the series read from the store, the figures' lines, valid PNGs, the markdown.

The store is filled by hand (rounds, updates, checkpoints with known masks), so every expected
number is known exactly rather than produced by the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from fleet.report import build_figures, load_series, markdown, write_report
from fleet.runtime.runner import RunSpec
from fleet.state.store import RunStatus, Store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _data(values: object) -> list[float]:
    """A line's x or y data as plain floats."""
    return [float(v) for v in np.asarray(values)]


def _masks(kept_a: int, kept_b: int) -> dict[str, np.ndarray]:
    """Two layers of 10 weights with the first ``kept_*`` kept."""
    return {
        "fc1.weight": np.arange(10) < kept_a,
        "fc2.weight": np.arange(10) < kept_b,
    }


def _make_run(
    store: Store,
    run_id: str,
    strategy: str,
    accuracies: list[float | None],
    upload: list[int],
    kept: list[tuple[int, int]] | None,
) -> None:
    """A finished run whose round r (1-based) has accuracy ``accuracies[r-1]`` (None: not
    evaluated), ``upload[r-1]`` bytes from one device, and masks ``kept[r]`` (``kept[0]`` is
    the initial model; None: dense)."""
    spec = RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy=strategy,
        rounds=len(accuracies),
        clients_per_round=1,
        strategy_options={"density": 0.5, "training": {"epochs": 3}} if kept else {},
    )
    store.create_run(run_id, config=spec.to_json(), strategy=strategy, model_name="mlp")
    store.set_run_status(run_id, RunStatus.RUNNING)
    weights = {"fc1.weight": np.zeros(10, np.float32), "fc2.weight": np.zeros(10, np.float32)}
    store.save_checkpoint(run_id, 0, weights, _masks(*kept[0]) if kept else {})
    for r, accuracy in enumerate(accuracies, start=1):
        store.open_round(run_id, r, selected=["d1"], deadline=2e9, model_version_in=r - 1)
        store.record_update(run_id, r, "d1", bytes(upload[r - 1]), 10)
        store.save_checkpoint(run_id, r, weights, _masks(*kept[r]) if kept else {}, round=r)
        density = sum(kept[r]) / 20 if kept else 1.0
        metrics = {"density": density, "received": 1, "wall_s": 0.5}
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        store.close_round(
            run_id, r, model_version_out=r, counted=[(r, "d1")], metrics=metrics, reason="k_of_n"
        )
    store.set_run_status(run_id, RunStatus.FINISHED)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state")
    _make_run(
        s,
        "sparse",
        "feddst",
        [0.5, None, 0.8],
        [1_000_000, 500_000, 500_000],
        [(5, 5), (4, 6), (3, 7), (2, 8)],
    )
    _make_run(s, "dense", "fedavg", [0.6, 0.7, 0.9], [4_000_000] * 3, None)
    return s


def test_series_reads_rounds_bytes_and_per_layer_density(store: Store) -> None:
    s = load_series(store, "sparse")
    assert s.rounds == (1, 2, 3)
    assert s.accuracy[0] == 0.5 and math.isnan(s.accuracy[1]) and s.accuracy[2] == 0.8
    assert s.upload_bytes == (1_000_000, 500_000, 500_000)
    assert s.cumulative_upload_mb == (1.0, 1.5, 2.0)
    assert s.final_accuracy == 0.8 and s.best_accuracy == 0.8
    # Round 0 is the initial model; densities are the masks' kept fractions.
    assert s.layer_density == {
        "fc1.weight": ((0, 0.5), (1, 0.4), (2, 0.3), (3, 0.2)),
        "fc2.weight": ((0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)),
    }
    assert load_series(store, "dense").layer_density == {}


def test_accuracy_figures_overlay_every_run_with_the_expected_series(store: Store) -> None:
    series = [load_series(store, "sparse"), load_series(store, "dense")]
    figures = build_figures(series)
    assert set(figures) == {
        "accuracy_vs_round.png",
        "accuracy_vs_upload.png",
        "density_sparse.png",  # the dense run has no masks, so no density figure
    }
    by_round = figures["accuracy_vs_round.png"].axes[0].get_lines()
    assert [line.get_label() for line in by_round] == ["sparse (feddst)", "dense (fedavg)"]
    # Unevaluated rounds are left out, accuracy is in percent.
    assert _data(by_round[0].get_xdata()) == [1, 3]
    assert _data(by_round[0].get_ydata()) == [50.0, 80.0]
    assert _data(by_round[1].get_ydata()) == pytest.approx([60.0, 70.0, 90.0])

    by_bytes = figures["accuracy_vs_upload.png"].axes[0].get_lines()
    assert _data(by_bytes[0].get_xdata()) == [1.0, 2.0]  # cumulative MB at rounds 1 and 3
    assert _data(by_bytes[1].get_xdata()) == [4.0, 8.0, 12.0]
    assert "uploaded MB" in figures["accuracy_vs_upload.png"].axes[0].get_xlabel()


def test_density_figure_has_one_line_per_layer_and_the_global_density(store: Store) -> None:
    fig = build_figures([load_series(store, "sparse")])["density_sparse.png"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"fc1.weight", "fc2.weight", "global"}
    assert _data(lines["fc1.weight"].get_ydata()) == [0.5, 0.4, 0.3, 0.2]
    assert _data(lines["global"].get_xdata()) == [1, 2, 3]
    assert _data(lines["global"].get_ydata()) == [0.5, 0.5, 0.5]


def test_write_report_writes_valid_pngs_and_the_markdown(store: Store, tmp_path: Path) -> None:
    files = write_report(store, ["sparse", "dense"], tmp_path / "out")
    assert [p.name for p in files.figures] == [
        "accuracy_vs_round.png",
        "accuracy_vs_upload.png",
        "density_sparse.png",
    ]
    for path in files.figures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        height, width = image.shape[:2]
        assert height > 200 and width > 300
        assert image.std() > 0  # not a blank canvas
    text = files.markdown.read_text()
    for path in files.figures:
        assert f"]({path.name})" in text
    assert "| options.density | 0.5 |" in text and "| training.epochs | 3 |" in text
    # Upload vs dense: 2 MB / 12 MB.
    sparse_row = next(line for line in text.splitlines() if line.startswith("| sparse |"))
    assert "| 0.167 |" in sparse_row and "| 80.0% |" in sparse_row
    assert "`dense` is dense (no masks)" in text


def test_markdown_of_a_run_without_rounds_says_so(tmp_path: Path) -> None:
    with Store(tmp_path / "s") as s:
        spec = RunSpec(
            run_id="new", model_name="mlp", strategy="fedavg", rounds=3, clients_per_round=1
        )
        s.create_run("new", config=spec.to_json(), strategy="fedavg", model_name="mlp")
        series = [load_series(s, "new")]
    text = markdown(series, list(build_figures(series)))
    assert "(no closed rounds)" in text and "n/a" in text


def test_report_of_an_unknown_run_writes_nothing(store: Store, tmp_path: Path) -> None:
    from device.errors import NotFoundError

    with pytest.raises(NotFoundError):
        write_report(store, ["sparse", "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()

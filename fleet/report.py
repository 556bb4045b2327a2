"""Run reports: PNG plots (matplotlib, Agg) and a markdown summary, read from the store.

What a report holds, for one run or several overlaid:

- ``accuracy_vs_round.png``: test accuracy of the global model after each evaluated round;
- ``accuracy_vs_upload.png``: the same accuracy against the cumulative bytes devices uploaded
  (MB = 10^6 bytes), which is where sparse training pays: the curve to the left wins;
- ``density_<run>.png`` per sparse run: each pruned layer's density (kept fraction) over rounds,
  computed from the masks of the run's stored checkpoints (the runner stores only the global
  density with each round), plus the global density;
- ``report.md``: the settings of each run, a results table and the figures.

Only ``matplotlib.figure.Figure`` is used (never ``pyplot``), so nothing depends on a display or a
global backend: PNGs are written by the Agg renderer. ``build_figures`` returns the figures so
tests can read their line data before anything is saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the report is written from servers and CI

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fleet.store import RoundStatus, Store

__all__ = [
    "ReportFiles",
    "RunSeries",
    "accuracy_figure",
    "accuracy_upload_figure",
    "build_figures",
    "layer_density_figure",
    "load_series",
    "markdown",
    "write_report",
]

MB = 1_000_000.0


@dataclass(frozen=True)
class RunSeries:
    """One run's closed rounds as parallel tuples (index i = ``rounds[i]``).

    ``accuracy`` is in [0, 1] and NaN for rounds that were not evaluated; bytes are per round
    (``up``: devices to the fleet manager). ``layer_density`` maps each pruned tensor to
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
        layer_density={k: tuple(v) for k, v in layer_density.items()},
    )


# -- figures ----------------------------------------------------------------------------------


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")


def accuracy_figure(series: Sequence[RunSeries]) -> Figure:
    """Test accuracy (%) against round, one line per run (labelled ``run (strategy)``)."""
    fig, ax = _figure()
    for s in series:
        idx = s.evaluated()
        ax.plot(
            [s.rounds[i] for i in idx],
            [100.0 * s.accuracy[i] for i in idx],
            marker="o",
            markersize=3,
            label=s.label,
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy by round")
    if any(s.evaluated() for s in series):
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no evaluated rounds yet")
    return fig


def accuracy_upload_figure(series: Sequence[RunSeries]) -> Figure:
    """Test accuracy (%) against cumulative uploaded MB (10^6 bytes), one line per run."""
    fig, ax = _figure()
    for s in series:
        idx = s.evaluated()
        cumulative = s.cumulative_upload_mb
        ax.plot(
            [cumulative[i] for i in idx],
            [100.0 * s.accuracy[i] for i in idx],
            marker="o",
            markersize=3,
            label=s.label,
        )
    ax.set_xlabel("cumulative uploaded MB (devices to fleet manager)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy by uploaded bytes")
    if any(s.evaluated() for s in series):
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no evaluated rounds yet")
    return fig


def layer_density_figure(series: RunSeries) -> Figure:
    """Each pruned layer's density (kept fraction, 0..1) over rounds, and the global density
    (dashed, labelled "global") of the closed rounds."""
    fig, ax = _figure()
    for name, points in series.layer_density.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    if series.rounds:
        ax.plot(series.rounds, series.density, "k--", linewidth=1.5, label="global")
    ax.set_xlabel("round (0 = initial model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("density (kept fraction)")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(f"Per-layer density: {series.label}")
    if series.layer_density or series.rounds:
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax, "no checkpoints yet")
    return fig


def build_figures(series: Sequence[RunSeries]) -> dict[str, Figure]:
    """File name -> figure for a report of ``series`` (density figures for sparse runs only)."""
    figures = {
        "accuracy_vs_round.png": accuracy_figure(series),
        "accuracy_vs_upload.png": accuracy_upload_figure(series),
    }
    for s in series:
        if s.layer_density:
            figures[f"density_{s.run_id}.png"] = layer_density_figure(s)
    return figures


# -- markdown ---------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}%"


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _settings_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in config.items():
        if key == "strategy_options" and isinstance(value, Mapping):
            for option, option_value in value.items():
                if option == "training" and isinstance(option_value, Mapping):
                    for t_key, t_value in option_value.items():
                        rows.append((f"training.{t_key}", str(t_value)))
                else:
                    rows.append((f"options.{option}", str(option_value)))
        else:
            rows.append((key, str(value)))
    return rows


def markdown(
    series: Sequence[RunSeries], figures: Sequence[str], *, generated_at: float | None = None
) -> str:
    """The report's markdown: results table, figures, then each run's settings and rounds."""
    when = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(time.time() if generated_at is None else generated_at)
    )
    baseline = next((s for s in series if s.strategy in ("fedavg", "fedavgm")), None)
    lines = [
        f"# SparseFleet report: {', '.join(s.run_id for s in series)}",
        "",
        f"Generated {when} by `fleet run report`. Accuracy is the global model's on the test "
        "split; bytes are payload bytes (MB = 10^6 bytes); density is the kept fraction of the "
        "pruned tensors.",
        "",
        "## Results",
        "",
        "| run | strategy | model | status | rounds | final accuracy | best accuracy "
        "| uploaded MB | downloaded MB | upload vs dense | final density | wall s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in series:
        ratio = (
            f"{s.total_upload_bytes / baseline.total_upload_bytes:.3f}"
            if baseline is not None and baseline.total_upload_bytes
            else "n/a"
        )
        lines.append(
            f"| {s.run_id} | {s.strategy} | {s.model_name} | {s.status} | {len(s.rounds)} "
            f"| {_pct(s.final_accuracy)} | {_pct(s.best_accuracy)} "
            f"| {s.total_upload_bytes / MB:.3f} | {s.total_download_bytes / MB:.3f} | {ratio} "
            f"| {_num(s.final_density)} | {s.total_wall_s:.1f} |"
        )
    if baseline is not None:
        lines += [
            "",
            f'"upload vs dense" is each run\'s uploaded bytes divided by those of '
            f"`{baseline.run_id}` ({baseline.strategy}, dense).",
        ]
    lines += ["", "## Figures", ""]
    for name in figures:
        lines += [f"![{name.removesuffix('.png')}]({name})", ""]
    for s in series:
        if not s.layer_density:
            lines += [f"`{s.run_id}` is dense (no masks): every layer's density is 1.0.", ""]
    for s in series:
        lines += [f"## Run `{s.run_id}`", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _settings_rows(s.config)]
        lines += [
            "",
            "| round | accuracy | loss | density | answered / selected | up KB | down KB "
            "| wall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, round_ in enumerate(s.rounds):
            lines.append(
                f"| {round_} | {_pct(s.accuracy[i])} | {_num(s.loss[i])} | {_num(s.density[i])} "
                f"| {s.received[i]} / {s.selected[i]} | {s.upload_bytes[i] / 1000:.1f} "
                f"| {s.download_bytes[i] / 1000:.1f} | {_num(s.wall_s[i], 2)} |"
            )
        if not s.rounds:
            lines.append("| (no closed rounds) | | | | | | | |")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class ReportFiles:
    """What ``write_report`` wrote: the markdown file and the PNGs, in order."""

    markdown: Path
    figures: tuple[Path, ...]


def write_report(store: Store, run_ids: Sequence[str], out_dir: str | Path) -> ReportFiles:
    """Write the PNGs and ``report.md`` for ``run_ids`` into ``out_dir`` (created if needed).

    ``NotFoundError`` names the first unknown run before anything is written.
    """
    if not run_ids:
        raise ValueError("a report needs at least one run id")
    series = [load_series(store, run_id) for run_id in run_ids]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = build_figures(series)
    paths = []
    for name, fig in figures.items():
        path = out / name
        fig.savefig(path, dpi=110)
        paths.append(path)
    report = out / "report.md"
    report.write_text(markdown(series, list(figures)), encoding="utf-8")
    return ReportFiles(markdown=report, figures=tuple(paths))

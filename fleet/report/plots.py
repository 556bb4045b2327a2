"""The report's figures (matplotlib ``Figure`` objects, Agg renderer, never ``pyplot``).

Nothing here depends on a display or a global backend; tests read the line data of the figures
``build_figures`` returns before anything is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the report is written from servers and CI

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fleet.report.series import RunSeries


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _accuracy_lines(ax: Any, series: Sequence[RunSeries], x_of: Any) -> bool:
    """Each run's test accuracy (%) (solid) and federated accuracy (dashed, the devices' own
    held-out data) at ``x_of(series, i)``; whether anything was drawn."""
    drawn = False
    for s in series:
        idx = s.evaluated()
        line = None
        if idx:
            (line,) = ax.plot(
                [x_of(s, i) for i in idx],
                [100.0 * s.accuracy[i] for i in idx],
                marker="o",
                markersize=3,
                label=s.label,
            )
        fed = s.federated_evaluated()
        if fed:
            ax.plot(
                [x_of(s, i) for i in fed],
                [100.0 * s.federated_accuracy[i] for i in fed],
                linestyle="--",
                marker="s",
                markersize=3,
                color=None if line is None else line.get_color(),
                label=f"{s.label}, federated",
            )
        drawn = drawn or bool(idx) or bool(fed)
    return drawn


def accuracy_figure(series: Sequence[RunSeries]) -> Figure:
    """Accuracy (%) against round, per run: on the fleet manager's test set (solid, labelled
    ``run (strategy)``) and federated, on the devices (dashed, ``run (strategy), federated``)."""
    fig, ax = _figure()
    drawn = _accuracy_lines(ax, series, lambda s, i: s.rounds[i])
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by round")
    if drawn:
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "no evaluated rounds yet")
    return fig


def accuracy_upload_figure(series: Sequence[RunSeries]) -> Figure:
    """Accuracy (%) against cumulative uploaded MB (10^6 bytes), per run: test set (solid)
    and federated (dashed), as in ``accuracy_figure``."""
    fig, ax = _figure()
    drawn = _accuracy_lines(ax, series, lambda s, i: s.cumulative_upload_mb[i])
    ax.set_xlabel("cumulative uploaded MB (devices to fleet manager)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by uploaded bytes")
    if drawn:
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

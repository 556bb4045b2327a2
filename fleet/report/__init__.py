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

from fleet.report.markdown import ReportFiles, markdown, write_report
from fleet.report.plots import (
    accuracy_figure,
    accuracy_upload_figure,
    build_figures,
    layer_density_figure,
)
from fleet.report.series import RunSeries, load_series

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

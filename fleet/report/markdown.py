"""The report's text: ``report.md`` with settings, a results table and the figures, and
``write_report``, which writes it beside the PNGs."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.report.device_density import device_density_lines
from fleet.report.plots import build_figures
from fleet.report.series import MB, RunSeries, load_series
from fleet.state.store import Store


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}%"


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _at(values: Sequence[float], i: int) -> float:
    """``values[i]``, NaN where a series does not have it (one built without that figure)."""
    return values[i] if i < len(values) else math.nan


def _federated(s: RunSeries, i: int) -> str:
    """Round ``i``'s federated accuracy with the devices and examples it combined."""
    accuracy = _at(s.federated_accuracy, i)
    if math.isnan(accuracy):
        return "n/a"
    devices, examples = _at(s.federated_devices, i), _at(s.federated_examples, i)
    return f"{_pct(accuracy)} ({devices:.0f} devices, {examples:.0f} ex.)"


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
        "split; federated accuracy is its accuracy on the devices' own held-out data (federated "
        "evaluation, weighted by each device's example count); bytes are payload bytes "
        "(MB = 10^6 bytes); density is the kept fraction of the pruned tensors.",
        "",
        "## Results",
        "",
        "| run | strategy | model | status | rounds | final accuracy | best accuracy "
        "| federated accuracy | uploaded MB | downloaded MB | upload vs dense | final density "
        "| wall s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {_pct(s.final_federated_accuracy)} "
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
            "| round | accuracy | loss | federated accuracy | federated loss | density "
            "| answered / selected | up KB | down KB | wall s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, round_ in enumerate(s.rounds):
            lines.append(
                f"| {round_} | {_pct(s.accuracy[i])} | {_num(s.loss[i])} "
                f"| {_federated(s, i)} | {_num(_at(s.federated_loss, i))} | {_num(s.density[i])} "
                f"| {s.received[i]} / {s.selected[i]} | {s.upload_bytes[i] / 1000:.1f} "
                f"| {s.download_bytes[i] / 1000:.1f} | {_num(s.wall_s[i], 2)} |"
            )
        if not s.rounds:
            lines.append("| (no closed rounds) | | | | | | | | | |")
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
    text = "\n".join([markdown(series, list(figures)), *device_density_lines(store, run_ids)])
    report.write_text(text, encoding="utf-8")
    return ReportFiles(markdown=report, figures=tuple(paths))

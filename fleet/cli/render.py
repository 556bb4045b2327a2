"""Everything the ``fleet`` command shows with rich: tables, live progress, summaries.

Functions here take plain records (store and registry dataclasses) and return rich renderables;
they read nothing and print nothing themselves, except ``RunProgress``, which is the live view
of a run and prints one line per closed round. Times are Unix seconds; ``now`` is passed in so
that a rendering is reproducible (the status table has a snapshot test). Sizes use decimal units
(1 kB = 1000 bytes, 1 MB = 10^6 bytes).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from device.wire.messages import JobEvent, JobState
from fleet.cli.render_models import model_lines, models_cell, models_detail
from fleet.ops.local_broker import BrokerState
from fleet.ops.registry import DeviceInfo
from fleet.report import RunSeries
from fleet.runtime.runner import RoundReport
from fleet.state.store import RejectionRecord, RoundRecord, RunRecord

__all__ = [
    "ComparisonRow",
    "RunProgress",
    "ago",
    "broker_status",
    "comparison_table",
    "device_panel",
    "devices_table",
    "fleet_view",
    "human_bytes",
    "make_console",
    "percent",
    "run_status",
    "runs_table",
    "setup_logging",
    "status_table",
    "watch",
]


def make_console(*, width: int | None = None, color: bool = True, stderr: bool = False) -> Console:
    """The console the CLI prints to (``color`` False: plain text, as in snapshots and pipes).

    Output that is not a terminal (a pipe, a file, a test) is laid out 120 columns wide unless
    ``$COLUMNS`` says otherwise: rich's default of 80 would truncate the wide tables.
    """
    stream = sys.stderr if stderr else sys.stdout
    if width is None and not os.environ.get("COLUMNS") and not stream.isatty():
        width = 120
    return Console(
        width=width,
        color_system="auto" if color else None,
        stderr=stderr,
        highlight=False,
        soft_wrap=False,
    )


def setup_logging(console: Console, verbosity: int) -> None:
    """Log warnings (0), info (1: ``-v``) or debug (2: ``-vv``) through ``console``, so log
    lines and live progress do not tear each other."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, RichHandler):
            root.removeHandler(handler)
    handler = RichHandler(console=console, show_path=verbosity >= 2, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


# -- small formats ----------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units)."""
    if math.isnan(n):
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def ago(then: float | None, now: float) -> str:
    """How long ago ``then`` was, coarsely: ``"12s ago"``, ``"5m ago"``, ``"3h ago"``,
    ``"2d ago"``; ``"never"`` for None."""
    if then is None:
        return "never"
    seconds = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def percent(value: float) -> str:
    """A fraction in [0, 1] as ``"84.2%"``; ``"n/a"`` for NaN."""
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}%"


def _state(info: DeviceInfo) -> Text:
    text = Text("online", style="green") if info.online else Text("offline", style="red")
    if info.drained:
        text.append("/drained", style="yellow")
    elif info.cordoned:
        text.append("/cordoned", style="yellow")
    return text


def _tags(tags: Mapping[str, str]) -> str:
    return ",".join(k if not v else f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def _table(title: str, columns: Sequence[tuple[str, str]]) -> Table:
    """A compact table: a rule under the header, one space between columns, no frame, so that
    wide tables still fit a terminal. ``columns`` are (name, "left" | "right")."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


# -- devices ----------------------------------------------------------------------------------


def status_table(devices: Sequence[DeviceInfo], jobs: Mapping[str, str], now: float) -> Table:
    """The live fleet (``fleet status``): one row per device, in the order given.

    ``jobs`` maps a device to its current job state ("training", "uploaded", ...); devices not
    in it show "idle". Counters are totals since the device was first seen.
    """
    table = _table(
        "Fleet",
        (
            ("device", "left"),
            ("state", "left"),
            ("seen", "right"),
            ("version", "left"),
            ("job", "left"),
            ("rounds", "right"),
            ("fails", "right"),
            ("rejects", "right"),
            ("up", "right"),
            ("down", "right"),
        ),
    )
    for d in devices:
        c = d.counters
        table.add_row(
            d.device_id,
            _state(d),
            ago(d.last_seen, now),
            d.agent_version or "-",
            jobs.get(d.device_id, "idle"),
            str(c.rounds_joined),
            str(c.failures),
            str(c.total_rejections),
            human_bytes(c.bytes_up),
            human_bytes(c.bytes_down),
        )
    online = sum(1 for d in devices if d.online)
    table.caption = f"{online} online, {len(devices) - online} offline"
    table.caption_justify = "left"
    return table


def fleet_view(
    devices: Sequence[DeviceInfo],
    jobs: Mapping[str, str],
    runs: Sequence[str],
    note: str,
    now: float,
) -> Group:
    """``fleet status``: one line per running run, the status table, the models the devices
    can build (``model_lines``), the last failure each device reported (why it refused or
    failed a job, e.g. a model it builds differently), and ``note`` (where the online/offline
    states came from)."""
    lines = [Text(line) for line in runs] or [Text("no run in progress")]
    failures = [
        Text(f"{d.device_id}: last failure: {d.last_failure}", style="yellow")
        for d in devices
        if d.counters.failures and d.last_failure
    ]
    return Group(
        *lines,
        status_table(devices, jobs, now),
        *model_lines(devices),
        *failures,
        Text(note, style="dim"),
    )


def watch(console: Console, view: Callable[[], RenderableType], interval_s: float) -> None:
    """Show ``view()`` and refresh it every ``interval_s`` seconds until Ctrl-C."""
    with Live(view(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(view(), refresh=True)
        except KeyboardInterrupt:
            return


def devices_table(devices: Sequence[DeviceInfo], now: float) -> Table:
    """The inventory (``fleet devices list``): state, schedulability, tags, dataset size."""
    table = _table(
        "Devices",
        (
            ("device", "left"),
            ("state", "left"),
            ("schedulable", "left"),
            ("tags", "left"),
            ("examples", "right"),
            ("models", "left"),
            ("version", "left"),
            ("seen", "right"),
        ),
    )
    for d in devices:
        table.add_row(
            d.device_id,
            _state(d),
            "yes" if d.schedulable else "no",
            _tags(d.tags),
            str(d.dataset_size),
            models_cell(d),
            d.agent_version or "-",
            ago(d.last_seen, now),
        )
    return table


def device_panel(info: DeviceInfo, rejections: Sequence[RejectionRecord], now: float) -> Panel:
    """One device in detail (``fleet devices show``)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    hw = info.hardware
    c = info.counters
    rows: list[tuple[str, Any]] = [
        ("state", _state(info)),
        ("schedulable", "yes" if info.schedulable else "no"),
        ("last seen", ago(info.last_seen, now)),
        ("agent version", info.agent_version or "-"),
        ("session epoch", str(info.session_epoch) if info.session_epoch is not None else "-"),
        ("tags", _tags(info.tags)),
        ("examples", str(info.dataset_size)),
        (
            "hardware",
            f"{hw.machine or '?'}, {hw.cpu_count} CPUs, {human_bytes(hw.memory_bytes)} RAM, "
            f"Python {hw.python_version or '?'}, torch {hw.torch_version or '?'}",
        ),
        ("profile", "measured" if info.profile is not None else "none"),
        ("models", models_detail(info)),
        ("rounds joined", str(c.rounds_joined)),
        ("updates accepted", str(c.updates_accepted)),
        ("failures", f"{c.failures}" + (f" (last: {info.last_failure})" if c.failures else "")),
        (
            "rejections",
            ", ".join(f"{k}: {v}" for k, v in sorted(c.rejections.items())) or "0",
        ),
        ("bytes up / down", f"{human_bytes(c.bytes_up)} / {human_bytes(c.bytes_down)}"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    parts: list[Any] = [grid]
    if rejections:
        recent = _table(
            "Recent rejections",
            (
                ("when", "right"),
                ("run", "left"),
                ("round", "right"),
                ("reason", "left"),
                ("detail", "left"),
            ),
        )
        for r in rejections:
            recent.add_row(
                ago(r.at, now), r.run_id or "-", str(r.round or "-"), r.reason, r.detail[:60]
            )
        parts.append(recent)
    return Panel(Group(*parts), title=info.device_id, title_align="left")


# -- runs -------------------------------------------------------------------------------------


def runs_table(runs: Sequence[RunRecord], series: Mapping[str, RunSeries]) -> Table:
    """``fleet run list``: one row per run with its progress and latest accuracy."""
    table = _table(
        "Runs",
        (
            ("run", "left"),
            ("status", "left"),
            ("strategy", "left"),
            ("model", "left"),
            ("round", "right"),
            ("accuracy", "right"),
            ("uploaded", "right"),
            ("density", "right"),
        ),
    )
    for run in runs:
        s = series.get(run.run_id)
        total = run.config.get("rounds", "?")
        table.add_row(
            run.run_id,
            str(run.status),
            run.strategy,
            run.model_name,
            f"{len(s.rounds) if s else 0}/{total}",
            percent(s.final_accuracy) if s else "n/a",
            human_bytes(s.total_upload_bytes) if s else "n/a",
            f"{s.final_density:.3f}" if s and not math.isnan(s.final_density) else "n/a",
        )
    return table


def run_status(
    run: RunRecord,
    series: RunSeries,
    open_round: RoundRecord | None,
    answered: int,
    *,
    last: int = 10,
) -> Group:
    """``fleet run status``: the run, its open round, and its last ``last`` closed rounds."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    total = run.config.get("rounds", "?")
    head.add_row("run", run.run_id)
    head.add_row("status", str(run.status) + (f" ({run.error})" if run.error else ""))
    head.add_row("strategy / model", f"{run.strategy} / {run.model_name}")
    head.add_row("rounds closed", f"{len(series.rounds)}/{total}")
    if open_round is not None:
        head.add_row(
            "open round",
            f"{open_round.round}: {answered}/{len(open_round.selected)} answered",
        )
    head.add_row(
        "accuracy", f"{percent(series.final_accuracy)} (best {percent(series.best_accuracy)})"
    )
    federated = series.federated_evaluated()
    if federated:
        last = federated[-1]
        head.add_row(
            "federated accuracy",
            f"{percent(series.federated_accuracy[last])} (round {series.rounds[last]}: "
            f"{series.federated_devices[last]:.0f} devices, "
            f"{series.federated_examples[last]:.0f} examples)",
        )
    head.add_row(
        "bytes up / down",
        f"{human_bytes(series.total_upload_bytes)} / {human_bytes(series.total_download_bytes)}",
    )
    names = ("round", "accuracy") + (("federated",) if federated else ())
    rounds = _table(
        f"Last {last} rounds",
        [(name, "right") for name in (*names, "density", "answered", "up", "down")]
        + [("wall s", "right")],
    )
    start = max(0, len(series.rounds) - last)
    for i in range(start, len(series.rounds)):
        rounds.add_row(
            str(series.rounds[i]),
            percent(series.accuracy[i]),
            *((percent(series.federated_accuracy[i]),) if federated else ()),
            f"{series.density[i]:.3f}",
            f"{series.received[i]}/{series.selected[i]}",
            human_bytes(series.upload_bytes[i]),
            human_bytes(series.download_bytes[i]),
            f"{series.wall_s[i]:.2f}",
        )
    return Group(head, rounds) if series.rounds else Group(head)


@dataclass(frozen=True)
class ComparisonRow:
    """One run in the demo's summary; ``ratio`` is its uploaded bytes over the dense baseline's
    (None for the baseline itself)."""

    label: str
    series: RunSeries
    ratio: float | None


def comparison_table(rows: Sequence[ComparisonRow]) -> Table:
    """The demo's summary: accuracy and bytes of each run, and the upload ratio vs dense (fits
    80 columns)."""
    table = _table(
        "Summary",
        (
            ("run", "left"),
            ("rounds", "right"),
            ("accuracy", "right"),
            ("uploaded", "right"),
            ("vs FedAvg", "right"),
            ("downloaded", "right"),
            ("density", "right"),
            ("time", "right"),
        ),
    )
    for row in rows:
        s = row.series
        table.add_row(
            row.label,
            str(len(s.rounds)),
            percent(s.final_accuracy),
            human_bytes(s.total_upload_bytes),
            "baseline" if row.ratio is None else f"{row.ratio:.3f}",
            human_bytes(s.total_download_bytes),
            f"{s.final_density:.3f}",
            f"{s.total_wall_s:.0f} s",
        )
    table.caption = "accuracy: after the last round, on the test split; time: sum of round times"
    table.caption_justify = "left"
    return table


def broker_status(state: BrokerState | None, running: bool) -> Text:
    """One line about the local broker."""
    if state is None:
        return Text("local broker: not running (start one with `fleet broker start`)")
    if not running:
        return Text(f"local broker: not running (the one recorded at {state.url} is gone)")
    how = f"pid {state.pid}" if state.mode == "binary" else f"docker compose {state.compose_file}"
    return Text.assemble(("local broker: running", "green"), f" at {state.url} ({how})")


# -- live progress ----------------------------------------------------------------------------


class RunProgress:
    """Live view of a run: a round bar with the current round's answers, the latest accuracy,
    cumulative bytes and density; one printed line per closed round.

    Use as a context manager and pass the instance as the runner's ``on_progress``. Thread-safe:
    the runner calls it from its own thread. ``done`` rounds were closed before (resume).
    """

    def __init__(self, console: Console, title: str, rounds: int, *, done: int = 0) -> None:
        self.console = console
        self.rounds = rounds
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(title, total=rounds, completed=done, info="")
        self._up = 0
        self._down = 0
        self._accuracy = math.nan
        self._federated = math.nan
        self._density = math.nan
        self._answered = (0, 0)
        self._round = done + 1
        self.reports: list[RoundReport] = []

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def _info(self) -> str:
        received, selected = self._answered
        return (
            f"round {self._round}: {received}/{selected} answered · "
            f"acc {percent(self._accuracy)} · "
            + (f"fed {percent(self._federated)} · " if not math.isnan(self._federated) else "")
            + f"up {human_bytes(self._up)} · down {human_bytes(self._down)} · "
            f"density {self._density:.3f}"
        )

    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        with self._lock:
            if event == "update":
                self._round = int(data["round"])
                self._answered = (int(data["received"]), int(data["selected"]))
            elif event == "round_closed":
                self._closed(data["report"])
            elif event == "initial_job":
                self._progress.console.print(
                    f"initial pruning on {data['device_id']}: density {float(data['density']):.3f}"
                )
            elif event == "event":
                job = data["event"]
                if isinstance(job, JobEvent) and job.state in (JobState.FAILED, JobState.REJECTED):
                    self._progress.console.print(
                        f"[yellow]{data['device_id']} {job.state.value} round {data['round']}: "
                        f"{job.reason}[/yellow]"
                    )
            self._progress.update(self._task, info=self._info())

    def _closed(self, report: RoundReport) -> None:
        self.reports.append(report)
        self._up += report.upload_bytes
        self._down += report.download_bytes
        self._density = report.density
        self._answered = (len(report.received), len(report.selected))
        accuracy = report.metrics.get("accuracy")
        if accuracy is not None:
            self._accuracy = float(accuracy)
        federated = report.metrics.get("federated_accuracy")
        if federated is not None:
            self._federated = float(federated)
        self._progress.advance(self._task)
        self._progress.console.print(
            f"round {report.round}/{self.rounds}  {len(report.received)}/{len(report.selected)} "
            f"answered  acc {percent(float(accuracy)) if accuracy is not None else '  n/a'}  "
            + (
                f"fed {percent(float(federated))} "
                f"({report.metrics.get('federated_devices', 0):.0f} dev)  "
                if federated is not None
                else ""
            )
            + f"up {human_bytes(report.upload_bytes)}  down {human_bytes(report.download_bytes)}  "
            f"density {report.density:.3f}  {report.wall_s:.1f} s  ({report.closed_by})"
        )
        self._progress.console.file.flush()  # a pipe or a log file sees each round at once
        self._round = min(report.round + 1, self.rounds)

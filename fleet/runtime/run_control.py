"""Control files of runs started by the ``fleet`` command, under ``<state-dir>/runs/``.

The store holds what a run *is* (its RunSpec, rounds, updates); these files hold how a ``fleet``
process runs it, so that another ``fleet`` process can act on it:

- ``{run}.launch.json``: how it was launched (against a broker, or as a simulation, with the
  data, simulation and broker settings), so ``fleet run resume`` can start it the same way;
- ``{run}.pid``: the process running it now (removed when that process ends);
- ``{run}.stop``: a stop request (``fleet run stop``). The running process watches for it
  (``StopWatcher``), stops after the round in progress, and removes it.

A stop file is the whole protocol: it works across processes and users of one state directory
without a socket, and a request made while nothing runs the run is simply honoured at the next
start.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunFiles", "StopRequested", "StopWatcher", "pid_alive"]


class StopRequested(Exception):
    """Raised from a simulation's progress callback after the round in which a stop was asked
    for closed; the command catches it and records the run as stopped."""


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunFiles:
    """The control files of one run in ``state_dir/runs``."""

    state_dir: Path
    run_id: str

    @property
    def directory(self) -> Path:
        return self.state_dir / "runs"

    @property
    def launch(self) -> Path:
        return self.directory / f"{self.run_id}.launch.json"

    @property
    def pidfile(self) -> Path:
        return self.directory / f"{self.run_id}.pid"

    @property
    def stop(self) -> Path:
        return self.directory / f"{self.run_id}.stop"

    def write_launch(self, record: Mapping[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.launch.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.launch)

    def read_launch(self) -> dict[str, Any] | None:
        """The launch record, or None if this run was not launched by ``fleet``."""
        try:
            data = json.loads(self.launch.read_text())
        except FileNotFoundError:
            return None
        return data if isinstance(data, dict) else None

    def running_pid(self) -> int | None:
        """The pid of the live process running this run, or None (a stale pidfile is ignored)."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @contextlib.contextmanager
    def running(self) -> Any:
        """Mark this process as the one running the run, for the ``with`` block."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(f"{os.getpid()}\n")
        try:
            yield
        finally:
            self.pidfile.unlink(missing_ok=True)

    def request_stop(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stop.touch()

    def clear_stop(self) -> None:
        self.stop.unlink(missing_ok=True)


class StopWatcher:
    """Polls for the run's stop file every ``interval_s`` seconds (and once at start) and calls
    ``on_stop`` once when it appears. ``requested`` tells whether it did."""

    def __init__(
        self, files: RunFiles, on_stop: Callable[[], None], *, interval_s: float = 0.5
    ) -> None:
        self.files = files
        self.on_stop = on_stop
        self.interval_s = interval_s
        self.requested = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)

    def _watch(self) -> None:
        while True:
            if self.files.stop.exists():
                self.requested = True
                self.on_stop()
                return
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> StopWatcher:
        if self.files.stop.exists():  # asked before the run started: decided now, not racily
            self.requested = True
            self.on_stop()
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.requested:
            self.files.clear_stop()

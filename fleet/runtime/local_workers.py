"""Aggregator worker processes on this machine: start them (``python -m fleet.runtime.aggregator
run``), keep them alive under stable ids, stop and reap them.

A worker's id is its MQTT client id (``local_worker_id``): a worker restarted under the same id
takes up the persistent session, and the unacknowledged updates, of the one it replaces.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from device.errors import SparseFleetError
from fleet.runtime.broker_login import BrokerLogin
from fleet.runtime.worker import DEFAULT_GROUP

log = logging.getLogger(__name__)


def local_worker_id(run_id: str, index: int) -> str:
    """The id (MQTT client id) of local worker ``index`` of ``run_id``: stable, so a restarted
    worker resumes the session, and the updates, of the one it replaces."""
    return f"{run_id}-agg-{index}"


def start_workers(
    count: int,
    broker_url: str,
    state_dir: Path | str,
    run_id: str,
    *,
    prefix: str = "fl/v1",
    group: str = DEFAULT_GROUP,
    first: int = 0,
    login: BrokerLogin | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes (ids ``local_worker_id(run_id, i)``); the caller stops them
    with ``stop_workers`` (SIGTERM: finish the message at hand, close the session cleanly)."""
    if count < 1:
        raise ValueError(f"need at least one worker, got {count}")
    procs = []
    for i in range(first, first + count):
        argv = [sys.executable, "-m", "fleet.runtime.aggregator", "run", "--broker", broker_url]
        argv += [
            "--state",
            str(state_dir),
            "--run",
            run_id,
            "--worker-id",
            local_worker_id(run_id, i),
        ]
        argv += ["--prefix", prefix, "--group", group]
        argv += (login or BrokerLogin()).argv()
        procs.append(subprocess.Popen(argv))
    return procs


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """Stop worker processes and reap them: SIGTERM, wait up to ``timeout_s`` in all, then
    SIGKILL whatever still runs. Never leaves a child behind (nor a zombie)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("aggregator worker pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()


class LocalWorkers:
    """``count`` local worker processes of one run, kept alive: ``respawn_dead`` restarts a
    worker that died under the same id, so its persistent session (and the unacknowledged
    updates the broker keeps for it) is taken up again. A context manager: leaving it stops
    and reaps every process, on errors and Ctrl-C too."""

    def __init__(
        self,
        count: int,
        broker_url: str,
        state_dir: Path | str,
        run_id: str,
        *,
        prefix: str = "fl/v1",
        group: str = DEFAULT_GROUP,
        login: BrokerLogin | None = None,
        max_restarts: int = 20,
    ) -> None:
        if count < 1:
            raise ValueError(f"need at least one worker, got {count}")
        self.max_restarts = max_restarts
        self.count = count
        self.broker_url = broker_url
        self.state_dir = Path(state_dir)
        self.run_id = run_id
        self.prefix = prefix
        self.group = group
        self.login = login
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    @property
    def ids(self) -> list[str]:
        return [local_worker_id(self.run_id, i) for i in range(self.count)]

    def _start(self, index: int) -> None:
        (proc,) = start_workers(
            1,
            self.broker_url,
            self.state_dir,
            self.run_id,
            prefix=self.prefix,
            group=self.group,
            first=index,
            login=self.login,
        )
        self.procs[index] = proc

    def start(self) -> LocalWorkers:
        for index in range(self.count):
            if index not in self.procs:
                self._start(index)
        return self

    def respawn_dead(self) -> list[str]:
        """Restart every worker whose process has exited; returns their ids.

        Raises ``SparseFleetError`` once more than ``max_restarts`` restarts were needed (a
        worker that cannot start, e.g. refused by the broker, would otherwise loop forever).
        """
        restarted = []
        for index, proc in sorted(self.procs.items()):
            code = proc.poll()
            if code is not None:
                if self.restarts >= self.max_restarts:
                    raise SparseFleetError(
                        f"aggregator worker {local_worker_id(self.run_id, index)} exited with "
                        f"status {code} after {self.restarts} restarts of this run's workers; "
                        "see their log"
                    )
                log.warning(
                    "aggregator worker %s exited (%d); restarting it",
                    local_worker_id(self.run_id, index),
                    code,
                )
                self._start(index)
                self.restarts += 1
                restarted.append(local_worker_id(self.run_id, index))
        return restarted

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_workers(list(self.procs.values()), timeout_s)

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Sharded aggregation: aggregator workers on a shared subscription and the coordinator's handover.

This module is the worker processes' entry point (``python -m fleet.runtime.aggregator run ...``,
``run_worker``, ``main``) and names the parts of sharded aggregation, each in its own module:
``worker`` (``AggregatorWorker``: decode, validate, store, acknowledge and sum the updates the
broker hands it, chunked ones reassembled through the store), ``coordinator`` (``Coordinator``:
the handover of partial sums at a round's close, recovering from the store what a dead worker
held), ``round_context`` (``RoundContext``: the open round as validation needs it),
``broker_login`` (``BrokerLogin``) and ``local_workers`` (worker processes on this machine).

Exact integer partial sums make the new model independent of how updates were spread: K = 1
and K = 3 workers, or the coordinator alone, give the same bits (``aggregate_exact``).
Acknowledged updates are always in the store, so a worker killed at any moment loses nothing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device.errors import SparseFleetError
from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics
from fleet.runtime.broker_login import BrokerLogin
from fleet.runtime.coordinator import Coordinator, Handover
from fleet.runtime.local_workers import LocalWorkers, local_worker_id, start_workers, stop_workers
from fleet.runtime.round_context import RoundContext
from fleet.runtime.worker import DEFAULT_GROUP, PARTIALS_DIR, AggregatorWorker
from fleet.state.store import Store

__all__ = [
    "DEFAULT_GROUP",
    "PARTIALS_DIR",
    "AggregatorWorker",
    "BrokerLogin",
    "Coordinator",
    "Handover",
    "LocalWorkers",
    "RoundContext",
    "local_worker_id",
    "main",
    "run_worker",
    "start_workers",
    "stop_workers",
]

log = logging.getLogger(__name__)


def run_worker(
    broker_url: str,
    state_dir: Path | str,
    run_id: str,
    worker_id: str,
    *,
    prefix: str = "fl/v1",
    group: str = DEFAULT_GROUP,
    login: BrokerLogin | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run one worker until ``stop`` is set, or SIGTERM/SIGINT when called from the main thread.

    Raises ``NotFoundError`` when ``state_dir`` holds no store, ``BrokerUnavailableError`` when
    the broker cannot be reached, ``ConfigError`` for an unreadable password file.
    """
    login = login or BrokerLogin()
    stop = stop or threading.Event()
    password = login.password()
    store = Store(state_dir, create=False)
    previous: dict[int, Any] = {}
    try:
        transport = MqttTransport.from_url(
            broker_url,
            worker_id,
            manual_ack=True,
            username=login.username,
            password=password,
            tls=login.tls(broker_url),
            reassembly=AggregatorWorker.RECEIVE_LIMITS,
        )
        worker = AggregatorWorker(
            transport, store, run_id, worker_id, topics=Topics(prefix), group=group
        )
        try:
            worker.connect()
            if threading.current_thread() is threading.main_thread():
                # Stop between messages, never inside one (a half-stored update); the previous
                # handlers come back afterwards (the caller may be a CLI or a test process).
                for sig in (signal.SIGTERM, signal.SIGINT):
                    previous[sig] = signal.signal(sig, lambda *_: stop.set())
            log.info("aggregator worker %s running for run %s", worker_id, run_id)
            worker.run(stop)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            transport.close()
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m fleet.runtime.aggregator``."""
    parser = argparse.ArgumentParser(prog="fleet aggregator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one aggregator worker")
    run.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    run.add_argument("--state", required=True, type=Path, help="the fleet manager's state dir")
    run.add_argument("--run", required=True, dest="run_id", help="run id")
    run.add_argument("--worker-id", required=True, help="MQTT client id (stable across restarts)")
    run.add_argument("--prefix", default="fl/v1", help="topic prefix")
    run.add_argument("--group", default=DEFAULT_GROUP, help="shared-subscription group")
    run.add_argument("--username", help="broker account")
    run.add_argument("--password-file", type=Path, help="file whose first line is the password")
    run.add_argument("--ca-file", type=Path, help="CA certificate that verifies the broker")
    run.add_argument("--cert-file", type=Path, help="client certificate")
    run.add_argument("--key-file", type=Path, help="client certificate's key")
    run.add_argument("--insecure", action="store_true", help="skip the TLS host-name check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.runtime.aggregator run``: one worker until SIGTERM/SIGINT. Returns the
    exit status (``fleet aggregator run`` is the same through the CLI)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    login = BrokerLogin(
        args.username,
        args.password_file,
        args.ca_file,
        args.cert_file,
        args.key_file,
        args.insecure,
    )
    try:
        run_worker(
            args.broker,
            args.state,
            args.run_id,
            args.worker_id,
            prefix=args.prefix,
            group=args.group,
            login=login,
        )
    except SparseFleetError as exc:
        print(f"fleet aggregator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

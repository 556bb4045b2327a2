"""The fleet manager's broker connections: its own MQTT client and, with ``--workers K``, the
coordinator's client plus K local aggregator worker processes (docs/scaling.md)."""

from __future__ import annotations

import contextlib

from device.errors import SparseFleetError
from device.wire.mqtt import MqttTransport, TlsSettings, parse_broker_url
from device.wire.topics import Topics
from fleet.cli.context import Env
from fleet.cli.runfile import BrokerConfig
from fleet.runtime.aggregator import BrokerLogin, Coordinator, LocalWorkers
from fleet.runtime.runner import RunSpec

WORKER_START_S = 120.0  # worker processes import numpy and torch: seconds each on a busy host


def mqtt_transport(broker: BrokerConfig, url: str, role: str = "") -> MqttTransport:
    """The fleet manager's connection; ``role`` makes a second client id ("coordinator")."""
    address = parse_broker_url(url)
    tls: TlsSettings | None = broker.tls.settings() if broker.tls is not None else None
    if address.tls and tls is None:
        tls = TlsSettings()
    client_id = broker.username or "fleet-manager"
    if role:
        client_id = f"{client_id}-{role}"
    return MqttTransport(
        client_id,
        host=address.host,
        port=address.port,
        username=broker.username,
        password=broker.password(),
        tls=tls,
        manual_ack=True,
    )


def _login(broker: BrokerConfig) -> BrokerLogin:
    """The fleet manager's broker account and TLS files, for its aggregator workers."""
    tls = broker.tls
    return BrokerLogin(
        username=broker.username,
        password_file=broker.password_file,
        ca_file=None if tls is None else tls.ca_file,
        cert_file=None if tls is None else tls.cert_file,
        key_file=None if tls is None else tls.key_file,
        insecure=False if tls is None else tls.insecure,
    )


def start_sharding(
    stack: contextlib.ExitStack,
    env: Env,
    spec: RunSpec,
    broker: BrokerConfig,
    url: str,
    workers: int,
) -> tuple[Coordinator, LocalWorkers]:
    """Connect the coordinator, start ``workers`` local worker processes and wait until each
    has joined the shared subscription. ``stack`` stops and reaps them (and closes the
    coordinator's connection) however the run ends, Ctrl-C included."""
    transport = mqtt_transport(broker, url, role="coordinator")
    stack.callback(transport.close)
    coordinator = Coordinator(transport, env.store(), spec.run_id, topics=Topics(broker.prefix))
    stack.callback(coordinator.store.close)
    coordinator.connect()  # before the workers start: their hello must not be missed
    pool = LocalWorkers(
        workers,
        url,
        env.state_dir.resolve(),
        spec.run_id,
        prefix=broker.prefix,
        login=_login(broker),
    )
    stack.callback(pool.stop)
    pool.start()
    try:
        coordinator.wait_for_workers(pool.ids, timeout_s=WORKER_START_S)
    except TimeoutError as exc:
        exited = {f"pid {p.pid}": p.returncode for p in pool.procs.values() if p.poll() is not None}
        # Not BrokerUnavailableError: the broker answered the coordinator; the workers did not.
        raise SparseFleetError(
            f"{exc} within {WORKER_START_S:.0f} s at {url}"
            + (f"; exited: {exited} (their log is above)" if exited else "")
        ) from None
    env.console.print(f"{workers} aggregator worker(s) running: {', '.join(pool.ids)}")
    return coordinator, pool

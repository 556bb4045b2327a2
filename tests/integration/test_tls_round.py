"""Federated rounds over the production broker configuration: TLS and per-device identities.

The broker runs the shipped ``broker/mosquitto.prod.conf`` (``secure_broker``): devices connect to
the TLS listeners, two with their own client certificates (CN = device id) and one with its own
password, all under the SparseFleet ACL; the fleet manager uses its account on the loopback
listener, as in production. The real ``Runner`` and ``DeviceAgent``s complete the rounds, and the
result is bit-identical to the same run over the in-memory broker: TLS, certificates and the ACL
change who may talk, not what is said.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics
from fleet.runtime.runner import Runner, RunSpec
from fleet.sim import simulate
from fleet.sim.core import PartitionedData, SimSpec, device_ids, partition_lookup, start_agents
from fleet.state.store import Store
from tests.integration.security_fixtures import (
    SecureBroker,
    SecureClients,
    secure_broker_fixture,  # noqa: F401 (fixture "secure_broker")
    secure_mqtt_fixture,  # noqa: F401 (fixture "secure_mqtt")
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEVICES = 3
SIM = SimSpec(devices=DEVICES, dataset="digits")
PASSWORD_DEVICE = device_ids(DEVICES)[-1]  # the others use client certificates
SPEC = RunSpec(
    run_id="tls",
    model_name="mlp",
    strategy="feddst",
    rounds=2,
    clients_per_round=DEVICES,
    strategy_options={
        "clients_per_round": DEVICES,
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "total_rounds": 2,
        "readjust_every": 1,
    },
    round_timeout_s=60.0,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_rounds_complete_over_tls_with_per_device_identities(
    secure_broker: SecureBroker, secure_mqtt: SecureClients, tmp_path: Path
) -> None:
    """Every device's update arrives in every round, the model equals the in-memory run's bit
    for bit, and the broker saw each device under the identity its certificate (or password)
    gives it, on a TLS listener."""

    def transport(device_id: str) -> MqttTransport:
        auth = "password" if device_id == PASSWORD_DEVICE else "cert"
        return secure_mqtt.device(device_id, auth=auth, connect=False)

    agents = start_agents(transport, SIM, PartitionedData(SIM), Topics(), {}, range(DEVICES))
    fleet = secure_mqtt.fleet(connect=False, manual_ack=True)
    try:
        with Store(tmp_path / "tls") as store:
            runner = Runner(SPEC, fleet, store, partition_for=partition_lookup(DEVICES))
            runner.connect()
            assert runner.wait_for_devices(DEVICES, timeout_s=30.0) == DEVICES
            reports = runner.run()
            tls_model = store.load_checkpoint(SPEC.run_id).weights
    finally:
        for agent in agents:
            agent.stop(timeout_s=5.0)

    assert [r.received for r in reports] == [tuple(device_ids(DEVICES))] * SPEC.rounds
    assert all(r.rejected == 0 and r.closed_by == "k_of_n" for r in reports)
    for agent in agents:
        assert isinstance(agent.transport, MqttTransport)
        expected = secure_broker.password_port if agent.device_id == PASSWORD_DEVICE else None
        assert agent.transport.port == (expected or secure_broker.cert_port)

    simulate(SPEC, SIM, tmp_path / "memory", evaluate_on_test=False)
    with Store(tmp_path / "memory", create=False) as store:
        memory_model = store.load_checkpoint(SPEC.run_id).weights
    assert all(np.array_equal(tls_model[n], memory_model[n]) for n in memory_model)

    # mosquitto logs "New client connected from ... as <client id> (..., u'<username>')": the
    # certificate's CN (or the password's account) became both client id and username.
    log = secure_broker.process.log_text()
    for device_id in device_ids(DEVICES):
        assert re.search(rf"New client connected from \S+ as {device_id} \(.*u'{device_id}'\)", log)

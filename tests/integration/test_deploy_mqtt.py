"""Deployment end to end over a real mosquitto, through the ``fleet model`` commands: a canary
rollout to device agents, a device that connects only afterwards, a deployment interrupted by a
broker restart, remote inference, status from the retained statuses, and a rollback.

The broker's packet limit is small (4 KiB), so every artefact travels in chunks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from device.agent import AgentOptions, DeviceAgent
from device.deploy import DeployOptions
from device.wire import envelope
from device.wire.broker import MosquittoBroker
from device.wire.messages import Envelope, InferenceReply, InferenceRequest
from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics
from fleet.cli import cli
from fleet.deploy.signing import load_key
from tests.deploy.helpers import RUN, digits_sample, store_with_run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

T = Topics()


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Site:
    """A state directory with a run, a persistent mosquitto and device agents."""

    def __init__(self, tmp: Path, broker: MosquittoBroker) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.broker = broker
        self.agents: dict[str, DeviceAgent] = {}
        store_with_run(self.state, versions=3).close()

    def fleet(self, *args: str | Path) -> Result:
        return CliRunner().invoke(
            cli, ["--state-dir", str(self.state), "--broker", self.broker.url, *map(str, args)]
        )

    def device(self, device_id: str, **deploy: object) -> DeviceAgent:
        key = load_key(self.state / "pki")
        from device.trust import TrustedKeys

        options = DeployOptions(
            models_dir=self.tmp / "devices" / device_id,
            trusted=TrustedKeys([key.public_raw]),
            download_timeout_s=3.0,
            retries=5,
            status_interval_s=0.5,
            local_data=lambda: digits_sample(),
            **deploy,  # type: ignore[arg-type]
        )
        transport = MqttTransport(
            device_id,
            host=self.broker.host,
            port=self.broker.port,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        )
        agent = DeviceAgent(
            transport,
            lambda partition: None,  # type: ignore[arg-type,return-value]
            AgentOptions(device_id=device_id, deploy=options),
        )
        agent.start()
        self.agents[device_id] = agent
        return agent

    def serving(self, device_id: str) -> str:
        deployed = self.agents[device_id].deployer.deployed()  # type: ignore[union-attr]
        return deployed.version if deployed is not None else ""

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop(timeout_s=5)


@pytest.fixture
def site(tmp_path: Path, mosquitto_factory) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    broker = mosquitto_factory(
        persistence=True, state_dir=tmp_path / "broker", max_packet_size=4096
    )
    site = Site(tmp_path, broker)
    yield site
    site.stop()


def _export(site: Site, round_: int) -> Path:
    out = site.tmp / f"r{round_}.sfm"
    result = site.fleet("model", "export", RUN, "--round", round_, "--dataset", "digits", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_deploy_canary_late_device_restart_inference_status_rollback(site: Site) -> None:
    first = _export(site, 1)  # makes the deployment key the devices trust
    for device_id in ("pi-a", "pi-b", "pi-c"):
        site.device(device_id, remote_inference=(device_id == "pi-a"))
    wait_for(lambda: site.fleet("status", "--json").exit_code == 0, what="registry")
    site.fleet("status")  # applies the retained births: the devices are known

    deployed = site.fleet("model", "deploy", first, "--to", "all", "--canary", "34%", "--json")
    assert deployed.exit_code == 0, deployed.output
    report = json.loads(deployed.output[deployed.output.index("{") :])
    assert report["status"] == "completed", deployed.output
    roles = {d["device"]: (d["role"], d["state"]) for d in report["devices"]}
    assert roles == {
        "pi-a": ("canary", "active"),
        "pi-b": ("canary", "active"),
        "pi-c": ("target", "active"),
    }

    # A device that connects for the first time after the deployment finds it retained.
    site.device("pi-late")
    wait_for(lambda: site.serving("pi-late") == "lab-r1-int8", 60, "late device")

    # A deployment interrupted by a broker restart still completes: the notice and the
    # artefact are retained and persisted, a device whose download broke off fetches it
    # afresh, and one that was down meanwhile (pi-c restarts too) installs when it is back.
    site.agents.pop("pi-c").stop(timeout_s=5)
    second = _export(site, 2)
    published = site.fleet("model", "deploy", second, "--to", "all", "--wait", "0")
    assert published.exit_code == 0, published.output
    site.broker.restart()
    site.device("pi-c")
    for device_id in ("pi-a", "pi-b", "pi-c", "pi-late"):
        wait_for(lambda d=device_id: site.serving(d) == "lab-r2-int8", 60, f"{device_id} on r2")

    # Remote inference on the device that enables it.
    client = MqttTransport("app", host=site.broker.host, port=site.broker.port)
    client.connect()
    try:
        client.subscribe(T.dev_infer_reply("pi-a"))
        request = InferenceRequest(inputs=np.zeros((3, 1, 8, 8), dtype=np.float32))
        client.publish(
            T.dev_infer_request("pi-a"),
            envelope.encode(Envelope(body=request, correlation_id="q1")),
        )
        message = client.get(timeout_s=20.0)
    finally:
        client.close()
    assert message is not None
    reply = envelope.decode(message.payload)
    assert reply.correlation_id == "q1" and isinstance(reply.body, InferenceReply)
    assert reply.body.logits is not None and reply.body.logits.shape == (3, 10)

    # Status from the devices' retained statuses, inferences counted.
    def status() -> dict[str, dict[str, object]]:
        result = site.fleet("model", "status", "--json")
        assert result.exit_code == 0, result.output
        return {d["device"]: d for d in json.loads(result.output)["devices"]}

    wait_for(lambda: status()["pi-a"]["inferences"] == 3, 30, "inference count in the status")
    assert {d["version"] for d in status().values()} == {"lab-r2-int8"}

    # Roll back: every device returns to r1, which it kept.
    rolled = site.fleet("model", "rollback", "--json")
    assert rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.output[rolled.output.index("{") :])["version"] == "lab-r1-int8"
    for device_id in site.agents:
        wait_for(lambda d=device_id: site.serving(d) == "lab-r1-int8", 60, f"{device_id} on r1")
    history = site.fleet("model", "history", "--json")
    kinds = [(h["kind"], h["version"]) for h in json.loads(history.output)]
    assert kinds == [
        ("rollback", "lab-r1-int8"),
        ("deploy", "lab-r2-int8"),
        ("deploy", "lab-r1-int8"),
    ]


@pytest.mark.timeout(120)
def test_fleet_model_devices_run_simulated_devices_that_follow_deployments(site: Site) -> None:
    """The tour's devices: agents with their own models directories that install a deployment."""
    import threading

    artefact = _export(site, 1)
    runner = threading.Thread(
        target=lambda: site.fleet("model", "devices", "--count", "2", "--for", "12"), daemon=True
    )
    runner.start()
    models = site.state / "sim-devices" / "sim-0001" / "models" / "state.json"
    wait_for(
        lambda: (
            site.fleet("status").exit_code == 0
            and b"sim-0001" in (site.fleet("devices", "list", "--json").output.encode())
        ),
        30,
        "simulated devices online",
    )
    deployed = site.fleet("model", "deploy", artefact, "--to", "all", "--json")
    assert deployed.exit_code == 0, deployed.output
    assert json.loads(deployed.output[deployed.output.index("{") :])["status"] == "completed"
    assert json.loads(models.read_text())["active"]["version"] == "lab-r1-int8"
    runner.join(30)

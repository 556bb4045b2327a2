"""Simulated devices that follow deployments over a real broker (``fleet model devices``): for
trying ``fleet model deploy``, ``rollback`` and ``fleet-device predict`` on one machine.

Each is a real device agent (``device.agent``) with its own MQTT connection, its own models
directory (``<root>/<device id>/models``) and a ``deploy`` section that trusts the given public
key; its data is the bundled digits (so the self-test runs and it could also train).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from device.agent import AgentOptions, DeviceAgent
from device.data import load_dataset
from device.deploy import DeployOptions
from device.deploy_checks import LocalSample
from device.deploy_options import SELFTEST_EXAMPLES
from device.trust import load_trusted_keys
from device.wire.mqtt import MqttTransport
from device.wire.topics import Topics

__all__ = ["DeployDevices", "start_deploy_devices"]


@dataclass
class DeployDevices:
    """Running agents (stop them with ``stop``) and where each keeps its models."""

    agents: dict[str, DeviceAgent]
    models_dirs: dict[str, Path]

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop(timeout_s=10)


def start_deploy_devices(
    device_ids: Sequence[str],
    make_transport: Callable[[str], MqttTransport],
    root: Path,
    public_key: Path,
    *,
    topics: Topics | None = None,
    remote_inference: bool = False,
) -> DeployDevices:
    """Start one agent per id; raises ``ConfigError`` for a bad key file,
    ``BrokerUnavailableError`` when the broker cannot be reached."""
    trusted = load_trusted_keys([public_key])
    digits = load_dataset("digits", split="train")
    n = min(len(digits), SELFTEST_EXAMPLES)
    sample = LocalSample(
        x=digits.x[:n].numpy(),
        y=digits.y[:n].numpy(),
        num_classes=digits.num_classes,
        example_shape=digits.example_shape,
    )
    agents: dict[str, DeviceAgent] = {}
    dirs: dict[str, Path] = {}
    try:
        for device_id in device_ids:
            dirs[device_id] = root / device_id / "models"
            options = DeployOptions(
                models_dir=dirs[device_id],
                trusted=trusted,
                remote_inference=remote_inference,
                local_data=lambda: sample,
            )
            agent = DeviceAgent(
                make_transport(device_id),
                lambda partition: digits,
                AgentOptions(
                    device_id=device_id,
                    topics=topics or Topics(),
                    dataset_size=len(digits),
                    deploy=options,
                ),
            )
            agent.start()
            agents[device_id] = agent
    except BaseException:
        DeployDevices(agents, dirs).stop()
        raise
    return DeployDevices(agents, dirs)

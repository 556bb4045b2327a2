"""``fleet-device``: the device agent's command line (argparse: no click on a device).

    fleet-device run --config device.yaml       run the agent until SIGTERM/SIGINT
    fleet-device check --config device.yaml     validate config, data and broker reachability
    fleet-device profile [--model NAME]         measure this device's per-layer speed

SparseFleet errors exit with their ``exit_code`` (device/errors.py) and one line on stderr.
SIGTERM (systemd stop) abandons the current job, publishes the offline status and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from device import __version__
from device.errors import SparseFleetError
from device.settings import DeviceConfig, load_device_config, read_secret

if TYPE_CHECKING:
    from device.data import Dataset
    from device.wire.mqtt import MqttTransport

log = logging.getLogger("fleet-device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-device",
        description="SparseFleet device agent: trains a sparse subnetwork for a fleet manager.",
    )
    parser.add_argument("--version", action="version", version=f"fleet-device {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent until stopped (SIGTERM/SIGINT)")
    run.add_argument("--config", "-c", type=Path, required=True, help="device YAML file")
    check = sub.add_parser("check", help="validate the config, the data and the broker")
    check.add_argument("--config", "-c", type=Path, required=True, help="device YAML file")
    check.add_argument("--no-broker", action="store_true", help="do not try to connect")
    profile = sub.add_parser("profile", help="measure per-layer step times (JSON on stdout)")
    profile.add_argument("--model", default="mnist_cnn", help="registered model name")
    profile.add_argument("--batch-size", type=int, default=20)
    profile.add_argument("--repeats", type=int, default=5)
    return parser


def make_transport(config: DeviceConfig) -> MqttTransport:
    """The MQTT connection the config describes (credentials read from their files)."""
    from device.wire.mqtt import MqttTransport, TlsSettings

    broker = config.broker
    password = (
        read_secret(broker.password_file, "password file")
        if broker.password_file is not None
        else None
    )
    tls = None
    if broker.tls is not None:
        t = broker.tls
        tls = TlsSettings(
            ca_file=str(t.ca_file),
            cert_file=str(t.cert_file) if t.cert_file else None,
            key_file=str(t.key_file) if t.key_file else None,
            insecure=t.insecure,
        )
    return MqttTransport.from_url(
        broker.url,
        config.device_id,
        username=broker.username or (config.device_id if password is not None else None),
        password=password,
        tls=tls,
        session_expiry_s=broker.session_expiry_s,
        keepalive_s=broker.keepalive_s,
    )


def local_data(config: DeviceConfig) -> Dataset:
    """The device's own training set (loaded once; the partition argument is ignored)."""
    from device.data import load_dataset

    return load_dataset(config.data.dataset, data_dir=config.data.data_dir, split="train")


def cmd_run(config_path: Path) -> int:
    from device.agent import AgentOptions, DeviceAgent
    from device.profile import measure_profile
    from device.wire.topics import Topics

    config = load_device_config(config_path)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    data = local_data(config)
    transport = make_transport(config)
    profile = measure_profile(config.profile_model) if config.profile_on_start else None
    agent = DeviceAgent(
        transport,
        lambda partition: data,
        AgentOptions(
            device_id=config.device_id,
            topics=Topics(config.topics_prefix),
            tags=config.tags,
            torch_threads=config.torch_threads,
            model_wait_s=config.model_wait_s,
            profile=profile,
            dataset_size=len(data),
        ),
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    log.info("device %s online (agent %s)", config.device_id, __version__)
    while not stopping.wait(0.5):
        pass
    agent.stop(abandon=True)
    log.info("device %s offline", config.device_id)
    return 0


def cmd_check(config_path: Path, *, broker: bool) -> int:
    config = load_device_config(config_path)
    print(f"config: {config_path}: ok (device {config.device_id})")
    data = local_data(config)
    print(f"data: {config.data.dataset}: {len(data)} training examples")
    if broker:
        transport = make_transport(config)
        transport.connect(timeout_s=10.0)
        transport.close()
        print(f"broker: {config.broker.url}: connected as {config.device_id}")
    return 0


def cmd_profile(model: str, batch_size: int, repeats: int) -> int:
    from device.profile import measure_profile

    profile = measure_profile(model, batch_size=batch_size, repeats=repeats)
    print(json.dumps(asdict(profile), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.config)
        if args.command == "check":
            return cmd_check(args.config, broker=not args.no_broker)
        if args.command == "profile":
            return cmd_profile(args.model, args.batch_size, args.repeats)
        parser.print_help()
        return 0
    except SparseFleetError as exc:
        print(f"fleet-device: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

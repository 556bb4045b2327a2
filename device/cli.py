"""``fleet-device``: the device agent's command line (argparse: no click on a device).

    fleet-device run --config device.yaml       run the agent until SIGTERM/SIGINT
    fleet-device check --config device.yaml     validate config, data and broker reachability
    fleet-device profile [--model NAME]         measure this device's per-layer speed
    fleet-device predict --input FILE           predict with the deployed model (images, CSV, npz)

Every error a user can cause ends the command with one line on stderr, ``fleet-device: error:
...``, and a documented exit code (docs/cli.md, "fleet-device"): a SparseFleet error exits with
its ``exit_code`` (device/errors.py: 3 configuration, 4 broker, 5 not found, 6 data), a usage
error (a bad option) with 2, Ctrl-C before the agent runs with 130. The config is checked when
it loads, before anything connects (``device.settings``). SIGTERM (systemd stop) abandons the
current job, publishes the offline status and exits 0; losing the client id to another client
(``SessionTakenOverError``) stops the agent with exit code 4.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from device import __version__
from device.errors import ConfigError, DataError, SparseFleetError
from device.settings import DeviceConfig, load_device_config, read_secret

if TYPE_CHECKING:
    from device.local_data import DataCounts, DeviceData
    from device.wire.mqtt import MqttTransport

log = logging.getLogger("fleet-device")

USAGE_EXIT = 2  # argparse's exit status for a usage error, kept
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and where to read more)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleet-device",
        description="SparseFleet device agent: trains a sparse subnetwork for a fleet manager.",
    )
    parser.add_argument("--version", action="version", version=f"fleet-device {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run the agent until stopped (SIGTERM/SIGINT)")
    run.add_argument("--config", "-c", type=Path, required=True, help="device YAML file")
    check = sub.add_parser("check", help="validate the config, the data and the broker")
    check.add_argument("--config", "-c", type=Path, required=True, help="device YAML file")
    check.add_argument("--no-broker", action="store_true", help="do not try to connect")
    check.add_argument(
        "--classes",
        help="the run's class names, comma-separated, to check data whose config leaves "
        "them to the run",
    )
    profile = sub.add_parser("profile", help="measure per-layer step times (JSON on stdout)")
    profile.add_argument("--model", default="mnist_cnn", help="registered model name")
    profile.add_argument("--batch-size", type=_positive_int, default=20)
    profile.add_argument("--repeats", type=_positive_int, default=5)
    predict = sub.add_parser("predict", help="predict with the deployed model (docs/deployment.md)")
    predict.add_argument("--input", "-i", type=Path, required=True, help="image(s), CSV or npz")
    where = predict.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", type=Path, help="device YAML file (its deploy section)")
    where.add_argument("--models-dir", type=Path, help="models directory (default: the config's)")
    predict.add_argument(
        "--artefact", type=Path, help="an artefact file instead (signature checked with --config)"
    )
    predict.add_argument("--version", help="a kept version instead of the active one")
    predict.add_argument("--json", action="store_true", help="JSON lines on stdout")
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
        connect_timeout_s=broker.connect_timeout_s,
    )


def local_data(config: DeviceConfig) -> DeviceData:
    """The device's data as its config describes it (``device.local_data``): a bundled
    dataset is loaded here (``DataError`` if its files are missing); the device's own data is
    read by each job's refresh."""
    from device.local_data import open_device_data

    return open_device_data(config.data)


def initial_counts(data: DeviceData) -> DataCounts:
    """The counts of the first status. Bad data does not stop the agent: it is reported, and
    every job fails with the reason until the data is fixed (then the next job reads it)."""
    from device.local_data import DataCounts, LocalData

    if isinstance(data, LocalData) and data.configured is None:
        log.info("data: the classes come with the first run's model; counted at its first job")
        return DataCounts(train=0, evaluation=0)
    try:
        return data.refresh()
    except DataError as exc:
        log.error("data: %s (each job fails until this is fixed)", exc)
        return DataCounts(train=0, evaluation=0)


def cmd_run(config_path: Path) -> int:
    # The configuration and the credentials first: their errors come in a fraction of a
    # second, before torch loads and the data is read.
    config = load_device_config(config_path)
    transport = make_transport(config)
    from device.agent import AgentOptions, DeviceAgent
    from device.deploy_options import deploy_options
    from device.model_id import offers
    from device.profile import measure_profile
    from device.torch_setup import configure_torch
    from device.wire.topics import Topics

    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    data = local_data(config)
    counts = initial_counts(data)
    configure_torch(config.torch_threads, config.torch_onednn)  # before the profile
    profile = measure_profile(config.profile_model) if config.profile_on_start else None
    agent = DeviceAgent(
        transport,
        data,
        AgentOptions(
            device_id=config.device_id,
            topics=Topics(config.topics_prefix),
            tags=config.tags,
            torch_threads=config.torch_threads,
            model_wait_s=config.model_wait_s,
            model_linger_s=config.model_linger_s,
            profile=profile,
            dataset_size=counts.train,
            eval_examples=counts.evaluation,
            models=offers(config.model_refs()),  # a factory that cannot be built stops here
            deploy=deploy_options(config, data),  # bad trusted keys stop here
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
    while not stopping.wait(0.5) and transport.failure is None:
        pass
    agent.stop(abandon=True)
    if transport.failure is not None:  # another client took our id: do not fight over it
        raise transport.failure
    log.info("device %s offline", config.device_id)
    return 0


def cmd_check(config_path: Path, *, broker: bool, classes: tuple[str, ...] = ()) -> int:
    from device.local_data import LocalData

    config = load_device_config(config_path)
    print(f"config: {config_path}: ok (device {config.device_id})")
    data = local_data(config)
    if classes:
        data.use_classes(classes)
    if isinstance(data, LocalData) and data.spec.classes is None:
        print(
            f"data: {_describe_data(config)}: not read (its classes come from the run; "
            "give --classes to check it now)"
        )
    else:
        counts = data.refresh()
        data.train()  # decodes every example: a corrupt one is named here, not in a round
        if counts.evaluation:
            data.evaluation()
        print(
            f"data: {_describe_data(config)}: {counts.train} training examples, "
            f"{counts.evaluation} for evaluation"
        )
    from device.model_id import offers, short

    built = offers(config.model_refs())  # imports and builds each: a bad factory is named here
    print("models: " + ", ".join(f"{o.model.text} ({short(o.architecture_digest)})" for o in built))
    if broker:
        transport = make_transport(config)
        transport.connect()
        transport.close()
        print(f"broker: {config.broker.url}: connected as {config.device_id}")
    return 0


def _describe_data(config: DeviceConfig) -> str:
    from device.data.local_spec import LocalDataSpec

    data = config.data
    if isinstance(data, LocalDataSpec):
        return f"{data.format} {data.path or data.function}"
    return data.dataset


def cmd_profile(model: str, batch_size: int, repeats: int) -> int:
    from device.profile import measure_profile

    profile = measure_profile(model, batch_size=batch_size, repeats=repeats)
    print(json.dumps(asdict(profile), indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every example of ``--input`` with the deployed model (or ``--artefact``)."""
    from device.inference import load, load_file
    from device.inference_input import read_examples

    trusted = None
    models_dir = args.models_dir
    if args.config is not None:
        config = load_device_config(args.config)
        if config.deploy is None:
            raise ConfigError(f"{args.config}: no deploy section (models_dir, trusted_keys)")
        from device.trust import load_trusted_keys

        models_dir = config.deploy.models_dir
        trusted = load_trusted_keys(config.deploy.trusted_keys)
    if args.artefact is not None:
        model = load_file(args.artefact, trusted=trusted)
    else:
        model = load(models_dir, version=args.version, trusted=trusted)
    try:
        examples = read_examples(args.input, model.input_shape, model.manifest.preprocess)
        prediction = model.predict(examples)
    finally:
        model.close()
    for i, (index, label) in enumerate(zip(prediction.indices, prediction.labels, strict=True)):
        if args.json:
            row = {"example": i, "class": int(index), "label": label, "version": model.version}
            print(json.dumps({**row, "logits": prediction.logits[i].tolist()}))
        else:
            print(f"{i}\t{label}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.config)
        if args.command == "check":
            classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else ()
            return cmd_check(args.config, broker=not args.no_broker, classes=classes)
        if args.command == "profile":
            from device.models import model_names  # torch: only for the command that needs it

            if args.model not in model_names():
                parser.error(
                    f"argument --model: unknown model {args.model!r}; "
                    f"known: {', '.join(model_names())}"
                )
            return cmd_profile(args.model, args.batch_size, args.repeats)
        if args.command == "predict":
            return cmd_predict(args)
        parser.print_help()
        return 0
    except SparseFleetError as exc:
        print(f"fleet-device: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the agent's own handler is installed
        print("fleet-device: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT


def _one_line(message: str) -> str:
    """Messages may quote a file's text; the error stays one line on stderr."""
    return " ".join(message.splitlines())


if __name__ == "__main__":
    sys.exit(main())

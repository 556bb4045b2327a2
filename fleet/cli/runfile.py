"""Run configuration files: YAML validated into dataclasses, then turned into a ``RunSpec``.

A run file has up to four sections (only ``run`` is required)::

    run:          # what the fleet manager runs -> fleet.runtime.runner.RunSpec
      id: mnist-feddst          # optional; default: the file's stem and the start time
      model: mnist_cnn          # a registered name, or {factory: "pkg.mod:build", kwargs: {...},
                                # input_shape: [1, 28, 28], num_classes: 10} (device.model_ref)
      prunable: ["conv.*weight"]  # optional: regexes of the tensors to prune (default: every
                                # Linear and Conv weight)
      strategy: feddst          # fleet.strategies registry name
      rounds: 100
      clients_per_round: 10     # k: updates that close a round
      training: {epochs: 1, lr: 0.01}      # LocalTraining fields, sent to every device
      options: {density: 0.2}   # the strategy's own options (its *Options dataclass)
      evaluate: {every: 5, fraction: 0.5, min_devices: 3, timeout_s: 60}  # optional:
                                # federated evaluation on the devices (fleet.runtime.evaluation)
      classes: [cat, dog]       # optional: the label space, in order (class i is logit i),
                                # sent to the devices with the model
      budgets: auto             # optional: per-device density budgets, none | auto |
                                # {tag: density} (docs/heterogeneity.md)
      mode: async               # optional: buffered asynchronous rounds (FedBuff); rounds then
      async_options: {concurrency: 20, buffer: 10, max_staleness: 4, job_timeout_s: 120}
                                # count aggregations (docs/algorithms.md)
    data:         # evaluation data of the fleet manager, and the simulated devices' data
      dataset: mnist            # or a local format: imagefolder, csv, npz, python, with
      data_dir: ../data/mnist   # classes and options (fleet.cli.rundata); relative to the file
      partition: shards
    simulation:   # only for `fleet simulate`
      devices: 20
      classes:                  # optional: a mixed fleet (fleet.sim.fleet_classes)
        - {name: pi-zero-2w, share: 0.5, speed: 0.15, memory_mb: 512, dropout: 0.05}
        - {name: pi4, share: 0.5, speed: 0.6, memory_mb: 4096}
    broker:       # only for `fleet run start` (the CLI's --broker overrides url)
      url: mqtts://broker.example.org

Every error raises ``ConfigError`` naming the file, the line and the field
(``device.config.load`` does that for types and unknown keys; the cross-field checks here do it
for strategy options, model/dataset compatibility and run ids). ``check`` is what
``fleet config check`` runs: loading the file and building the strategy it names, so a file that
passes can be started.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device.config import SettingError, load, read_yaml
from device.data import Split, check_dataset
from device.errors import ConfigError, DataError
from device.model_ref import ModelRef
from device.models import find_model_spec, meta_model, model_names, prunable_names
from device.wire.messages import LocalTraining
from device.wire.mqtt import TlsSettings, parse_broker_url
from device.wire.topics import validate_prefix
from fleet.cli.rundata import DataConfig
from fleet.runtime.async_options import AsyncOptions
from fleet.runtime.runner import RunSpec
from fleet.runtime.spec import FederatedEvaluation, classes_problem
from fleet.sim import Faults, SimSpec
from fleet.sim.fleet_classes import DeviceClass, coerce_classes
from fleet.strategies import create_strategy, strategy_names
from fleet.strategies.budgets import BudgetPolicy

__all__ = [
    "RUN_ID_PATTERN",
    "BrokerConfig",
    "DataConfig",
    "FleetConfig",
    "RunConfig",
    "SimConfig",
    "TlsConfig",
    "check_run_id",
    "default_run_id",
    "demo_config",
    "dense_baseline",
    "describe",
    "load_config",
    "run_classes",
    "run_spec",
    "sim_spec",
    "strategy_options",
]

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Run ids name files in the state directory and one MQTT topic level, so they are kept short
and plain: 1..64 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""

# Input shape of one example of each registered dataset, to refuse a model that cannot read it
# before any device trains (an unknown, future dataset is not checked).
_DATASET_INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}

# Strategy options that only repeat the run's own settings; they are filled in from ``run``.
_RUN_LEVEL_OPTIONS = ("clients_per_round", "training")
# Options that must equal the run's length when not given (FedDST's default T_end is half of it).
_RUN_LENGTH_OPTION = {"feddst": "total_rounds"}


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is allowed (``RUN_ID_PATTERN``); ``ConfigError`` otherwise."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ConfigError(
            f"run id {run_id!r} is not allowed: use 1 to 64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return run_id


def default_run_id(stem: str, now: float | None = None) -> str:
    """``{stem}-{YYYYmmdd-HHMMSS}`` in local time, with characters a run id cannot hold
    replaced by ``-``."""
    when = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:40] or "run"
    return f"{clean}-{when}"


@dataclass(frozen=True)
class RunConfig:
    """The ``run`` section: what ``fleet.runtime.runner.RunSpec`` needs (see its docstring).

    ``rounds`` >= 1; ``clients_per_round`` (k) >= 1; ``over_select`` >= 1 (select
    ``ceil(k * over_select)`` devices); ``round_timeout_s`` > 0 seconds; ``eval_every`` >= 1
    rounds; ``max_update_bytes`` > 0. ``tags`` are device tag selectors ("key" or "key=value").
    ``model`` is a registered name, a ``"package.module:callable"`` factory, or a mapping
    (``device.model_ref.ModelRef``: name or factory, kwargs, input_shape, num_classes);
    ``prunable``: regular expressions of the parameters to prune (``re.fullmatch``; default:
    every Linear and Conv weight). ``evaluate``: federated evaluation on the devices
    (``fleet.runtime.spec.FederatedEvaluation``: ``every``, ``fraction``, ``min_devices``,
    ``timeout_s``); absent: none. ``classes``: the run's class names in order (class ``i`` is
    logit ``i``), sent to the devices with the model (default: the data section's ``classes``
    where it has them).
    """

    model: str | ModelRef
    strategy: str
    rounds: int
    clients_per_round: int
    id: str | None = None
    training: LocalTraining = field(default_factory=LocalTraining)
    options: dict[str, Any] = field(default_factory=dict)
    over_select: float = 1.0
    min_updates: int = 1
    round_timeout_s: float = 600.0
    late_policy: Literal["drop", "next"] = "drop"
    eval_every: int = 1
    seed: int = 0
    init_seed: int = 0
    tags: tuple[str, ...] = ()
    max_update_bytes: int = 256 * 1024 * 1024
    prunable: tuple[str, ...] = ()
    evaluate: FederatedEvaluation | None = None
    classes: tuple[str, ...] = ()
    budgets: str | dict[str, float] = "none"  # none | auto | {tag: density} (docs/heterogeneity.md)
    mode: Literal["sync", "async"] = "sync"  # async: buffered asynchronous rounds (FedBuff)
    async_options: AsyncOptions | None = None  # C, B, max staleness, job timeout

    def __post_init__(self) -> None:
        # ValueError: the loader turns it into "file:line: run: <message>".
        try:
            BudgetPolicy.parse(self.budgets)
        except ConfigError as exc:
            raise SettingError("budgets", str(exc)) from None
        try:
            ref = ModelRef.of(self.model)
        except ValueError as exc:
            raise SettingError("model", str(exc)) from None
        if ref.name and ref.name not in model_names():
            raise SettingError(
                "model", f"unknown model {ref.name!r}; known: {_known(model_names())}"
            )
        for pattern in self.prunable:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SettingError(
                    "prunable", f"{pattern!r} is not a regular expression: {exc}"
                ) from None
        if self.strategy not in strategy_names():
            raise ValueError(
                f"strategy: unknown strategy {self.strategy!r}; known: {_known(strategy_names())}"
            )
        if self.id is not None and not RUN_ID_PATTERN.fullmatch(self.id):
            raise ValueError(
                f"id: {self.id!r} is not a valid run id (1 to 64 characters from "
                "A-Z a-z 0-9 . _ -, starting with a letter or digit)"
            )
        for name, ok, rule in (
            ("rounds", self.rounds >= 1, "at least 1"),
            ("clients_per_round", self.clients_per_round >= 1, "at least 1"),
            ("over_select", self.over_select >= 1.0, "at least 1.0"),
            ("min_updates", self.min_updates >= 1, "at least 1"),
            ("round_timeout_s", self.round_timeout_s > 0, "more than 0 seconds"),
            ("eval_every", self.eval_every >= 1, "at least 1 round"),
            ("max_update_bytes", self.max_update_bytes > 0, "more than 0 bytes"),
        ):
            if not ok:
                raise ValueError(f"{name}: must be {rule}, got {getattr(self, name)!r}")
        repeated = [key for key in _RUN_LEVEL_OPTIONS if key in self.options]
        if repeated:
            raise ValueError(
                f"options.{repeated[0]}: set it once, as run.{repeated[0]}, not in run.options"
            )

    @property
    def model_ref(self) -> ModelRef:
        """``model`` as a reference."""
        return ModelRef.of(self.model)


@dataclass(frozen=True)
class SimConfig:
    """The ``simulation`` section (``fleet.sim.SimSpec``): ``devices`` >= 1 simulated devices,
    hosted by ``processes`` worker processes over MQTT, ``torch_threads`` per training job;
    ``faults`` are fractions of the devices in [0, 1] (``fleet.sim.Faults``)."""

    devices: int = 10
    processes: int = 2
    torch_threads: int = 1
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    classes: tuple[DeviceClass, ...] = ()  # a mixed fleet (fleet.sim.fleet_classes)

    def __post_init__(self) -> None:
        coerce_classes(self.classes)  # distinct names, shares summing to 1 (ValueError)
        for name, value in (
            ("devices", self.devices),
            ("processes", self.processes),
            ("torch_threads", self.torch_threads),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        f = self.faults
        for name, fraction in (
            ("never_answer", f.never_answer),
            ("late", f.late),
            ("disconnect", f.disconnect),
        ):
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"faults.{name}: must be a fraction in [0, 1], got {fraction}")
        if f.never_answer + f.late + f.disconnect > 1.0:
            raise ValueError("faults: never_answer + late + disconnect must not exceed 1")
        if f.late_delay_s < 0 or f.latency_s < 0:
            raise ValueError("faults: late_delay_s and latency_s must be >= 0 seconds")


@dataclass(frozen=True)
class TlsConfig:
    """TLS files of the fleet manager's broker connection (paths relative to the YAML file)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def settings(self) -> TlsSettings:
        return TlsSettings(
            ca_file=None if self.ca_file is None else str(self.ca_file),
            cert_file=None if self.cert_file is None else str(self.cert_file),
            key_file=None if self.key_file is None else str(self.key_file),
            insecure=self.insecure,
        )


@dataclass(frozen=True)
class BrokerConfig:
    """The ``broker`` section: where the fleet manager connects and as whom.

    ``url`` is ``mqtt://host[:port]`` or ``mqtts://host[:port]`` (None: the CLI's ``--broker``,
    else the local broker of ``fleet broker start``). ``password_file`` holds the password alone
    on its first line (as ``fleet devices enroll`` writes it). ``prefix`` is the topic prefix.
    """

    url: str | None = None
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    prefix: str = "fl/v1"

    def __post_init__(self) -> None:
        if self.url is not None:
            parse_broker_url(self.url)  # ValueError names the URL
        validate_prefix(self.prefix)
        if self.password_file is not None and self.username is None:
            raise ValueError("username: required when password_file is set")

    def password(self) -> str | None:
        """The password read from ``password_file`` (None without one)."""
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"broker.password_file {self.password_file}: cannot read: {exc.strerror}"
            ) from None
        line = text.splitlines()[0].strip() if text.strip() else ""
        if not line:
            raise ConfigError(f"broker.password_file {self.password_file} is empty")
        return line


@dataclass(frozen=True)
class FleetConfig:
    """A whole run file."""

    run: RunConfig
    data: DataConfig | None = None
    simulation: SimConfig = field(default_factory=SimConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)


def _known(names: list[str]) -> str:
    return ", ".join(names)


def _line(path: Path, dotted: str) -> int:
    """The 1-based line of the key ``dotted`` ("run.options") in ``path``; 0 if not found."""
    node = read_yaml(path)
    line = 0
    for part in dotted.split("."):
        if not isinstance(node.value, dict) or part not in node.value:
            return line
        line = node.key_lines.get(part, node.line)
        node = node.value[part]
    return line


def _located(path: Path, dotted: str, message: str) -> ConfigError:
    line = _line(path, dotted)
    where = f"{path}:{line}" if line else str(path)
    return ConfigError(f"{where}: {dotted}: {message}")


def strategy_options(run: RunConfig) -> dict[str, Any]:
    """The strategy's options as stored in the RunSpec (JSON-able): ``run.options`` plus the
    run-level ``clients_per_round`` and ``training``, and the run length where the strategy
    uses it."""
    options: dict[str, Any] = dict(run.options)
    options["clients_per_round"] = run.clients_per_round
    options["training"] = dataclasses.asdict(run.training)
    length_option = _RUN_LENGTH_OPTION.get(run.strategy)
    if length_option is not None:
        options.setdefault(length_option, run.rounds)
    return options


def load_config(path: str | Path) -> FleetConfig:
    """Load and fully validate a run file; ``ConfigError`` (file:line: field: problem) if bad.

    Beyond types and known keys, checks that the strategy accepts its options and that the
    model reads the dataset's examples.
    """
    path = Path(path)
    config = load(path, FleetConfig)
    try:
        create_strategy(config.run.strategy, **strategy_options(config.run))
    except (ConfigError, ValueError, TypeError) as exc:
        raise _located(path, "run.options", str(exc)) from None
    check_model(config, path)
    check_classes(config, path)
    return config


def run_classes(config: FleetConfig) -> tuple[str, ...]:
    """The run's label space: ``run.classes``, else the local data section's ``classes``
    (empty: not declared)."""
    if config.run.classes:
        return tuple(config.run.classes)
    if config.data is not None and config.data.classes:
        return tuple(config.data.classes)
    return ()


def check_classes(config: FleetConfig, path: Path) -> None:
    """``run.classes`` is a label space with as many names as the model has outputs, and the
    data section (a local format's ``classes``) agrees with it; ``ConfigError`` otherwise."""
    run, data = config.run, config.data
    spec = find_model_spec(run.model_ref)
    num_classes = run.model_ref.num_classes or (spec.num_classes if spec is not None else None)
    problem = classes_problem(run_classes(config), num_classes)
    if problem is not None:
        raise _located(path, "run.classes" if run.classes else "data.classes", problem)
    if run.classes and data is not None and data.classes and data.classes != run.classes:
        raise _located(
            path,
            "data.classes",
            f"{list(data.classes)} differ from run.classes {list(run.classes)}: the same names "
            "in the same order, or leave one of them out",
        )


def check_model(config: FleetConfig, path: Path) -> None:
    """The run's model can be built here (a factory is imported and called, on ``meta``), its
    ``prunable`` patterns each match a parameter, and it reads the examples of the dataset;
    ``ConfigError`` at ``run.model`` or ``run.prunable`` otherwise."""
    ref = config.run.model_ref
    try:
        module = meta_model(ref)
        spec = find_model_spec(ref)
    except (ConfigError, ValueError) as exc:
        raise _located(path, "run.model", str(exc)) from None
    try:
        prunable_names(module, patterns=config.run.prunable)
    except ValueError as exc:
        raise _located(path, "run.prunable", str(exc).removeprefix("prunable: ")) from None
    if config.data is not None and spec is not None:
        expected = _DATASET_INPUT_SHAPES.get(config.data.dataset)
        shape = spec.input_shape
        if expected is not None and tuple(shape) != expected:
            raise _located(
                path,
                "run.model",
                f"model {ref.text!r} reads examples of shape {tuple(shape)}, but dataset "
                f"{config.data.dataset!r} has {expected}",
            )


def check_data(config: FleetConfig, path: str | Path, *, simulated: bool) -> None:
    """The dataset files the run will read are there, without reading them: the test split
    when the fleet manager evaluates, the training split too when the run is simulated (its
    devices are partitions of it). ``ConfigError`` at ``data.data_dir`` naming the directory
    and what to do; nothing to check without a ``data`` section or for bundled datasets."""
    data = config.data
    if data is None:
        return
    splits: list[Split] = []
    if simulated:
        splits.append("train")
    if data.evaluate:
        splits.append("test")
    for split in splits:
        try:
            check_dataset(data.dataset, data.data_dir, split)
        except DataError as exc:
            raise _located(Path(path), "data.data_dir", str(exc)) from None


def run_spec(config: FleetConfig, run_id: str) -> RunSpec:
    """The RunSpec of ``config`` under ``run_id`` (validated with ``check_run_id``)."""
    run = config.run
    return RunSpec(
        run_id=check_run_id(run_id),
        model_name=run.model_ref.text,
        model_ref=run.model_ref,
        prunable=run.prunable,
        strategy=run.strategy,
        rounds=run.rounds,
        clients_per_round=run.clients_per_round,
        strategy_options=strategy_options(run),
        over_select=run.over_select,
        min_updates=run.min_updates,
        round_timeout_s=run.round_timeout_s,
        late_policy=run.late_policy,
        eval_every=run.eval_every,
        seed=run.seed,
        tags=run.tags,
        max_update_bytes=run.max_update_bytes,
        init_seed=run.init_seed,
        evaluate=run.evaluate,
        classes=run_classes(config),
        budgets=run.budgets,
        mode=run.mode,
        async_options=run.async_options,
    )


def sim_spec(config: FleetConfig, *, devices: int | None = None) -> SimSpec:
    """The SimSpec of ``config`` (the digits dataset when it has no ``data`` section);
    ``devices`` overrides ``simulation.devices``."""
    data = config.data or DataConfig()
    sim = config.simulation
    count = sim.devices if devices is None else devices
    if count < 1:
        raise ConfigError(f"--devices must be at least 1, got {count}")
    return SimSpec(
        devices=count,
        dataset=data.dataset,
        data_dir=data.data_dir,
        partition=data.partition,
        partition_options=dict(data.partition_options),
        data_options=data.loader_options(),
        seed=sim.seed,
        faults=sim.faults,
        classes=sim.classes,
        processes=sim.processes,
        torch_threads=sim.torch_threads,
    )


def describe(config: FleetConfig, path: Path) -> Mapping[str, Any]:
    """A short JSON-able summary of the run file ``path`` (what ``fleet config check`` prints)."""
    run = config.run
    return {
        "file": str(path),
        "id": run.id,
        "model": run.model_ref.text,
        "strategy": run.strategy,
        "rounds": run.rounds,
        "clients_per_round": run.clients_per_round,
        "options": strategy_options(run),
        "dataset": None if config.data is None else config.data.dataset,
        "evaluate": None if run.evaluate is None else dataclasses.asdict(run.evaluate),
        "devices": config.simulation.devices,
        "broker": config.broker.url,
    }


DEMO_DEVICES = 20
DEMO_PER_ROUND = 10


def demo_config(
    dataset: Literal["digits", "mnist"],
    *,
    data_dir: Path | None = None,
    rounds: int | None = None,
    devices: int = DEMO_DEVICES,
    per_round: int = DEMO_PER_ROUND,
) -> FleetConfig:
    """The FedDST run of ``fleet demo`` (``examples/digits-demo.yaml`` is the digits one).

    Chosen to finish in a few minutes on 2 CPU cores while FedDST clearly learns (docs/cli.md
    has the measured figures): digits with the 4,810-parameter MLP, 30 rounds of 5 local
    epochs; MNIST with FedDST's CNN, 8 rounds of at most 10 local steps. Density 0.2 (ERK),
    data split iid over ``devices`` devices, ``per_round`` of them per round.
    """
    if dataset == "digits":
        run = RunConfig(
            model="mlp",
            strategy="feddst",
            rounds=30 if rounds is None else rounds,
            clients_per_round=per_round,
            training=LocalTraining(epochs=5, lr=0.05),
            options={"density": 0.2, "readjust_every": 5},
            round_timeout_s=120.0,
        )
    else:
        run = RunConfig(
            model="mnist_cnn",
            strategy="feddst",
            rounds=8 if rounds is None else rounds,
            clients_per_round=per_round,
            training=LocalTraining(epochs=1, lr=0.03, max_steps=10),
            options={"density": 0.2, "readjust_every": 2},
            round_timeout_s=300.0,
        )
    return FleetConfig(
        run=run,
        data=DataConfig(dataset=dataset, data_dir=data_dir, partition="iid"),
        simulation=SimConfig(devices=devices),
    )


def dense_baseline(config: FleetConfig) -> FleetConfig:
    """The same run with dense FedAvg: same model, data, devices, rounds and local training."""
    return dataclasses.replace(
        config, run=dataclasses.replace(config.run, strategy="fedavg", options={})
    )

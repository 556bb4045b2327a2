"""What both simulations share: the spec, the partitioned data, fault injection, the agents.

The devices are real ``DeviceAgent``s (the same code a Pi runs) with a data source that hands
each one its partition of a dataset; the fleet manager is the real ``Runner``. Only the transport
differs between ``fleet.sim.memory`` and ``fleet.sim.mqtt``, and both build on this module.

Fault injection (fractions of the devices, chosen with a seeded rng): devices that never answer,
that answer late (after ``late_delay_s``), that disconnect mid-training (their connection dies
without a clean close, so the broker publishes their will); ``latency_s`` delays every upload.

A mixed fleet (``SimSpec.classes``, ``fleet.sim.fleet_classes``): each device belongs to a class
whose speed stretches its jobs (wall clock), whose memory and profile its birth reports, whose
name is its tag, and whose dropout rate drops some of its jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.agent import AgentOptions, DataSource, DeviceAgent, hardware
from device.data import FORMATS, Dataset, iid, load_dataset, partition
from device.errors import DataError
from device.job import load_model
from device.local_data import DataCounts, DeviceData, check_class_count
from device.model_id import offers
from device.model_ref import ModelOffer, ModelRef
from device.seeding import derive_seed
from device.trainer import evaluate
from device.wire.messages import DeviceProfile, DeviceUpdate, ModelSnapshot, RoundCommand
from device.wire.topics import Topics
from device.wire.transport import Transport
from fleet.sim.fleet_classes import (
    DeviceClass,
    HostCores,
    JobClock,
    assign_classes,
    class_hardware,
    coerce_classes,
    drops_job,
    host_profile,
    scaled_profile,
    slow_down,
)
from fleet.sim.userdata import DeviceDirectories, local_spec, materialise
from fleet.strategies.base import GlobalModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """Fault injection; fractions are of all simulated devices, in [0, 1]."""

    never_answer: float = 0.0
    late: float = 0.0
    late_delay_s: float = 0.0
    disconnect: float = 0.0
    latency_s: float = 0.0  # seconds added before every upload


@dataclass(frozen=True)
class SimSpec:
    """How the simulated fleet is made."""

    devices: int
    dataset: str = "digits"
    data_dir: Path | None = None
    partition: str = "iid"
    partition_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    processes: int = 2  # MQTT mode: worker processes hosting the agents
    torch_threads: int = 1  # per training job; jobs of different devices run in parallel
    # The models the devices announce they can build (``simulate`` fills in the run's): empty,
    # they announce none, as an older agent does (the fleet manager then assumes the built-ins).
    models: tuple[ModelRef, ...] = ()
    # A user's dataset in a local format (``dataset`` imagefolder|csv|npz|python, at
    # ``data_dir``): the LocalDataSpec settings of the run file's data section (classes,
    # eval_fraction, seed, the format's own options); ``fleet.sim.userdata``.
    data_options: dict[str, Any] = field(default_factory=dict)
    # A mixed fleet (``fleet.sim.fleet_classes``): device classes with share, speed, memory and
    # dropout; empty: every device is the simulation host, as before.
    classes: tuple[DeviceClass, ...] = ()

    def __post_init__(self) -> None:
        # From a launch record (JSON) the models and classes come back as mappings.
        refs = tuple(m if isinstance(m, ModelRef) else ModelRef.from_json(m) for m in self.models)
        object.__setattr__(self, "models", refs)
        object.__setattr__(self, "classes", coerce_classes(self.classes))


def device_ids(count: int) -> list[str]:
    """Stable simulated device ids: ``sim-0000``, ``sim-0001``, ..."""
    return [f"sim-{i:04d}" for i in range(count)]


class PartitionedData:
    """A picklable data source: device partition ``"i"`` of a dataset, loaded once per process.

    Called with a partition name it is a plain data source (the training partition);
    ``source_for(i)`` is device ``i``'s ``DeviceData``: its training partition, and for federated
    evaluation its IID share of the test split (partitioned with a seed of its own; no share,
    and evaluations fail, when the dataset has no readable test split).
    """

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self._train: Dataset | None = None
        self._parts: list[np.ndarray] | None = None
        self._test: tuple[Dataset, list[np.ndarray]] | DataError | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]

    def _load(self) -> tuple[Dataset, list[np.ndarray]]:
        with self._lock:
            if self._train is None or self._parts is None:
                spec = self.spec
                train = load_dataset(spec.dataset, data_dir=spec.data_dir, split="train")
                labels = train.y.numpy()
                self._parts = partition(
                    spec.partition,
                    labels,
                    spec.devices,
                    seed=derive_seed("partition", spec.dataset, spec.seed),
                    **spec.partition_options,
                )
                self._train = train
            return self._train, self._parts

    def __call__(self, partition_name: str) -> Dataset:
        train, parts = self._load()
        try:
            index = int(partition_name)
            indices = parts[index]
        except (ValueError, IndexError):
            raise ValueError(
                f"unknown partition {partition_name!r}; this simulation has 0..{len(parts) - 1}"
            ) from None
        return train.subset(indices)

    def size(self, index: int) -> int:
        return len(self._load()[1][index])

    def _load_test(self) -> tuple[Dataset, list[np.ndarray]] | DataError:
        with self._lock:
            if self._test is None:
                spec = self.spec
                try:
                    test = load_dataset(spec.dataset, data_dir=spec.data_dir, split="test")
                except DataError as exc:
                    self._test = exc
                else:
                    seed = derive_seed("partition-test", spec.dataset, spec.seed)
                    self._test = (test, iid(test.labels(), spec.devices, seed=seed))
            return self._test

    def counts(self, index: int) -> DataCounts:
        """Device ``index``'s examples: its training partition and its test share."""
        test = self._load_test()
        evaluation = 0 if isinstance(test, DataError) else len(test[1][index])
        return DataCounts(train=self.size(index), evaluation=evaluation)

    def source_for(self, index: int) -> DeviceData:
        """Device ``index``'s data (the class docstring)."""
        return _Partition(self, index)


class _Partition(DeviceData):
    """One simulated device's partition of a bundled dataset (``PartitionedData.source_for``)."""

    def __init__(self, data: PartitionedData, index: int) -> None:
        self._data = data
        self._index = index

    def use_classes(self, classes: tuple[str, ...]) -> None:
        check_class_count(classes, self.train().num_classes)

    def refresh(self) -> DataCounts:
        return self._data.counts(self._index)

    def train(self) -> Dataset:
        return self._data(str(self._index))

    def evaluation(self) -> Dataset:
        test = self._data._load_test()
        if isinstance(test, DataError):
            raise test
        return test[0].subset(test[1][self._index])


FleetData = PartitionedData | DeviceDirectories
"""What simulated devices read: partitions of a bundled dataset, or materialised directories of
a user's dataset (``fleet.sim.userdata``). Both are picklable and give device ``i``'s data with
``source_for(i)`` and its counts with ``counts(i)``."""


def sim_data_root(store_dir: Path, run_id: str) -> Path:
    """Where a simulation of ``run_id`` materialises its devices' directories."""
    return Path(store_dir) / "simdata" / run_id


def fleet_data(sim: SimSpec, root: Path, *, hold_out: bool) -> FleetData:
    """The simulated devices' data: a bundled dataset's partitions, or, for a local format, the
    user's dataset materialised in per-device directories under ``root`` (``hold_out``: keep
    the fleet manager's test set out of them; ``fleet.sim.userdata.materialise``)."""
    if sim.dataset not in FORMATS:
        return PartitionedData(sim)
    spec = local_spec(sim.dataset, sim.data_dir, sim.data_options)
    specs = materialise(
        spec,
        root,
        device_ids(sim.devices),
        partitioner=sim.partition,
        partition_options=sim.partition_options,
        seed=sim.seed,
        hold_out=hold_out,
    )
    return DeviceDirectories(specs)


def make_evaluator(
    dataset: str, data_dir: Path | None, options: Mapping[str, Any] | None = None
) -> Callable[[GlobalModel], dict[str, float]]:
    """Evaluate global models on the dataset's test split (loaded once). ``options`` are the
    loader's (a local format's ``LocalDataSpec`` settings: its test split is the evaluation
    side of its split)."""
    test = load_dataset(dataset, data_dir=data_dir, split="test", **dict(options or {}))

    def evaluator(model: GlobalModel) -> dict[str, float]:
        snapshot = ModelSnapshot(
            model.model_name, model.version, b"", 0, model.weights, model.masks
        )
        module, _ = load_model(snapshot)
        loss, accuracy = evaluate(module, test)
        return {"accuracy": accuracy, "loss": loss}

    return evaluator


def fault_plan(spec: SimSpec) -> dict[str, str]:
    """Which devices misbehave and how (seeded): ``{device_id: "never"|"late"|"disconnect"}``."""
    ids = device_ids(spec.devices)
    rng = np.random.default_rng(derive_seed("faults", spec.seed))
    order = [ids[i] for i in rng.permutation(len(ids))]
    plan: dict[str, str] = {}
    f = spec.faults
    start = 0
    for kind, fraction in (
        ("never", f.never_answer),
        ("late", f.late),
        ("disconnect", f.disconnect),
    ):
        count = round(fraction * len(ids))
        for device_id in order[start : start + count]:
            plan[device_id] = kind
        start += count
    return plan


class SimulatedAgent(DeviceAgent):
    """A device agent with injected faults and, in a mixed fleet, its class's speed and dropout
    (``fleet.sim.fleet_classes``); behaves exactly like ``DeviceAgent`` otherwise."""

    def __init__(
        self,
        transport: Transport,
        data: DataSource | DeviceData,
        options: AgentOptions,
        fault: str | None,
        faults: Faults,
        device_class: DeviceClass | None = None,
        seed: int = 0,
        cores: HostCores | None = None,
    ) -> None:
        super().__init__(transport, data, options)
        self.fault = fault
        self.faults = faults
        self.device_class = device_class
        self.seed = seed
        self.cores = cores
        self._clock = threading.local()  # the running job's JobClock, per worker thread

    def _run(self, job: Any) -> None:
        if self.fault == "never":
            return
        cls = self.device_class
        if (
            cls is not None
            and isinstance(job.command, RoundCommand)
            and drops_job(self.seed, job.run_id, job.round, self.device_id, cls.dropout)
        ):
            log.debug("%s (%s) drops round %d", self.device_id, cls.name, job.round)
            return
        if self.fault == "disconnect":
            kill = getattr(self.transport, "kill", None)
            if kill is not None:
                kill()  # dies without a clean close: the broker publishes the will
            self._stop.set()
            return
        delay = self.faults.latency_s + (self.faults.late_delay_s if self.fault == "late" else 0)
        if delay > 0:
            job.cancelled.wait(delay)
        self._clock.job = JobClock.start()  # _upload runs in this thread, within this call
        cores = self.cores
        if cores is not None and not cores.take(job.cancelled):
            return
        try:
            super()._run(job)
        finally:
            if cores is not None:
                cores.give_back()

    def _upload(self, job: Any, body: Any, **kwargs: Any) -> None:
        """A slower class's job takes ``compute_s / speed`` seconds: compute at host speed,
        give the host core back, sleep the rest (cancellable), report the simulated time as
        ``train_s``."""
        if self.cores is not None:
            self.cores.give_back()
        clock = getattr(self._clock, "job", None)
        if self.device_class is not None and isinstance(body, DeviceUpdate) and clock is not None:
            body = slow_down(body, self.device_class, job.cancelled.wait, clock)
        super()._upload(job, body, **kwargs)


def _agent_options(
    spec: SimSpec,
    data: FleetData,
    index: int,
    device_id: str,
    topics: Topics,
    models: tuple[ModelOffer, ...] = (),
    device_class: DeviceClass | None = None,
) -> AgentOptions:
    counts = data.counts(index)
    class_options: dict[str, Any] = {}
    if device_class is not None:
        base = _class_profile_base(spec)
        class_options = {
            "tags": (device_class.name,),
            "hardware": class_hardware(device_class, hardware()),
            "profile": None if base is None else scaled_profile(base, min(1.0, device_class.speed)),
        }
    return AgentOptions(
        **class_options,
        device_id=device_id,
        topics=topics,
        dataset_size=counts.train,
        eval_examples=counts.evaluation,
        models=models,
        torch_threads=0,  # set once per process: torch's thread pool is process-wide
        # session_epoch left at 0: derived from the clock as a real agent's is, so a second
        # simulation in the same store outranks the first one's stored "offline" (issue 23).
    )


def _class_profile_base(spec: SimSpec) -> DeviceProfile | None:
    """The host's profile of the run's model (named as its snapshots name it), which classes
    scale."""
    if not spec.models:
        return None
    model = spec.models[0]
    return host_profile(model.text, model.input_shape)


def partition_lookup(count: int) -> Callable[[str], str]:
    """The data partition of a simulated device: its index."""
    index = {device_id: str(i) for i, device_id in enumerate(device_ids(count))}
    return lambda device_id: index.get(device_id, "")


def start_agents(
    make_transport: Callable[[str], Transport],
    sim: SimSpec,
    data: FleetData,
    topics: Topics,
    plan: dict[str, str],
    indices: Sequence[int] | range,
    *,
    sharers: int = 1,
) -> list[DeviceAgent]:
    """Start the agents of the given device indices; each publishes its birth. A mixed fleet's
    jobs share this host's cores (``HostCores``) with ``sharers`` processes in all."""
    ids = device_ids(sim.devices)
    cores = HostCores.share_of_host(sharers) if sim.classes else None
    models = offers(sim.models)  # built once: every simulated device builds the same
    classes = assign_classes(ids, sim.classes, sim.seed)
    agents: list[DeviceAgent] = []
    for i in indices:
        device_id = ids[i]
        device_class = classes.get(device_id)
        agent = SimulatedAgent(
            make_transport(device_id),
            data.source_for(i),
            _agent_options(sim, data, i, device_id, topics, models, device_class),
            plan.get(device_id),
            sim.faults,
            device_class,
            sim.seed,
            cores if device_class is not None else None,  # only a class's jobs are timed
        )
        agent.start()
        agents.append(agent)
    return agents


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)

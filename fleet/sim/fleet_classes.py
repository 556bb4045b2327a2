"""A simulated mixed fleet: device classes with a share, a speed, memory and a dropout rate.

A class describes a kind of device (``{name: pi-zero-2w, share: 0.5, speed: 0.15,
memory_mb: 512, dropout: 0.05}``). Each simulated device belongs to one class, chosen by a seeded
permutation of the device ids so that the class sizes follow the shares (largest remainders);
the same seed gives the same fleet. A device of a class:

- reports the class's memory in its ``Hardware`` (``memory_bytes = memory_mb * 2**20``, machine
  ``sim:<name>``) and carries the class name as a tag (so ``budgets: {pi-zero-2w: 0.05}`` and the
  run's ``tags`` can address a class);
- reports a profile that follows its class: the simulation host's measured profile of the run's
  model (``device.profile.measure_profile``, measured once per process) with every time divided
  by the class's speed;
- takes ``compute_s / speed`` wall-clock seconds per training job, where ``compute_s`` is the
  CPU time the job's thread spent on it (building the model, training, the update's deltas): it
  computes at the host's speed, then sleeps the rest before uploading (``SimulatedAgent``; the
  sleep ends early if the job is cancelled). CPU time, not wall time, and one job computing per
  host core at a time (``HostCores``; waiting for a core counts towards the simulated time), so
  that devices simulated side by side on a few host cores do not slow each other's clocks
  (where torch computes on more than one thread, whose CPU time is not the job thread's, the
  job's wall time is taken instead). This is a **wall-clock** simulation, not a virtual clock:
  deadlines, timeouts and the runner behave exactly as with real devices, so the host must keep
  up: the jobs in flight must need less CPU, together, than their simulated times give the
  host's cores (choose speeds well below 1 for large fleets on small hosts). ``speed`` is
  relative to one host core (1.0 = host speed); a class cannot be faster than the host, so
  speeds of 1 and above compute at host speed and report their training time unchanged. The
  update reports the simulated job time as its ``train_s``;
- drops each job with probability ``dropout`` (seeded per run, round and device): it never
  answers that job, as a device that lost power would not.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from device.errors import ConfigError
from device.seeding import derive_seed
from device.wire.messages import (
    DeviceProfile,
    DeviceUpdate,
    Hardware,
    LayerProfile,
    ProfilePoint,
)

log = logging.getLogger(__name__)

__all__ = [
    "DeviceClass",
    "HostCores",
    "JobClock",
    "assign_classes",
    "class_hardware",
    "coerce_classes",
    "drops_job",
    "host_profile",
    "scaled_profile",
    "slow_down",
]

MIB = 2**20


@dataclass(frozen=True)
class DeviceClass:
    """One kind of simulated device.

    ``share``: fraction of the fleet in (0, 1] (the shares of a fleet sum to 1 within 1e-6);
    ``speed``: compute speed relative to the simulation host, > 0 (a job takes
    ``compute_s / speed`` seconds; module docstring); ``memory_mb``: memory reported in the
    device's Hardware, in MiB (> 0); ``dropout``: probability in [0, 1) that the device drops a
    training job without answering.
    """

    name: str
    share: float
    speed: float = 1.0
    memory_mb: int = 1024
    dropout: float = 0.0

    def __post_init__(self) -> None:
        where = f"simulation class {self.name!r}"
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"simulation class name {self.name!r}: use letters, digits, - _ .")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"{where}: share must be in (0, 1], got {self.share}")
        if not self.speed > 0.0 or math.isinf(self.speed):
            raise ValueError(f"{where}: speed must be a positive number, got {self.speed}")
        if self.memory_mb <= 0:
            raise ValueError(f"{where}: memory_mb must be > 0, got {self.memory_mb}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout}")


def coerce_classes(values: Sequence[DeviceClass | Mapping[str, Any]]) -> tuple[DeviceClass, ...]:
    """Classes from dataclasses or mappings (a run file, a launch record); checks that the
    names are distinct and the shares sum to 1. ``ValueError`` names what is wrong (a run
    file's loader turns it into a located ``ConfigError``)."""
    classes = tuple(v if isinstance(v, DeviceClass) else _from_mapping(v) for v in values)
    if not classes:
        return ()
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"simulation classes: names must be distinct, got {names}")
    total = sum(c.share for c in classes)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"simulation classes: shares must sum to 1, got {total:.6g}")
    return classes


def _from_mapping(value: Mapping[str, Any]) -> DeviceClass:
    if not isinstance(value, Mapping):
        raise ValueError(f"simulation class must be a mapping, got {value!r}")
    known = {"name", "share", "speed", "memory_mb", "dropout"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"simulation class {value.get('name')!r}: unknown keys {unknown}; "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        return DeviceClass(**dict(value))
    except TypeError as exc:
        raise ValueError(f"simulation class {value!r}: {exc}") from None


def assign_classes(
    device_ids: Sequence[str], classes: Sequence[DeviceClass], seed: int
) -> dict[str, DeviceClass]:
    """Each device's class (empty without classes): class sizes follow the shares, rounded by
    largest remainder (ties to the earlier class), over a permutation seeded by ``seed``."""
    if not classes:
        return {}
    count = len(device_ids)
    exact = [c.share * count for c in classes]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: count - sum(sizes)]:
        sizes[i] += 1
    rng = np.random.default_rng(derive_seed("classes", seed))
    order = [device_ids[i] for i in rng.permutation(count)]
    plan: dict[str, DeviceClass] = {}
    start = 0
    for cls, size in zip(classes, sizes, strict=True):
        for device_id in order[start : start + size]:
            plan[device_id] = cls
        start += size
    return plan


def class_hardware(cls: DeviceClass, host: Hardware) -> Hardware:
    """The Hardware a device of ``cls`` reports: the host's, with the class's memory."""
    return replace(host, machine=f"sim:{cls.name}", memory_bytes=cls.memory_mb * MIB)


def scaled_profile(profile: DeviceProfile, speed: float) -> DeviceProfile:
    """``profile`` with every time divided by ``speed`` (bytes per second unchanged)."""

    def point(p: ProfilePoint) -> ProfilePoint:
        return ProfilePoint(p.density, p.dense_s / speed, p.sparse_s / speed)

    return replace(
        profile,
        step_overhead_s=profile.step_overhead_s / speed,
        layers=tuple(
            LayerProfile(layer.name, layer.numel, tuple(point(p) for p in layer.points))
            for layer in profile.layers
        ),
    )


@functools.lru_cache(maxsize=4)
def host_profile(
    model: str, input_shape: tuple[int, ...] | None = None, batch_size: int = 32
) -> DeviceProfile | None:
    """This host's measured profile of a model (``ModelRef`` text: a registered name or a
    factory, with its kwargs; ``input_shape`` where the model does not declare one), cached per
    process; its ``model_name`` is that text, as the run's snapshots name the model. None (and a
    warning) when the model cannot be profiled here."""
    from device.model_ref import ModelRef
    from device.profile import measure_profile  # lazy: only a mixed fleet measures

    try:
        ref = ModelRef.parse(model)
        return measure_profile(ref, batch_size=batch_size, repeats=3, input_shape=input_shape)
    except (ValueError, ConfigError, RuntimeError, ImportError) as exc:
        log.warning("no profile for simulated classes: cannot profile %r: %s", model, exc)
        return None


@dataclass(frozen=True)
class JobClock:
    """When a simulated job started: wall seconds (``time.perf_counter``) and CPU seconds of
    the job's thread (``time.thread_time``). Read from the thread that started it."""

    wall: float
    cpu: float

    @classmethod
    def start(cls) -> JobClock:
        return cls(time.perf_counter(), time.thread_time())

    def elapsed_s(self) -> float:
        """Wall seconds since the start."""
        return time.perf_counter() - self.wall

    def compute_s(self) -> float:
        """CPU seconds this thread spent since the start; the wall seconds instead where torch
        computes on several threads (the others' CPU time is not this thread's)."""
        import torch  # the simulated device has it loaded already

        if torch.get_num_threads() > 1:
            return self.elapsed_s()
        return time.thread_time() - self.cpu


class HostCores:
    """The simulation host's cores, lent to the mixed fleet's jobs one job per core at a time.

    Twenty simulated devices computing at once on two cores would slow each other down (cache
    and interpreter contention raise even the CPU time of each job, 1.7x measured for twenty
    jobs of the MNIST mlp), which would distort the simulated clocks. So a class's job takes a
    core before it computes and gives it back when its update is ready, before it sleeps out
    its simulated time; waiting for a core costs no CPU time, and its wall time is part of the
    job's simulated duration (which fails to hide it only when the host cannot keep up).
    ``take`` and ``give_back`` are called from the job's own thread.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"HostCores: count must be at least 1, got {count}")
        self.count = count
        self._free = threading.BoundedSemaphore(count)
        self._held = threading.local()

    @classmethod
    def share_of_host(cls, sharers: int = 1) -> HostCores:
        """This host's usable cores, divided among ``sharers`` processes (at least one each)."""
        return cls(max(1, len(os.sched_getaffinity(0)) // max(1, sharers)))

    def take(self, cancelled: threading.Event) -> bool:
        """Wait for a free core; False (holding none) if the job is cancelled meanwhile."""
        while not self._free.acquire(timeout=0.2):
            if cancelled.is_set():
                return False
        self._held.core = True
        return True

    def give_back(self) -> None:
        """Free this thread's core, if it holds one (idempotent)."""
        if getattr(self._held, "core", False):
            self._held.core = False
            self._free.release()


def slow_down(
    update: DeviceUpdate, cls: DeviceClass, wait: Callable[[float], object], clock: JobClock
) -> DeviceUpdate:
    """A class's job time: ``wait`` (seconds; a cancellable sleep) until ``compute_s / speed``
    has passed since the job started (``clock``), and return the update reporting that
    simulated time as its ``train_s`` (speeds of 1 and above: unchanged)."""
    if cls.speed >= 1.0:
        return update
    simulated = clock.compute_s() / cls.speed
    wait(simulated - clock.elapsed_s())
    return replace(update, train_s=simulated)


def drops_job(seed: int, run_id: str, round_: int, device_id: str, dropout: float) -> bool:
    """Whether a device drops this job (probability ``dropout``, seeded per run/round/device)."""
    if dropout <= 0.0:
        return False
    rng = np.random.default_rng(derive_seed("dropout", seed, run_id, round_, device_id))
    return bool(rng.random() < dropout)

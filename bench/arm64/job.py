"""One real device job over a real broker: the fleet manager here, the device in a subprocess.

:func:`run_job` starts mosquitto on a free loopback port, writes the device's data (random
examples in the device-local npz format, :func:`write_device_files`) and its ``device.yaml``,
starts the device with the given command (the arm64
virtualenv's ``python -m device run`` under qemu, or ``probed_agent.py`` in any interpreter), and
runs a ``fleet.runtime.runner.Runner`` of ``JobSpec.rounds`` rounds with that one device. The
job passes when every round closed with the device's update received and none rejected.

What is measured about the device process: its peak resident set (``VmHWM`` of the host
process, read while it is still running, after the last round), and with probes the corrected
peak (``memory.py``). Densities < 1 run FedDST (``density`` = the global kept fraction, ERK
allocation, one readjustment in the round, as a FedDST round does every ``readjust_every``
rounds); density 1 runs dense FedAvg.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.arm64.memory import MemorySummary, ProbeReader, read_status_kb
from bench.arm64.tools import CheckAbort

__all__ = ["DEVICE_ID", "JobResult", "JobSpec", "run_job", "write_device_files"]

DEVICE_ID = "arm64-pi"


@dataclass(frozen=True)
class JobSpec:
    """A device job: model, density (kept fraction; 1 = dense FedAvg), forced sparse kernels,
    local data and training (200 examples, 2 epochs of batch 20 by default), torch threads, how
    many rounds, the largest MQTT chunk (bytes; 0 = the transport's default), glibc's
    ``MALLOC_ARENA_MAX`` (0 = unset) and ``MALLOC_MMAP_THRESHOLD_`` in KiB (default: the Ansible
    device role's ``fleet_device_malloc_mmap_threshold_kb``; 0 = unset), the device's
    ``torch_onednn`` (``auto`` is oneDNN on here: the host has more than 768 MB; ``disabled``
    is what ``auto`` gives a Zero 2 W), further ``probed_agent.py`` arguments."""

    model: str = "mnist_cnn"
    density: float = 0.2
    kernels: bool = False
    examples: int = 200
    epochs: int = 2
    batch_size: int = 20
    torch_threads: int = 2
    rounds: int = 1
    chunk_bytes: int = 0
    malloc_arena_max: int = 0
    malloc_mmap_threshold_kb: int = 128
    onednn: str = "auto"
    launcher_args: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        kernels = "kernels" if self.kernels else "dense"
        onednn = "" if self.onednn == "auto" else f" oneDNN {self.onednn}"
        return f"{self.model} d={self.density:g} {kernels}{onednn}"


@dataclass(frozen=True)
class JobResult:
    spec: JobSpec
    passed: bool
    reason: str
    machine: str
    rounds: list[dict[str, Any]]
    hwm_kb: int
    memory: MemorySummary | None
    wall_s: float
    loaded: str
    log: Path
    extra: Mapping[str, Any] = field(default_factory=dict)


def write_device_files(work: Path, spec: JobSpec, broker_port: int) -> Path:
    """The device's own data and its ``device.yaml`` under ``work``; returns the config.

    The data is ``spec.examples`` random examples of the model's input shape with labels
    cycling through 0-9, in an uncompressed ``.npz`` (the device-local ``format: npz``: the
    same path for every model, and no scikit-learn for the ``mlp``'s digits shape), all on
    the training side (``eval_fraction: 0``).
    """
    from device.models import model_spec

    model = model_spec(spec.model)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((spec.examples, *model.input_shape), dtype=np.float32)
    y = np.arange(spec.examples, dtype=np.int64) % min(10, model.num_classes)
    np.savez(data / "share.npz", x=x, y=y)
    config: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "broker": {"url": f"mqtt://127.0.0.1:{broker_port}"},
        "data": {
            "format": "npz",
            "path": str(data / "share.npz"),
            "classes": [str(c) for c in range(model.num_classes)],
            "eval_fraction": 0.0,
        },
        "torch_threads": spec.torch_threads,
        "torch_onednn": spec.onednn,
        "profile_on_start": spec.kernels,
        "profile_model": spec.model,
        "model_wait_s": 1800.0,
        "log_level": "INFO",
    }
    path = work / "device.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _run_spec(spec: JobSpec) -> Any:
    from fleet.runtime.runner import RunSpec

    training = {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": 0.01}
    options: dict[str, Any] = {"clients_per_round": 1, "training": training}
    if spec.density < 1.0:
        options |= {"density": spec.density, "readjust_every": 1, "total_rounds": 400}
    return RunSpec(
        run_id=f"arm64-{spec.model}-{int(spec.density * 100)}",
        model_name=spec.model,
        strategy="feddst" if spec.density < 1.0 else "fedavg",
        rounds=spec.rounds,
        clients_per_round=1,
        strategy_options=options,
        round_timeout_s=3600.0,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def run_job(
    device_argv: Sequence[str],
    spec: JobSpec,
    work: Path,
    *,
    probe: bool = False,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 900.0,
) -> JobResult:
    """Run ``spec`` with the device started as ``device_argv + ["--config", CONFIG]`` (plus
    ``--probe-fd N`` with ``probe``, for ``probed_agent.py``). ``CheckAbort`` when mosquitto or
    the fleet manager cannot start; a device that fails is a failed result, not an exception.
    """
    from device.errors import BrokerUnavailableError
    from device.wire.broker import MosquittoBroker
    from device.wire.mqtt import MqttTransport
    from fleet.runtime.runner import Runner
    from fleet.state.store import Store

    work.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(state_dir=work / "broker", allow_anonymous=True)
    try:
        broker.start()
    except BrokerUnavailableError as exc:
        raise CheckAbort(f"mosquitto did not start for the device job: {exc}") from None
    config = write_device_files(work, spec, broker.port)
    log = work / "device.log"
    argv = [*device_argv, "--config", str(config)]
    if spec.kernels:
        argv.append("--force-kernels")  # probed_agent.py only
    if spec.chunk_bytes:
        argv += ["--chunk-bytes", str(spec.chunk_bytes)]  # probed_agent.py only
    argv += spec.launcher_args
    environ = dict(env if env is not None else os.environ)
    if spec.malloc_arena_max:
        environ["MALLOC_ARENA_MAX"] = str(spec.malloc_arena_max)
    environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec.malloc_mmap_threshold_kb:
        environ["MALLOC_MMAP_THRESHOLD_"] = str(spec.malloc_mmap_threshold_kb * 1024)
    pass_fds: tuple[int, ...] = ()
    read_fd = write_fd = -1
    if probe:
        read_fd, write_fd = os.pipe()
        argv += ["--probe-fd", str(write_fd)]
        pass_fds = (write_fd,)
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env=environ,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    reader = None
    if probe:
        os.close(write_fd)
        reader = ProbeReader(proc.pid, read_fd)
        reader.start()
    rounds: list[dict[str, Any]] = []
    machine = ""
    hwm_kb = 0
    reason = ""
    try:
        fleet = MqttTransport("fleet-manager", host=broker.host, port=broker.port, manual_ack=True)
        with Store(work / "state") as store:
            runner = Runner(_run_spec(spec), fleet, store)
            runner.connect()
            deadline = time.monotonic() + startup_timeout_s
            while runner.wait_for_devices(1, timeout_s=2.0) < 1:
                if proc.poll() is not None or time.monotonic() > deadline:
                    reason = (
                        f"the device did not come online (exit {proc.poll()}); "
                        f"its log ends:\n{_tail(log)}"
                    )
                    break
            if not reason:
                reports = runner.run()
                if reader is not None:
                    reader.freeze()
                if proc.poll() is None:
                    hwm_kb = read_status_kb(proc.pid, "VmHWM")
                info = runner.registry.get(DEVICE_ID)
                machine = info.hardware.machine
                for report in reports:
                    rounds.append(
                        {
                            "round": report.round,
                            "received": list(report.received),
                            "rejected": report.rejected,
                            "closed_by": str(report.closed_by),
                            "max_train_s": round(report.max_train_s, 1),
                            "upload_bytes": report.upload_bytes,
                            "download_bytes": report.download_bytes,
                        }
                    )
                complete = len(reports) == spec.rounds and all(
                    r["received"] == [DEVICE_ID] and r["rejected"] == 0 for r in rounds
                )
                if not complete:
                    reason = f"rounds did not close with the device's update accepted: {rounds}"
            fleet.close()
    finally:
        _stop(proc)
        broker.cleanup()
    memory = None
    if reader is not None:
        reader.join()
        memory = reader.summary(hwm_kb)
    loaded = next(
        (line[7:] for line in _tail(log, 400).splitlines() if line.startswith("LOADED ")), ""
    )
    return JobResult(
        spec=spec,
        passed=not reason,
        reason=reason,
        machine=machine,
        rounds=rounds,
        hwm_kb=hwm_kb,
        memory=memory,
        wall_s=time.monotonic() - start,
        loaded=loaded,
        log=log,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """One job from the command line, with the device's phase trace (``--phases``)."""
    import argparse
    import shutil
    import sys
    from typing import get_args

    from bench.arm64.memory import mb
    from device.settings import OneDnn

    parser = argparse.ArgumentParser(
        prog="python -m bench.arm64.job", description="one device job, its memory by phase"
    )
    parser.add_argument("--model", default="femnist_cnn")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--where", choices=("native", "arm64"), default="native")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparsefleet-arm64-job"))
    parser.add_argument("--torch-threads", type=int, default=JobSpec.torch_threads)
    parser.add_argument(
        "--mmap-threshold-kb",
        type=int,
        default=JobSpec.malloc_mmap_threshold_kb,
        help="glibc's MALLOC_MMAP_THRESHOLD_ in KiB (0: unset)",
    )
    parser.add_argument("--onednn", choices=get_args(OneDnn), default=JobSpec.onednn)
    parser.add_argument("launcher_args", nargs="*", help="more probed_agent.py options")
    args = parser.parse_args(argv)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    agent = shutil.copy2(Path(__file__).with_name("probed_agent.py"), work / "probed_agent.py")
    if args.where == "native":
        python = sys.executable
    else:
        from bench.arm64.cache import cache_root

        python = str(cache_root() / "venv" / "bin" / "python")  # built by make arm64-check
    spec = JobSpec(
        model=args.model,
        density=args.density,
        kernels=args.kernels,
        examples=200,
        epochs=1,
        torch_threads=args.torch_threads,
        malloc_mmap_threshold_kb=args.mmap_threshold_kb,
        onednn=args.onednn,
        launcher_args=("--phases", *args.launcher_args),
    )
    result = run_job([python, str(agent)], spec, work / "run", probe=True)
    for line in result.log.read_text(errors="replace").splitlines():
        if line.startswith(("PHASE", "LOADED")):
            print(line)
    corrected = mb(result.memory.guest_peak_kb) if result.memory else 0.0
    print(
        f"{spec.label} on {result.machine}: {'ok' if result.passed else result.reason}; "
        f"peak {mb(result.hwm_kb):.0f} MB raw, {corrected:.0f} MB corrected"
    )
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Footprint of the device on arm64: peak memory of a full round job, and the installed size.

    .venv/bin/python -m bench.arm64.footprint [--parts baseline,site,jobs,validate,settings]
        [--models mlp,mnist_cnn,femnist_cnn] [--densities 1,0.2,0.1] [--report-only]

Figures, not a test (like the other benches). Uses the arm64 environment of ``make arm64-check``
(built if needed, same cache). Every job is a real round over a real mosquitto (``job.py``): the
fleet manager here, the device (``probed_agent.py``: ``fleet-device run`` plus memory probes) in
the arm64 virtualenv under qemu-user, on 200 random examples of the model's input shape (the
device-local npz format), 1 epoch of batch 20, 2 torch threads; densities < 1 are FedDST rounds
with a readjustment, 1 is dense FedAvg.

Parts:

``baseline``
    peak RSS (``VmHWM``) of an idle Python and of ``import torch``: natively on x86, under
    qemu-x86_64 and under qemu-aarch64. The idle difference is the emulator's baseline. Also
    the resident set the split method counts ("corrected", computed inside the process).
``site``
    installed size of the device virtualenv, per distribution (pip's RECORD files, compiled
    bytecode included), and the size of torch's aarch64 wheel.
``jobs``
    each model x density, masked dense and with the sparse kernels forced on every layer that
    has one (at density 1 there are no masks, so no kernels): raw peak (the qemu process's
    ``VmHWM``), idle-corrected (raw minus the emulator's idle baseline) and split-corrected
    (the guest's own mappings only, ``memory.py``).
``validate``
    the correction checked: the same jobs natively on x86 and under qemu-x86_64 (same Python,
    same torch 2.13), where the native peak is known.
``settings``
    what lowers memory, on the two target jobs (femnist_cnn at density 0.1, mnist_cnn at 0.2):
    torch threads 1 (and 4), ``MALLOC_ARENA_MAX=2``, 256 KiB MQTT chunks (femnist), the model
    built without the meta device (``--no-meta-init``), and all of them together.

Results are appended to ``<cache>/work/footprint/results.jsonl`` as each job ends (a long run
can be stopped and resumed: finished entries are skipped); the tables are printed at the end,
or alone with ``--report-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.arm64.cache import cache_root
from bench.arm64.environment import Arm64Env, prepare
from bench.arm64.job import JobSpec, run_job
from bench.arm64.memory import mb
from bench.arm64.tools import EXIT_SETUP, CheckAbort, require_tools

HERE = Path(__file__).resolve().parent
HOST_PYTHON = Path(sys.executable)
QEMU_X86 = "qemu-x86_64-static"
BASE = JobSpec(examples=200, epochs=1, batch_size=20, torch_threads=2)
IDLE = "import time; time.sleep(0.5)"
WITH_TORCH = "import torch, time; time.sleep(0.5)"
HWM = "; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
# The process's own resident kB as the split method counts it (memory.py), computed inside the
# process: under qemu /proc/self/maps lists the guest's mappings, /proc/self/smaps all of them.
GUEST_RSS = """
import re
ranges = [(int(a, 16), int(b, 16)) for a, b in
          re.findall(r"^([0-9a-f]+)-([0-9a-f]+) ", open("/proc/self/maps").read(), re.M)]
total, current = 0, None
for line in open("/proc/self/smaps"):
    head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
    if head and ":" not in line.split(" ", 1)[0]:
        current = (int(head.group(1), 16), int(head.group(2), 16))
    elif line.startswith("Rss:") and any(a < current[1] and current[0] < b for a, b in ranges):
        total += int(line.split()[1])
print(total)
"""


def _key(where: str, spec: JobSpec) -> str:
    return f"{where}:{json.dumps(asdict(spec), sort_keys=True)}"


class Results:
    """The JSON-lines file of finished measurements, keyed so that a rerun skips them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.entries[entry["key"]] = entry

    def add(self, entry: dict[str, Any]) -> None:
        self.entries[entry["key"]] = entry
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")


def _hwm_kb(argv: Sequence[str]) -> int:
    out = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=600, check=True, cwd="/"
    ).stdout
    return int(out.strip().splitlines()[-1])


def part_baseline(env: Arm64Env, results: Results) -> None:
    for label, code in (("idle", IDLE), ("import torch", WITH_TORCH)):
        for where, argv in (
            ("x86 native", [str(HOST_PYTHON)]),
            ("x86 under qemu", [QEMU_X86, str(HOST_PYTHON)]),
            ("arm64 under qemu", [str(env.python)]),
        ):
            key = f"baseline:{label}:{where}"
            if key not in results.entries:
                kb = _hwm_kb([*argv, "-c", code + HWM])
                entry = {"key": key, "part": "baseline", "what": label, "where": where}
                results.add({**entry, "hwm_kb": kb})
            key = f"baseline-guest:{label}:{where}"
            if key not in results.entries:
                kb = _hwm_kb([*argv, "-c", code + "\n" + GUEST_RSS])
                entry = {"key": key, "part": "baseline", "what": f"{label}, corrected"}
                results.add({**entry, "where": where, "hwm_kb": kb})


def _distribution_sizes(site: Path) -> dict[str, int]:
    """Distribution name -> bytes of the files its RECORD lists (what pip installed)."""
    sizes: dict[str, int] = {}
    for record in site.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0]
        total = 0
        for line in record.read_text(errors="replace").splitlines():
            path = site / line.split(",")[0]
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        sizes[name] = total
    return sizes


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def part_site(env: Arm64Env, results: Results) -> None:
    torch_wheels = sorted((env.cache / "wheels").glob("torch-*.whl"))
    results.add(
        {
            "key": "site",
            "part": "site",
            "venv_bytes": _tree_bytes(env.venv),
            "site_bytes": _tree_bytes(env.site_packages),
            "torch_wheel_bytes": torch_wheels[0].stat().st_size if torch_wheels else 0,
            "distributions": _distribution_sizes(env.site_packages),
        }
    )


def _run(
    results: Results, where: str, device_argv: Sequence[str], spec: JobSpec, work: Path
) -> None:
    key = _key(where, spec)
    if key in results.entries:
        return
    label = f"{where}: {spec.label} {spec.launcher_args or ''}".strip()
    print(f"  {label} ...", flush=True)
    job_dir = work / "jobs" / f"{len(results.entries):03d}"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    agent = shutil.copy2(HERE / "probed_agent.py", job_dir / "probed_agent.py")
    result = run_job([*device_argv, str(agent)], spec, job_dir / "run", probe=True)
    memory = result.memory
    entry = {
        "key": key,
        "part": "job",
        "where": where,
        "spec": asdict(spec),
        "passed": result.passed,
        "reason": result.reason[-1500:],
        "machine": result.machine,
        "hwm_kb": result.hwm_kb,
        "memory": asdict(memory) if memory else None,
        "guest_peak_kb": memory.guest_peak_kb if memory else 0,
        "rounds": result.rounds,
        "wall_s": round(result.wall_s, 1),
        "loaded": json.loads(result.loaded) if result.loaded else {},
    }
    results.add(entry)
    status = "ok" if result.passed else "FAILED: " + result.reason[-300:]
    print(
        f"  {label}: raw {mb(result.hwm_kb):.0f} MB, corrected {mb(entry['guest_peak_kb']):.0f}"
        f" MB, {result.wall_s:.0f} s, {status}",
        flush=True,
    )


def job_specs(models: Sequence[str], densities: Sequence[float]) -> Iterator[JobSpec]:
    for model in models:
        for density in densities:
            # torch's default, then what torch_onednn: auto gives a device below 768 MB.
            for onednn in ("auto", "disabled"):
                for kernels in (False, True) if density < 1.0 else (False,):
                    yield replace(
                        BASE, model=model, density=density, kernels=kernels, onednn=onednn
                    )


def setting_specs() -> Iterator[JobSpec]:
    """Each memory setting alone on the two target jobs (femnist_cnn 0.1, mnist_cnn 0.2), then
    all of them together."""
    lean = ("--no-meta-init",)
    for target in (
        replace(BASE, model="femnist_cnn", density=0.1),
        replace(BASE, model="mnist_cnn", density=0.2),
    ):
        yield replace(target, torch_threads=1)
        if target.model == "femnist_cnn":
            yield replace(target, torch_threads=4)
            yield replace(target, chunk_bytes=256 * 1024)
        yield replace(target, malloc_arena_max=2)
        yield replace(target, malloc_mmap_threshold_kb=0)  # glibc's dynamic threshold
        yield replace(target, malloc_mmap_threshold_kb=1024)  # the role's default until 12-06
        yield replace(target, launcher_args=lean)
        yield replace(target, torch_threads=1, malloc_arena_max=2, launcher_args=lean)
        yield replace(target, kernels=True, torch_threads=1, malloc_arena_max=2, launcher_args=lean)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="device footprint on arm64 (figures)")
    parser.add_argument("--parts", default="baseline,site,jobs,validate,settings")
    parser.add_argument("--models", default="mlp,mnist_cnn,femnist_cnn")
    parser.add_argument("--densities", default="1,0.2,0.1")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    models = args.models.split(",")
    densities = [float(d) for d in args.densities.split(",")]
    try:
        tools = require_tools()
        env = prepare(cache_root(), tools, report=print)
    except CheckAbort as exc:
        print(f"footprint: {exc}", file=sys.stderr)
        return EXIT_SETUP
    work = env.cache / "work" / "footprint"
    results = Results(work / "results.jsonl")
    if not args.report_only:
        start = time.monotonic()
        arm64 = [str(env.python)]
        if "baseline" in parts:
            part_baseline(env, results)
        if "site" in parts:
            part_site(env, results)
        if "jobs" in parts:
            for spec in job_specs(models, densities):
                _run(results, "arm64 qemu", arm64, spec, work)
        if "validate" in parts:
            for spec in (
                replace(BASE, model="mnist_cnn", density=0.2),
                replace(BASE, model="femnist_cnn", density=0.1),
            ):
                _run(results, "x86 native", [str(HOST_PYTHON)], spec, work)
                _run(results, "x86 qemu", [QEMU_X86, str(HOST_PYTHON)], spec, work)
        if "settings" in parts:
            for spec in setting_specs():
                _run(results, "arm64 qemu", arm64, spec, work)
        print(f"footprint: measured in {time.monotonic() - start:.0f} s")
    from bench.arm64.footprint_report import report

    print(report(list(results.entries.values())))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

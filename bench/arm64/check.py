"""``make arm64-check``: the device side installed, imported, tested and run on arm64 (qemu-user).

    .venv/bin/python -m bench.arm64.check [--steps smoke,tests,job] [--pytest-args ARGS]

1. **environment**: builds or reuses the cached Debian bookworm arm64 root and the device
   virtualenv in it, installed as the Ansible device role installs one (its torch pin, then the
   sparsefleet wheel of this checkout with its dependencies), plus pytest in a separate test
   site (``environment.py``; cache under ``$SPARSEFLEET_ARM64_CACHE`` or
   ``~/.cache/sparsefleet-arm64``; half-built stages are detected and rebuilt).
2. **smoke**: the device side imports on arm64, torch is the pinned CPU-only build
   (``smoke.py``).
3. **tests**: the device-side unit tests (tests/device, tests/wire) under qemu, from a copy of
   the tests run against the installed wheel, minus :data:`DESELECTED` (each with its reason).
4. **job**: one real round: mosquitto on loopback, the fleet manager's ``Runner`` here (x86),
   the arm64 agent started as ``python -m device run --config device.yaml``; it fails unless
   the round closes with the arm64 device's update accepted.

Every step runs even when an earlier one failed (after the environment); the summary lists
each with its time, and the exit status is 0 only when all passed. A missing tool or no access
to the package sources ends the check at once with one message (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.arm64.cache import cache_root
from bench.arm64.environment import Arm64Env, prepare
from bench.arm64.tools import EXIT_SETUP, CheckAbort, require_tools

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: Unit tests left out on arm64, with the reason. Everything else in tests/device and tests/wire
#: runs: about 3.5 minutes under qemu on the 2-core development machine (8.5 with these).
DESELECTED: dict[str, str] = {
    "tests/wire/test_generated.py": "regenerates code with grpcio-tools, a development tool",
    "tests/wire/test_protoc_decode.py": "runs protoc, a development tool",
    "tests/device/test_identity.py::test_the_fleet_side_uses_the_same_rule": (
        "imports the fleet manager (fleet.ops), which a device does not install"
    ),
    "tests/device/test_cli_errors.py": (
        "each of its ~25 cases starts a new `python -m device` (15-25 s of emulated start-up "
        "each, 5 of the 8.5 minutes); the job step runs the arm64 CLI for real"
    ),
}
TEST_DIRS = ("tests/device", "tests/wire")
#: The share of MNIST the tests/device data tests look for (skipped when absent).
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@dataclass(frozen=True)
class StepResult:
    name: str
    passed: bool
    seconds: float
    detail: str


def _scratch(env: Arm64Env, name: str) -> Path:
    """A fresh directory under the cache's ``work/`` (never in the repository)."""
    path = env.cache / "work" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def step_smoke(env: Arm64Env) -> tuple[bool, str]:
    work = _scratch(env, "smoke")
    script = shutil.copy2(HERE / "smoke.py", work / "smoke.py")
    expected = env.torch_requirement.split("==", 1)[1].strip()
    proc = subprocess.run(
        [str(env.python), str(script), expected],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return False, f"no output (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    facts = json.loads(lines[-1])
    detail = (
        f"{facts['machine']}, Python {facts['python']}, torch {facts['torch']} "
        f"(cuda {facts['torch_cuda']}), import torch {facts['import_torch_s']} s, "
        f"device side {facts['import_device_s']} s"
    )
    if facts["failures"]:
        detail += "; FAILED: " + "; ".join(facts["failures"])
    return proc.returncode == 0, detail


def step_tests(env: Arm64Env, pytest_args: Sequence[str]) -> tuple[bool, str]:
    work = _scratch(env, "tests")
    # The whole tests/ tree (small): the device tests import helpers from elsewhere in it.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    shutil.copytree(REPO / "examples", work / "examples", ignore=ignore)  # read by test_cli
    shutil.copy2(REPO / "pyproject.toml", work / "pyproject.toml")  # pytest's settings
    argv = [str(env.python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "900"]
    argv += ["--durations", "40"]  # in the log: where the emulated minutes go
    for node in DESELECTED:
        argv += ["--deselect", node]
    argv += [*(pytest_args or TEST_DIRS)]
    environ = {**os.environ, "PYTHONPATH": str(env.testsite)}
    if SHARED_MNIST.is_dir():
        environ["SPARSEFLEET_MNIST_DIR"] = str(SHARED_MNIST)
    log = env.logs / "tests.log"
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run(
            argv, cwd=work, env=environ, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else "(no output)"
    detail = summary + "".join(f"\n      {line}" for line in failed) + f"\n      log: {log}"
    return proc.returncode == 0, detail


def step_job(env: Arm64Env) -> tuple[bool, str]:
    from bench.arm64.job import JobSpec, run_job
    from bench.arm64.memory import mb

    spec = JobSpec(model="mnist_cnn", density=0.2, examples=100, epochs=1, rounds=1)
    work = _scratch(env, "job")
    result = run_job([str(env.python), "-m", "device", "run"], spec, work)
    shutil.copy2(result.log, env.logs / "job-device.log")
    detail = (
        f"{spec.label}, 1 round, device on {result.machine or '?'}: "
        f"{'update accepted' if result.passed else result.reason}; device peak RSS "
        f"{mb(result.hwm_kb):.0f} MB raw (emulator included); {result.wall_s:.0f} s; "
        f"device log: {env.logs / 'job-device.log'}"
    )
    passed = result.passed and result.machine == "aarch64"
    if result.passed and result.machine != "aarch64":
        detail += f"; FAILED: the device reported machine {result.machine!r}"
    return passed, detail


def run_steps(
    steps: Sequence[tuple[str, Callable[[], tuple[bool, str]]]], report: Callable[[str], None]
) -> list[StepResult]:
    results = []
    for name, step in steps:
        report(f"[{name}] ...")
        start = time.monotonic()
        try:
            passed, detail = step()
        except CheckAbort:
            raise
        except Exception as exc:  # a broken step is a failed step; the others still run
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        result = StepResult(name, passed, time.monotonic() - start, detail)
        report(f"[{name}] {'PASS' if passed else 'FAIL'} ({result.seconds:.0f} s): {detail}")
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the device side on arm64 under qemu-user")
    parser.add_argument("--steps", default="smoke,tests,job", help="comma-separated subset")
    parser.add_argument("--pytest-args", default="", help="instead of tests/device tests/wire")
    args = parser.parse_args(argv)
    wanted = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(wanted) - {"smoke", "tests", "job"})
    if unknown:
        parser.error(f"unknown steps {unknown}; known: smoke, tests, job")

    def report(line: str) -> None:
        print(line, flush=True)

    start = time.monotonic()
    try:
        tools = require_tools()
        cache = cache_root()
        report(f"[environment] cache {cache}")
        env = prepare(cache, tools, report=report)
        report(f"[environment] ready ({time.monotonic() - start:.0f} s): {env.python}")
        available: dict[str, Callable[[], tuple[bool, str]]] = {
            "smoke": lambda: step_smoke(env),
            "tests": lambda: step_tests(env, shlex.split(args.pytest_args)),
            "job": lambda: step_job(env),
        }
        results = run_steps([(name, available[name]) for name in wanted], report)
    except CheckAbort as exc:
        print(f"arm64-check: {exc}", file=sys.stderr)
        return EXIT_SETUP
    total = time.monotonic() - start
    passed = all(r.passed for r in results)
    report(f"arm64-check: {'PASS' if passed else 'FAIL'} in {total:.0f} s")
    for r in results:
        report(f"  {r.name:6s} {'PASS' if r.passed else 'FAIL'} {r.seconds:6.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The arm64 environment of the check: a Debian bookworm arm64 userland and, in it, the device
virtualenv exactly as the Ansible device role builds one on a Raspberry Pi, run under qemu-user.

Stages (each cached with a completion marker, see ``cache.py``; the paths are under the cache
root):

``root/``
    ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv
    bookworm``, then every fetched package unpacked with ``dpkg-deb -x`` (the second stage of a
    foreign debootstrap would need binfmt_misc or a chroot, which containers do not offer; the
    unpacked packages are all Python needs). The Debian mirror is ``$SPARSEFLEET_ARM64_MIRROR``,
    else the one apt uses here, else debootstrap's default.
``wheels/``
    the aarch64 wheels, fetched by pip *running on arm64* (markers evaluated for aarch64:
    ``pip download --platform`` on x86 would evaluate them for x86 and ask for CUDA packages).
``venv/``
    ``python3 -m venv`` (arm64), whose ``bin/python3.11`` (``python``, ``python3`` link to it)
    is then a small shell script running the
    arm64 interpreter under ``qemu-aarch64-static -cpu cortex-a72 -L root -0 <that script>``:
    Python takes the script for its executable, so ``sys.executable``, subprocesses, the
    entry-point scripts (``bin/fleet-device``) and pip all work as in a native virtualenv. The
    CPU is a Raspberry Pi 4's (ARMv8.0, no SVE), not qemu's default "max". Then, as the role
    does, ``pip install <torch pin of the role>`` and ``pip install <the sparsefleet wheel>``
    with its dependencies (offline, from ``wheels/``).
``testsite/``
    pytest, pytest-timeout, hypothesis and scikit-learn (digits), installed with ``--target``
    and put on PYTHONPATH for the unit tests only, so that the device virtualenv stays what a
    device gets.

The sparsefleet wheel is built from this checkout on every run (``pip wheel --no-deps`` on a
copy of the tree, so the checkout gets no build files) and reinstalled into the virtualenv with
``--no-deps``; the virtualenv is rebuilt only when the torch pin or the wheel's requirements
change.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.arm64.cache import Stage
from bench.arm64.tools import CheckAbort, run_logged

__all__ = [
    "MIRROR_ENV",
    "PYTHON_VERSION",
    "QEMU_CPU",
    "TEST_TOOLS",
    "Arm64Env",
    "apt_mirror",
    "build_sparsefleet_wheel",
    "prepare",
    "role_torch_requirement",
    "wheel_requirements",
]

REPO = Path(__file__).resolve().parents[2]
ROLE_DEFAULTS = REPO / "ansible" / "roles" / "fleet_device" / "defaults" / "main.yml"
MIRROR_ENV = "SPARSEFLEET_ARM64_MIRROR"
SUITE = "bookworm"
#: Debian bookworm's Python, which Raspberry Pi OS (bookworm) has too.
PYTHON_VERSION = "3.11"
#: The emulated CPU: a Raspberry Pi 4's core (a Zero 2 W or a 3B has Cortex-A53: the same ISA).
QEMU_CPU = "cortex-a72"
#: What the unit tests need beyond the device's own dependencies (scikit-learn: the bundled
#: digits dataset, which the device tests use and a device does not install).
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "scikit-learn>=1.4")

_NETWORK_HINT_PIP = (
    "The aarch64 wheels come from the Python package index as pip here is configured to reach "
    "it ('pip config list'); check that this machine can reach it"
)


@dataclass(frozen=True)
class Arm64Env:
    """A ready arm64 environment (every stage complete, the current wheel installed)."""

    cache: Path
    root: Path
    venv: Path
    testsite: Path
    torch_requirement: str
    wheel: Path

    @property
    def python(self) -> Path:
        """The virtualenv's interpreter: runs the arm64 Python under qemu (host-executable)."""
        return self.venv / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{PYTHON_VERSION}" / "site-packages"

    @property
    def logs(self) -> Path:
        return self.cache / "logs"


def role_torch_requirement(defaults: Path = ROLE_DEFAULTS, machine: str = "aarch64") -> str:
    """The torch requirement the Ansible device role installs on ``machine`` (its pin table)."""
    import yaml

    data = yaml.safe_load(defaults.read_text(encoding="utf-8"))
    pins = data.get("fleet_device_torch_pins", {})
    requirement = str(pins.get(machine, {}).get("requirement", ""))
    if not re.match(r"^torch\s*==\s*[0-9]", requirement):
        raise CheckAbort(
            f"{defaults}: fleet_device_torch_pins has no exact torch pin for {machine} "
            f"(got {requirement!r})"
        )
    return requirement


def apt_mirror(
    environ: Mapping[str, str] = os.environ, sources_dir: Path = Path("/etc/apt")
) -> str | None:
    """``$SPARSEFLEET_ARM64_MIRROR``, else the first Debian archive apt uses here (a ``URIs:``
    line of a deb822 ``.sources`` file, or a ``deb URI bookworm ...`` line), else None."""
    configured = environ.get(MIRROR_ENV, "").strip()
    if configured:
        return configured
    files = sorted(sources_dir.glob("sources.list.d/*.sources"))
    for path in files:
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            suites = re.search(r"^Suites:\s*(.+)$", block, re.MULTILINE)
            uris = re.search(r"^URIs:\s*(\S+)", block, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    for path in [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return None


def build_sparsefleet_wheel(work: Path, log: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of this checkout's ``device``, ``fleet``,
    ``pyproject.toml`` and ``README.md``; returns the wheel (in ``work/dist``)."""
    src, dist = work / "src", work / "dist"
    for path in (src, dist):
        shutil.rmtree(path, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("device", "fleet"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    run_logged(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--no-index", "-w", str(dist), str(src)),
        ],
        log,
        what="building the sparsefleet wheel",
        hint="Run 'make install' first (the build uses this virtualenv's setuptools)",
    )
    wheels = sorted(dist.glob("sparsefleet-*.whl"))
    if len(wheels) != 1:
        raise CheckAbort(f"building the sparsefleet wheel left {len(wheels)} wheels in {dist}")
    return wheels[0]


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA without extras (the device's)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode("utf-8")
    lines = re.findall(r"^Requires-Dist:\s*(.+)$", metadata, re.MULTILINE)
    return sorted(line.strip() for line in lines if "extra ==" not in line)


def _qemu_wrapper(qemu: str, root: Path) -> str:
    """The virtualenv's ``bin/python3``: the arm64 interpreter under qemu, named as itself."""
    interpreter = root / "usr" / "bin" / f"python{PYTHON_VERSION}"
    return (
        "#!/bin/sh\n"
        "# The arm64 Python of the SparseFleet arm64 check (bench/arm64/environment.py): Debian's\n"
        "# arm64 interpreter under qemu-user, which takes this file for its executable.\n"
        f'exec {shlex.quote(qemu)} -cpu {QEMU_CPU} -L {shlex.quote(str(root))} -0 "$0" '
        f'{shlex.quote(str(interpreter))} "$@"\n'
    )


def _build_root(stage: Stage, tools: Mapping[str, str], log: Path, mirror: str | None) -> None:
    root = stage.path
    argv = [tools["debootstrap"], "--foreign", "--arch=arm64", "--variant=minbase"]
    argv += ["--include=python3,python3-venv", SUITE, str(root)]
    where = mirror or "debootstrap's default mirror"
    run_logged(
        argv + ([mirror] if mirror else []),
        log,
        what=f"debootstrap of Debian {SUITE} arm64 from {where}",
        hint=(
            "Check that this machine can reach the Debian package source apt uses (or set "
            f"{MIRROR_ENV} to a reachable Debian mirror); debootstrap must run as root"
        ),
        timeout_s=1800,
    )
    debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    if not debs:
        raise CheckAbort(f"debootstrap fetched no packages into {root} (see {log})")
    for deb in debs:
        run_logged(
            [tools["dpkg-deb"], "-x", str(deb), str(root)],
            log,
            what=f"unpacking {deb.name}",
            hint="The package file may be truncated; the root is rebuilt on the next run",
        )
        deb.unlink()  # 40 MB of archives that nothing reads again
    python = root / "usr" / "bin" / f"python{PYTHON_VERSION}"
    out = run_logged(
        [
            *(tools["qemu-aarch64-static"], "-cpu", QEMU_CPU, "-L", str(root), str(python)),
            *("-c", "import platform; print(platform.machine())"),
        ],
        log,
        what="starting the arm64 Python under qemu",
        hint="qemu-user-static may be too old for this Python",
    )
    if out.strip().splitlines()[-1:] != ["aarch64"]:
        raise CheckAbort(f"the arm64 Python under qemu reports {out.strip()!r}, not aarch64")


def _pip(env: Arm64Env, *args: str, what: str, hint: str) -> str:
    environ = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return run_logged(
        [str(env.python), "-m", "pip", *args],
        env.logs / "pip.log",
        what=what,
        hint=hint,
        env=environ,
        timeout_s=3600,
    )


def _build_venv(env: Arm64Env, stage: Stage, wheels: Stage, qemu: str) -> None:
    root, venv = env.root, env.venv
    interpreter = root / "usr" / "bin" / f"python{PYTHON_VERSION}"
    run_logged(
        [
            *(qemu, "-cpu", QEMU_CPU, "-L", str(root), str(interpreter)),
            *("-m", "venv", "--without-pip", str(venv)),
        ],
        env.logs / "venv.log",
        what="creating the arm64 virtualenv",
        hint="The arm64 root may be damaged; remove it to rebuild it",
    )
    bin_dir = venv / "bin"
    wrapper = bin_dir / f"python{PYTHON_VERSION}"
    for name in ("python", "python3", wrapper.name):
        (bin_dir / name).unlink(missing_ok=True)
    wrapper.write_text(_qemu_wrapper(qemu, root), encoding="utf-8")
    wrapper.chmod(0o755)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(wrapper.name)
    run_logged(
        [str(env.python), "-m", "ensurepip"],
        env.logs / "venv.log",
        what="installing pip into the arm64 virtualenv (ensurepip)",
        hint="Debian's python3-venv ships the pip wheel ensurepip installs",
    )
    if not wheels.is_complete():
        wheels.reset()
        _pip(
            env,
            *("download", "--only-binary=:all:", "--no-cache-dir", "-d", str(wheels.path)),
            *(env.torch_requirement, str(env.wheel)),
            what="downloading the aarch64 wheels",
            hint=_NETWORK_HINT_PIP,
        )
        wheels.mark_complete()
    offline = ("--no-index", "--find-links", str(wheels.path))
    # The role's two installs: its torch pin, then the wheel with its dependencies.
    _pip(env, "install", *offline, env.torch_requirement, what="pip install torch", hint="")
    _pip(env, "install", *offline, str(env.wheel), what="pip install sparsefleet", hint="")


def _distribution_name(dist_info: Path) -> str:
    return re.sub(r"[-_.]+", "-", dist_info.name.split("-")[0]).lower()


def drop_duplicates(testsite: Path, site_packages: Path) -> list[str]:
    """Remove from ``testsite`` every distribution the virtualenv has too (numpy, pulled in by
    scikit-learn): the tests must import the device's own, not a second copy."""
    installed = {_distribution_name(d) for d in site_packages.glob("*.dist-info")}
    dropped = []
    for dist_info in sorted(testsite.glob("*.dist-info")):
        if _distribution_name(dist_info) not in installed:
            continue
        record = dist_info / "RECORD"
        for line in record.read_text(encoding="utf-8").splitlines():
            path = testsite / line.split(",")[0]
            if path.is_file() or path.is_symlink():
                path.unlink()
        shutil.rmtree(dist_info, ignore_errors=True)
        dropped.append(_distribution_name(dist_info))
    for directory in sorted(testsite.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    return dropped


def _build_testsite(env: Arm64Env) -> None:
    _pip(
        env,
        *("install", "--no-cache-dir", "--no-compile", "--target", str(env.testsite)),
        *TEST_TOOLS,
        what="installing pytest into the arm64 test site",
        hint=_NETWORK_HINT_PIP,
    )
    drop_duplicates(env.testsite, env.site_packages)


def prepare(
    cache: Path,
    tools: Mapping[str, str],
    *,
    report: Callable[[str], None] = print,
    environ: Mapping[str, str] = os.environ,
) -> Arm64Env:
    """Build what is missing (or half-built, or stale) and install the current wheel."""
    logs = cache / "logs"
    cache.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror(environ)
    root_key: dict[str, Any] = {"suite": SUITE, "arch": "arm64", "variant": "minbase"}
    root_key |= {"include": ["python3", "python3-venv"], "mirror": mirror or ""}
    root = Stage(cache / "root", root_key)
    torch_req = role_torch_requirement()
    wheel = build_sparsefleet_wheel(cache / "build", logs / "wheel.log")
    requires = wheel_requirements(wheel)
    deps_key = {"torch": torch_req, "requires": requires}
    wheels = Stage(cache / "wheels", deps_key)
    venv = Stage(cache / "venv", {"root": root_key, "cpu": QEMU_CPU, **deps_key})
    # The test site is deduplicated against the virtualenv: a new virtualenv, a new test site.
    testsite = Stage(cache / "testsite", {"venv": dict(venv.key), "tools": list(TEST_TOOLS)})
    env = Arm64Env(cache, root.path, venv.path, testsite.path, torch_req, wheel)
    builds: tuple[tuple[Stage, Callable[[], None]], ...] = (
        (root, lambda: _build_root(root, tools, logs / "root.log", mirror)),
        (venv, lambda: _build_venv(env, venv, wheels, tools["qemu-aarch64-static"])),
        (testsite, lambda: _build_testsite(env)),
    )
    for stage, build in builds:
        state = stage.state()
        if state == "complete":
            report(f"  {stage.path.name}: cached")
            continue
        report(f"  {stage.path.name}: {state}, building")
        if stage is root:  # everything else lives in the root's interpreter
            for other in (venv, testsite):
                if other.path.exists():
                    Stage(other.path, {}).reset()
        stage.reset()
        build()
        stage.mark_complete()
    _pip(
        env,
        *("install", "--no-index", "--no-deps", "--force-reinstall", str(wheel)),
        what="installing this checkout's sparsefleet wheel",
        hint="",
    )
    return env

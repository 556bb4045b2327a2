"""The arm64 check's own logic, without qemu: cache stages and its one-message failures.

``make arm64-check`` caches a Debian root and a virtualenv of several hundred MB; a build that
was interrupted must be detected and rebuilt, never trusted (a virtualenv without torch would
fail far from the cause). And a machine without qemu or debootstrap must be told in one line
what to install, not shown a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

from bench.arm64 import check  # noqa: E402
from bench.arm64.cache import MARKER, Stage, cache_root  # noqa: E402
from bench.arm64.environment import (  # noqa: E402
    apt_mirror,
    drop_duplicates,
    role_torch_requirement,
)
from bench.arm64.memory import breakdown, guest_ranges, smaps_rows, split_rss  # noqa: E402
from bench.arm64.tools import (  # noqa: E402
    EXIT_SETUP,
    REQUIRED_TOOLS,
    CheckAbort,
    Tool,
    require_tools,
    run_logged,
)

KEY = {"suite": "bookworm", "torch": "torch==2.7.1"}


def test_a_stage_without_directory_is_missing(tmp_path: Path) -> None:
    stage = Stage(tmp_path / "venv", KEY)
    assert stage.state() == "missing"
    assert not stage.is_complete()


def test_a_stage_is_complete_only_after_its_marker(tmp_path: Path) -> None:
    """Files without the marker are a build that stopped half-way, whatever they contain."""
    stage = Stage(tmp_path / "venv", KEY)
    stage.reset()
    (stage.path / "bin").mkdir()
    (stage.path / "bin" / "python").write_text("#!/bin/sh\n")
    assert stage.state() == "half-built"
    stage.mark_complete()
    assert stage.state() == "complete"
    assert Stage(tmp_path / "venv", dict(KEY)).is_complete()  # a new run, the same inputs


def test_a_marker_of_other_inputs_is_stale(tmp_path: Path) -> None:
    """A new torch pin must rebuild the virtualenv, not reuse the old one."""
    Stage(tmp_path / "venv", KEY).reset()
    Stage(tmp_path / "venv", KEY).mark_complete()
    other = Stage(tmp_path / "venv", {**KEY, "torch": "torch==2.8.0"})
    assert other.state() == "stale"
    assert not other.is_complete()


def test_reset_removes_a_half_built_stage_whole(tmp_path: Path) -> None:
    stage = Stage(tmp_path / "root", KEY)
    stage.reset()
    (stage.path / "usr" / "lib").mkdir(parents=True)
    (stage.path / "usr" / "lib" / "partial.so").write_bytes(b"\0" * 10)
    stage.reset()
    assert list(stage.path.iterdir()) == []
    assert stage.state() == "half-built"


def test_marker_is_written_atomically(tmp_path: Path) -> None:
    """The marker appears whole or not at all (a temporary file renamed into place)."""
    stage = Stage(tmp_path / "wheels", KEY)
    stage.reset()
    stage.mark_complete()
    assert sorted(p.name for p in stage.path.iterdir()) == [MARKER]


def test_cache_root_is_outside_the_repository_by_default(tmp_path: Path) -> None:
    assert not cache_root({}).is_relative_to(REPO)
    assert cache_root({"SPARSEFLEET_ARM64_CACHE": str(tmp_path / "c")}) == tmp_path / "c"


def test_missing_tools_are_named_in_one_message_with_the_apt_command() -> None:
    def which(command: str) -> str | None:
        return None if command in ("qemu-aarch64-static", "debootstrap") else f"/bin/{command}"

    with pytest.raises(CheckAbort) as caught:
        require_tools(REQUIRED_TOOLS, which=which, search_dirs=())
    message = str(caught.value)
    assert "qemu-aarch64-static" in message and "debootstrap" in message
    assert "apt-get install qemu-user-static debootstrap" in message
    assert "\n" not in message


def test_present_tools_are_returned_by_path() -> None:
    tools = (Tool("sh", "dash", "a shell"),)
    assert require_tools(tools, which=lambda c: f"/usr/bin/{c}") == {"sh": "/usr/bin/sh"}


def test_the_check_reports_a_missing_tool_without_a_traceback(tmp_path: Path) -> None:
    """The entry point itself: PATH without qemu -> one line on stderr, exit 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    proc = subprocess.run(
        [str(bin_dir / "python"), "-m", "bench.arm64.check", "--steps", "smoke"],
        cwd=REPO,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if Path("/usr/sbin/qemu-aarch64-static").exists() or Path("/sbin/dpkg-deb").exists():
        pytest.skip("the check also searches /usr/sbin and /sbin, where these tools are here")
    assert proc.returncode == EXIT_SETUP, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arm64-check: make arm64-check needs"), lines
    assert "apt-get install" in lines[0]


def test_a_failing_command_becomes_one_message_with_its_error(tmp_path: Path) -> None:
    """An unreachable package source shows up as the tool's own error line plus the hint."""
    script = "print('I: Retrieving InRelease'); print('E: Failed getting release file'); exit(1)"
    with pytest.raises(CheckAbort) as caught:
        run_logged(
            [sys.executable, "-c", script],
            tmp_path / "root.log",
            what="debootstrap",
            hint="Check access to the Debian package source",
        )
    message = str(caught.value)
    assert message.startswith("debootstrap failed (exit 1): E: Failed getting release file.")
    assert "Check access to the Debian package source" in message
    assert "Retrieving" in (tmp_path / "root.log").read_text()


def test_a_command_that_cannot_start_is_one_message(tmp_path: Path) -> None:
    with pytest.raises(CheckAbort, match="could not start"):
        run_logged([str(tmp_path / "absent")], tmp_path / "log", what="x", hint="install x")


def test_the_check_installs_the_roles_aarch64_pin() -> None:
    """The virtualenv is built with the device role's own pin: CPU-only torch on aarch64."""
    assert role_torch_requirement() == "torch==2.7.1"


def test_the_mirror_is_the_one_apt_uses(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
    )
    assert apt_mirror({}, tmp_path) == "http://mirror.invalid/debian"
    assert apt_mirror({"SPARSEFLEET_ARM64_MIRROR": "http://other.invalid/d"}, tmp_path) == (
        "http://other.invalid/d"
    )
    assert apt_mirror({}, tmp_path / "nothing") is None


def _fake_dist(site: Path, name: str, version: str, files: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    for relative, text in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(text)
    records = [*files, f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in records))


def test_the_test_site_never_shadows_the_devices_packages(tmp_path: Path) -> None:
    """scikit-learn brings its own numpy into the test site, which is first on PYTHONPATH: it
    is removed, so the tests run against the numpy the device has."""
    site, testsite = tmp_path / "site", tmp_path / "testsite"
    _fake_dist(site, "numpy", "2.4.6", {"numpy/__init__.py": "device"})
    _fake_dist(testsite, "numpy", "2.3.0", {"numpy/__init__.py": "test", "numpy/x/y.py": ""})
    _fake_dist(testsite, "scikit_learn", "1.8.0", {"sklearn/__init__.py": ""})
    assert drop_duplicates(testsite, site) == ["numpy"]
    assert sorted(p.name for p in testsite.iterdir()) == ["scikit_learn-1.8.0.dist-info", "sklearn"]


def test_every_deselected_test_names_a_reason() -> None:
    assert all(reason.strip() for reason in check.DESELECTED.values())
    assert all((REPO / node.split("::")[0]).is_file() for node in check.DESELECTED)


# -- the memory split -----------------------------------------------------------------------

SMAPS = b"""00400000-00500000 r-xp 00000000 fe:00 1   /usr/bin/python3.11
Size:               1024 kB
Rss:                 600 kB
Pss:                 600 kB
Anonymous:             0 kB
00a00000-00c00000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2000 kB
Anonymous:          2000 kB
7f0000000000-7f0008000000 rwxp 00000000 00:00 0
Size:             131072 kB
Rss:              120000 kB
Anonymous:        120000 kB
7f1000000000-7f1000100000 r--p 00000000 fe:00 2   /usr/bin/qemu-aarch64-static
Size:               1024 kB
Rss:                1000 kB
Anonymous:             8 kB
"""
GUEST_MAPS = b"""00400000-00500000 r-xp 00000000 fe:00 1   /usr/bin/python3.11
00a00000-00c00000 rw-p 00000000 00:00 0
"""


def test_mappings_the_guest_does_not_see_are_the_emulators() -> None:
    """Under qemu-user the guest's maps list its own mappings only; the rest (translated code,
    qemu itself) is the emulator's and is left out of the corrected figure."""
    rows = smaps_rows(SMAPS)
    assert [(rss, anon) for _, _, rss, anon in rows] == [
        (600, 0),
        (2000, 2000),
        (120000, 120000),
        (1000, 8),
    ]
    assert split_rss(rows, guest_ranges(GUEST_MAPS)) == (2600, 121000, 2000)


def test_natively_everything_is_the_process_itself() -> None:
    """Natively /proc/self/maps is the whole process: the emulator share is 0, so the method
    gives the plain resident set (the check that validates it on x86)."""
    rows = smaps_rows(SMAPS)
    everything = guest_ranges(SMAPS)  # the smaps headers are maps lines
    assert split_rss(rows, everything) == (123600, 0, 122008)


def test_the_peak_is_broken_down_by_what_holds_it() -> None:
    """Under qemu the guest's brk heap is the unlabelled mapping low in the address space."""
    assert breakdown(SMAPS, guest_ranges(GUEST_MAPS)) == {
        "other files (python, libc, extensions)": 600,
        "heap (brk: Python objects, small allocations)": 2000,
    }


def test_a_jobs_device_config_is_one_the_agent_accepts(tmp_path: Path) -> None:
    """The measured job's ``device.yaml`` carries its settings (a Zero 2 W's oneDNN off) and
    loads as the agent's own config; its settings are the device role's for a Zero 2 W."""
    import yaml

    from bench.arm64.job import JobSpec, write_device_files
    from device.settings import load_device_config

    spec = JobSpec(model="mnist_cnn", density=0.2, onednn="disabled", torch_threads=1)
    config = load_device_config(write_device_files(tmp_path, spec, 1883))
    assert (config.torch_onednn, config.torch_threads) == ("disabled", 1)
    defaults = yaml.safe_load(
        (REPO / "ansible/roles/fleet_device/defaults/main.yml").read_text(encoding="utf-8")
    )
    assert defaults["fleet_device_malloc_mmap_threshold_kb"] == "auto"
    assert JobSpec.malloc_mmap_threshold_kb == 128  # "auto" below 768 MB (test_device_platform)
    assert JobSpec.onednn == defaults["fleet_device_torch_onednn"]

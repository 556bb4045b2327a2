"""fleet_device's platform checks: the PyTorch pin per architecture and the memory for the model.

A Raspberry Pi must never be given a CUDA build of torch (gigabytes of CUDA packages on an SD
card, and a torch that fails to import without libcudart): the role pins a CPU-only build per
architecture, the same pins as pyproject.toml's markers, and refuses an unpinned torch on
aarch64. And a device whose RAM cannot hold its model's round job (docs/hardware.md) is refused
(or warned about) before anything is installed, instead of being killed mid-round.

One ``ansible-playbook`` run (seconds, no converge) exercises the role's own task files on
several local hosts, each with the facts of another device.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible_harness import ANSIBLE_DIR, REPO, Ansible, PlaybookRun, task_output, write_inventory
from packaging.markers import default_environment
from packaging.requirements import Requirement

DEFAULTS = yaml.safe_load((ANSIBLE_DIR / "roles/fleet_device/defaults/main.yml").read_text())
PEAKS: Mapping[str, list[dict[str, float]]] = DEFAULTS["fleet_device_job_peak_mb"]
RESERVE_MB = int(DEFAULTS["fleet_device_os_reserve_mb"])

PLAYBOOK = """
- name: The fleet_device role's platform checks
  hosts: all
  gather_facts: false
  tasks:
    - name: Check the PyTorch source
      ansible.builtin.include_role:
        name: fleet_device
        tasks_from: torch_pin.yml
        public: true
      when: check_tasks == 'torch_pin.yml'
    - name: Check the memory
      ansible.builtin.include_role:
        name: fleet_device
        tasks_from: memory.yml
        public: true
      when: check_tasks == 'memory.yml'
    - name: Show the agent's memory settings
      ansible.builtin.debug:
        msg: "MMAP={{ fleet_device_mmap_threshold_kb }} ONEDNN_OFF={{ fleet_device_onednn_off }}"
      when: check_tasks == 'memory.yml'
    - name: Show the resolved PyTorch source
      ansible.builtin.debug:
        msg: "TORCH={{ fleet_device_torch_requirement }} INDEX={{ fleet_device_torch_index_url }}"
      when: check_tasks == 'torch_pin.yml'
"""


FIGURES = ("dense_mb", "kernels_mb", "dense_onednn_off_mb", "kernels_onednn_off_mb")


def need_mb(model: str, density: float, *, onednn_off: bool = True, profile: bool = False) -> int:
    """What the role should ask for: the dense figure at density 1, the largest sparse figure
    below 1 (a sparse round's peak hardly depends on its density), plus the OS reserve; the
    figures with oneDNN off (what the agent's ``torch_onednn: auto`` does below 768 MB, as every
    device that could fall short here has) or on; masked dense, or with a profile the larger of
    masked dense and sparse kernels (the agent then picks a kernel wherever it is faster)."""
    rows = [r for r in PEAKS[model] if (r["density"] < 1) == (density < 1)]
    suffix = "_onednn_off_mb" if onednn_off else "_mb"

    def figure(row: Mapping[str, float]) -> float:
        kernels = row.get("kernels" + suffix, 0) if profile else 0
        return max(row["dense" + suffix], kernels)

    return int(max(figure(r) for r in rows)) + RESERVE_MB


# host -> (task file, host variables)
HOSTS: dict[str, tuple[str, dict[str, Any]]] = {
    "pi-aarch64": ("torch_pin.yml", {"fleet_device_architecture": "aarch64"}),
    "pc-x86": ("torch_pin.yml", {"fleet_device_architecture": "x86_64"}),
    "pi-unpinned": (
        "torch_pin.yml",
        {"fleet_device_architecture": "aarch64", "fleet_device_torch_requirement": "torch>=2.2"},
    ),
    "pi-armv7": ("torch_pin.yml", {"fleet_device_architecture": "armv7l"}),
    "pi-armv7-wheel": (
        "torch_pin.yml",
        {"fleet_device_architecture": "armv7l", "fleet_device_torch_wheel": "/w/torch.whl"},
    ),
    "zero-femnist": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.1,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.1) - 1,
        },
    ),
    "zero-femnist-warn": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.1,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.1) - 1,
            "fleet_device_memory_check": "warn",
        },
    ),
    "pi4-femnist": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.1,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.1),
        },
    ),
    "zero-between-densities": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.5,  # not tabulated: judged by the largest sparse figure
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.5) - 1,
        },
    ),
    "pi3-femnist-dense": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 1.0,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 1.0),
        },
    ),
    "small-onednn-forced": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.1,
            "fleet_device_torch_onednn": "enabled",
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.1, onednn_off=False) - 1,
        },
    ),
    "zero-femnist-profiled": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.1,
            "fleet_device_profile_on_start": True,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.1, profile=True) - 1,
        },
    ),
    "zero-between-densities-fits": (
        "memory.yml",
        {
            "fleet_device_model": "femnist_cnn",
            "fleet_device_density": 0.5,
            "fleet_device_memtotal_mb": need_mb("femnist_cnn", 0.5),
        },
    ),
    "pi4-4gb": (
        "memory.yml",
        {"fleet_device_model": "femnist_cnn", "fleet_device_memtotal_mb": 3794},
    ),
    "zero-own-threshold": (
        "memory.yml",
        {
            "fleet_device_model": "mlp",
            "fleet_device_memtotal_mb": 427,
            "fleet_device_malloc_mmap_threshold_kb": 0,
            "fleet_device_torch_onednn": "enabled",
        },
    ),
    "bad-memory-settings": (
        "memory.yml",
        {
            "fleet_device_model": "mlp",
            "fleet_device_memtotal_mb": 4096,
            "fleet_device_torch_onednn": False,
            "fleet_device_malloc_mmap_threshold_kb": "1MiB",
        },
    ),
    "pi-unknown-model": (
        "memory.yml",
        {"fleet_device_model": "cifar_cnn", "fleet_device_memtotal_mb": 256},
    ),
}


@dataclass(frozen=True)
class Checked:
    run: PlaybookRun

    def failed(self, host: str) -> bool:
        return self.run.recap[host]["failed"] > 0

    def text(self, host: str) -> str:
        """The output lines about ``host`` (its results and their messages)."""
        blocks = re.split(r"\n(?=TASK \[|PLAY RECAP)", self.run.output)
        return "\n".join(b for b in blocks if f"[{host}]" in b)


@pytest.fixture(scope="module")
def checked(ansible: Ansible, tmp_path_factory: pytest.TempPathFactory) -> Checked:
    base = tmp_path_factory.mktemp("platform")
    playbook = base / "platform.yml"
    playbook.write_text(PLAYBOOK)
    # What platform.yml would have recorded from the facts, unless the host says otherwise.
    facts = {"fleet_device_architecture": "aarch64", "fleet_device_memtotal_mb": 100_000}
    hosts = {
        name: {"ansible_connection": "local", "check_tasks": tasks, **facts, **variables}
        for name, (tasks, variables) in HOSTS.items()
    }
    inventory = write_inventory(base / "hosts.yml", {"devices": hosts})
    run = ansible.playbook(str(playbook), inventory, timeout_s=300)
    assert set(run.recap) == set(HOSTS), run.explain()
    return Checked(run)


def test_role_pins_are_pyprojects_pins() -> None:
    """The role installs, per architecture, exactly the torch that pyproject.toml's markers
    require there, so that installing the sparsefleet wheel afterwards changes nothing."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_reqs = [
        Requirement(r) for r in project["project"]["dependencies"] if r.startswith("torch")
    ]
    for machine, pin in DEFAULTS["fleet_device_torch_pins"].items():
        environment = {**default_environment(), "platform_machine": machine}
        applying = [r for r in torch_reqs if r.marker is None or r.marker.evaluate(environment)]
        assert len(applying) == 1, (machine, applying)
        assert str(applying[0].specifier) == str(Requirement(pin["requirement"]).specifier)


def test_aarch64_gets_the_cpu_only_torch_from_the_default_index(checked: Checked) -> None:
    assert not checked.failed("pi-aarch64"), checked.text("pi-aarch64")
    assert "TORCH=torch==2.7.1 INDEX=\n" in checked.run.output.replace('"', "\n")


def test_x86_keeps_the_fleet_managers_torch_from_the_cpu_index(checked: Checked) -> None:
    assert not checked.failed("pc-x86"), checked.text("pc-x86")
    assert "TORCH=torch==2.13.0 INDEX=https://download.pytorch.org/whl/cpu" in checked.run.output


def test_an_unpinned_torch_on_aarch64_is_refused(checked: Checked) -> None:
    """torch>=2.2 on aarch64 would resolve to the newest wheel, a CUDA build."""
    assert checked.failed("pi-unpinned")
    text = checked.text("pi-unpinned")
    assert "on aarch64 an unpinned torch resolves" in text and '"torch>=2.2"' in text


def test_an_architecture_without_pin_needs_a_wheel(checked: Checked) -> None:
    assert checked.failed("pi-armv7")
    assert "no pin for this architecture" in checked.text("pi-armv7")
    assert not checked.failed("pi-armv7-wheel"), checked.text("pi-armv7-wheel")


def test_a_device_below_its_models_need_is_refused(checked: Checked) -> None:
    assert checked.failed("zero-femnist")
    task = "fleet_device : Refuse a device with too little memory for its model"
    text = task_output(checked.run.output, task)
    need = need_mb("femnist_cnn", 0.1)
    assert f"{need - 1} MB of RAM is less than the {need} MB that femnist_cnn" in text
    assert "(masked dense, oneDNN off:" in checked.text("zero-femnist")  # auto, below 768 MB
    assert "fleet_device_memory_check: warn" in text


def test_a_device_that_keeps_onednn_is_judged_by_the_figures_with_it(checked: Checked) -> None:
    """``torch_onednn: enabled`` on a small device: the larger figure applies."""
    assert need_mb("femnist_cnn", 0.1, onednn_off=False) > need_mb("femnist_cnn", 0.1)
    assert checked.failed("small-onednn-forced")
    assert "(masked dense, oneDNN on:" in checked.text("small-onednn-forced")


def test_a_small_device_gets_the_low_memory_settings(checked: Checked) -> None:
    """Below 768 MB: oneDNN off (the agent decides, the role's check agrees) and glibc's mmap
    threshold at 128 KiB; above, 1 MiB and oneDNN on; what the inventory sets stays."""
    assert "MMAP=128 ONEDNN_OFF=True" in checked.text("pi4-femnist")  # below 768 MB
    assert "MMAP=1024 ONEDNN_OFF=False" in checked.text("pi4-4gb")
    assert not checked.failed("pi4-4gb"), checked.text("pi4-4gb")
    assert "MMAP=0 ONEDNN_OFF=False" in checked.text("zero-own-threshold")


def test_bad_memory_settings_are_refused_with_what_to_write(checked: Checked) -> None:
    assert checked.failed("bad-memory-settings")
    text = checked.text("bad-memory-settings")
    assert "fleet_device_torch_onednn must be auto, enabled or disabled (got false" in text
    assert "fleet_device_malloc_mmap_threshold_kb auto or a number of KiB" in text
    assert '(got "1MiB")' in text


def test_the_roles_low_memory_threshold_is_the_agents() -> None:
    from device.torch_setup import LOW_MEMORY_MB

    assert DEFAULTS["fleet_device_low_memory_mb"] == LOW_MEMORY_MB
    assert need_mb("femnist_cnn", 0.1, onednn_off=False) < LOW_MEMORY_MB  # the hosts above


def test_warn_mode_reports_and_goes_on(checked: Checked) -> None:
    assert not checked.failed("zero-femnist-warn")
    assert "WARNING: zero-femnist-warn has" in checked.text("zero-femnist-warn")


def test_a_device_with_exactly_enough_memory_passes(checked: Checked) -> None:
    assert not checked.failed("pi4-femnist"), checked.text("pi4-femnist")


def test_an_untabulated_sparse_density_is_judged_by_the_largest_sparse_figure(
    checked: Checked,
) -> None:
    """A sparse round's peak hardly depends on its density: 0.5 is judged by the largest
    sparse figure, never by the dense one (femnist_cnn's dense round needs more)."""
    assert need_mb("femnist_cnn", 0.5) < need_mb("femnist_cnn", 1.0)
    assert checked.failed("zero-between-densities")
    assert f"the {need_mb('femnist_cnn', 0.5)} MB that femnist_cnn" in checked.text(
        "zero-between-densities"
    )
    text = checked.text("zero-between-densities-fits")
    assert not checked.failed("zero-between-densities-fits"), text


def test_a_device_with_a_profile_is_judged_by_its_sparse_kernels_too(checked: Checked) -> None:
    """With a profile the agent may compute with sparse kernels, whose peak is higher; the
    same RAM suffices for masked dense (``pi4-femnist`` has less and passes)."""
    need = need_mb("femnist_cnn", 0.1, profile=True)
    assert need > need_mb("femnist_cnn", 0.1)
    assert checked.failed("zero-femnist-profiled")
    text = checked.text("zero-femnist-profiled")
    assert f"the {need} MB that femnist_cnn at density 0.1 needs (sparse kernels where" in text


def test_a_dense_round_is_judged_by_the_dense_figure(checked: Checked) -> None:
    assert not checked.failed("pi3-femnist-dense"), checked.text("pi3-femnist-dense")


def test_a_model_without_figures_is_reported_not_refused(checked: Checked) -> None:
    assert not checked.failed("pi-unknown-model")
    assert "no measured memory figures for model cifar_cnn" in checked.text("pi-unknown-model")


def test_hardware_doc_shows_the_roles_figures() -> None:
    """docs/hardware.md's table of what the role checks is the role's table (one source of
    figures): per model and density, the four figures in bold, a dash where there is none."""
    doc = (Path(REPO) / "docs" / "hardware.md").read_text()
    for model, rows in PEAKS.items():
        for row in rows:
            cells = [f"**{int(row[key])}**" if key in row else "-" for key in FIGURES]
            pattern = rf"\|\s*{model}\s*\|\s*{row['density']:g}\s*\|\s*" + r"\s*\|\s*".join(
                re.escape(c) for c in cells
            )
            assert re.search(pattern + r"\s*\|", doc), (model, row)

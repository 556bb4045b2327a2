"""The device's process-wide torch settings (device.torch_setup): which RAM turns oneDNN off
under ``torch_onednn: auto``, that the settings reach torch, and that the config reads them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from device.settings import load_device_config
from device.torch_setup import LOW_MEMORY_MB, configure_torch, onednn_enabled, physical_memory_mb


@pytest.fixture
def torch_flags() -> Iterator[None]:
    """Restore torch's thread count and oneDNN flag, which are process-wide."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.set_flags(_enabled=onednn)


@pytest.mark.parametrize(
    ("setting", "memory_mb", "expected"),
    [
        ("auto", 427, False),  # a Pi Zero 2 W's MemTotal
        ("auto", LOW_MEMORY_MB - 1, False),
        ("auto", LOW_MEMORY_MB, True),
        ("auto", 906, True),  # a 1 GB Pi 3
        ("auto", 0, True),  # unknown RAM: torch's default
        ("enabled", 427, True),
        ("disabled", 8000, False),
    ],
)
def test_onednn_follows_the_setting_and_the_ram(setting, memory_mb, expected) -> None:
    assert onednn_enabled(setting, memory_mb) is expected


@pytest.mark.usefixtures("torch_flags")
def test_configure_torch_sets_threads_and_onednn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="device.torch_setup"):  # said at INFO: auto chose
        assert configure_torch(1, "auto", memory_mb=427) is False
    assert torch.get_num_threads() == 1
    assert torch.backends.mkldnn.enabled is False
    assert "oneDNN off (torch_onednn: auto, 427 MB of RAM)" in caplog.text
    assert configure_torch(0, "auto", memory_mb=4096) is True
    assert torch.backends.mkldnn.enabled is True
    assert torch.get_num_threads() == 1  # 0 threads leaves torch's count as it is


@pytest.mark.usefixtures("torch_flags")
def test_training_without_onednn_computes_the_same_gradients() -> None:
    """oneDNN off changes which kernels compute a convolution, not what they compute."""
    conv = torch.nn.Conv2d(1, 4, 5)
    x = torch.randn(8, 1, 28, 28)
    grads = []
    for onednn in ("enabled", "disabled"):
        configure_torch(0, onednn)
        conv.zero_grad()
        conv(x).square().sum().backward()
        assert conv.weight.grad is not None
        grads.append(conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_physical_memory_is_this_machines() -> None:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    assert abs(physical_memory_mb() - total_kb // 1024) <= 64


@pytest.mark.parametrize("value", ["auto", "enabled", "disabled"])
def test_config_reads_torch_onednn(tmp_path: Path, value: str) -> None:
    path = tmp_path / "device.yaml"
    path.write_text(f"device_id: d1\ndata: {{dataset: digits}}\ntorch_onednn: {value}\n")
    assert load_device_config(path).torch_onednn == value


def test_config_defaults_to_auto(tmp_path: Path) -> None:
    path = tmp_path / "device.yaml"
    path.write_text("device_id: d1\ndata: {dataset: digits}\n")
    assert load_device_config(path).torch_onednn == "auto"

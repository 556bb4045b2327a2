"""Process-wide torch settings of a device agent, applied once before anything is measured.

Two settings, both from ``device.yaml``:

- ``torch_threads``: torch's intra-op threads (0: torch's default, one per core).
- ``torch_onednn``: whether torch may compute convolutions (and, on aarch64, some matrix
  products) with oneDNN (``torch.backends.mkldnn.enabled``). oneDNN is the faster path on x86
  (a mnist_cnn training step 1.7x faster there), but its code and its per-shape primitives are
  resident memory: on arm64 a round job peaks 9 MB higher with it for mnist_cnn at density 0.2
  and 30 MB higher for femnist_cnn at 0.1 (docs/hardware.md).
  ``auto`` turns it off on a device with less than :data:`LOW_MEMORY_MB` of RAM (a Raspberry Pi
  Zero 2 W, 512 MB), where those megabytes decide whether a job fits, and leaves torch's
  default everywhere else.

They are applied before the device profile is measured, so that the profile times the same
code paths the device then trains with.
"""

from __future__ import annotations

import logging
import os

import torch

from device.settings import OneDnn

__all__ = [
    "LOW_MEMORY_MB",
    "configure_torch",
    "onednn_enabled",
    "physical_memory_bytes",
    "physical_memory_mb",
]

log = logging.getLogger(__name__)

LOW_MEMORY_MB = 768
"""RAM (MiB, as the kernel reports it: MemTotal) below which ``torch_onednn: auto`` turns oneDNN
off. A Zero 2 W reports about 430, a 1 GB Pi 3 about 900."""


def physical_memory_bytes() -> int:
    """This machine's RAM in bytes (0 when the system does not say): what the device reports
    in its birth (``device.agent.hardware``) and what ``auto`` decides by."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def physical_memory_mb() -> int:
    """:func:`physical_memory_bytes` in MiB."""
    return physical_memory_bytes() // 2**20


def onednn_enabled(setting: OneDnn, memory_mb: int) -> bool:
    """Whether a device with ``memory_mb`` MiB of RAM (0: unknown) computes with oneDNN under
    ``setting``. ``auto`` keeps it where the RAM is unknown, which changes nothing there."""
    if setting == "auto":
        return not 0 < memory_mb < LOW_MEMORY_MB
    return setting == "enabled"


def configure_torch(
    threads: int = 0, onednn: OneDnn = "auto", *, memory_mb: int | None = None
) -> bool:
    """Apply the device's torch settings to this process, and log them (at INFO where
    ``auto`` turned oneDNN off); returns whether oneDNN is on. ``threads`` 0 leaves torch's
    thread count; ``memory_mb`` defaults to this machine's RAM."""
    if threads:
        torch.set_num_threads(threads)
    memory_mb = physical_memory_mb() if memory_mb is None else memory_mb
    enabled = onednn_enabled(onednn, memory_mb)
    torch.backends.mkldnn.set_flags(_enabled=enabled)  # type: ignore[no-untyped-call]
    # Said at INFO only where "auto" decided against torch's default: the user did not ask.
    level = logging.INFO if onednn == "auto" and not enabled else logging.DEBUG
    log.log(
        level,
        "torch: %d threads, oneDNN %s (torch_onednn: %s, %d MB of RAM)",
        torch.get_num_threads(),
        "on" if enabled else "off",
        onednn,
        memory_mb,
    )
    return enabled

"""File-backed example tensors: a side too large to hold in memory is decoded into a file.

A device's own data can be far larger than its RAM (a Pi Zero 2 W has 512 MB; a camera's image
folder grows without bound). :func:`spooled_tensor` gives an uninitialised float32 tensor
whose memory is a memory-mapped file: the decode writes it chunk by chunk, the trainer reads
it one minibatch at a time (``x[indices]`` copies only those rows), and the kernel keeps as
many of its pages resident as memory allows; they are clean once written back, so under
memory pressure they are dropped, not swapped, and the process is never killed for its data.

The file has no name (``O_TMPFILE`` where the file system supports it; otherwise it is unlinked
at once): nothing is left behind after a crash, and its space is freed when the tensor is.
Its space is reserved up front (``posix_fallocate``), so a full disk is one clear
:class:`DataError` here, not a ``SIGBUS`` in the middle of a decode.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device.errors import DataError

__all__ = ["DEFAULT_IN_MEMORY_MB", "Spool", "spooled_tensor"]

#: A side whose decoded examples are larger than this stays in a file (``data.in_memory_mb``).
DEFAULT_IN_MEMORY_MB = 256.0

MB = 1024 * 1024


@dataclass(frozen=True)
class Spool:
    """When and where to decode into a file: sides above ``in_memory_mb`` (MiB of float32
    examples; 0 always spools) go to ``directory`` (None: the system's temporary directory,
    which must be on disk, not a RAM-backed tmpfs, to save memory)."""

    in_memory_mb: float = DEFAULT_IN_MEMORY_MB
    directory: Path | None = None

    def wants(self, shape: tuple[int, ...]) -> bool:
        """Whether a float32 tensor of ``shape`` is to be spooled."""
        return math.prod(shape) * 4 > self.in_memory_mb * MB


def spooled_tensor(shape: tuple[int, ...], directory: Path | None = None) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape`` (at least one element) backed by a nameless
    file in ``directory`` (default: the system's temporary directory).

    Raises:
        DataError: the directory cannot hold the file (missing, not writable, or too little
            free space), naming it and the size.
    """
    nbytes = math.prod(shape) * 4
    where = directory if directory is not None else Path(tempfile.gettempdir())
    try:
        with tempfile.TemporaryFile(dir=where, prefix="sparsefleet-data-") as file:
            os.posix_fallocate(file.fileno(), 0, nbytes)
            array = np.memmap(file, dtype=np.float32, mode="r+", shape=shape)
    except OSError as exc:
        raise DataError(
            f"cannot spool {nbytes / MB:.0f} MiB of decoded examples to {where}: "
            f"{exc.strerror or exc}; set data.spool_dir to a directory with room, or raise "
            "data.in_memory_mb"
        ) from None
    return torch.from_numpy(array)

"""Settings of buffered asynchronous rounds (``mode: async``, ``fleet.runtime.async_rounds``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from device.errors import ConfigError

__all__ = ["AsyncOptions"]


@dataclass(frozen=True)
class AsyncOptions:
    """FedBuff's knobs (docs/algorithms.md, "Buffered asynchronous rounds").

    ``concurrency`` (C >= 1): jobs in flight at most; ``buffer`` (B in [1, C]): updates that
    trigger an aggregation; ``max_staleness`` (>= 0): model versions an update may lag behind
    the current one, older ones are dropped (reason ``too_stale``); ``job_timeout_s`` (> 0):
    seconds after which a job that has not answered frees its slot (a device that disconnected
    mid-job) and after which an aggregation step with fewer than B updates closes anyway.
    """

    concurrency: int = 20
    buffer: int = 10
    max_staleness: int = 4
    job_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"async: concurrency must be >= 1, got {self.concurrency}")
        if not 1 <= self.buffer <= self.concurrency:
            raise ConfigError(
                f"async: buffer must be in [1, concurrency={self.concurrency}], got {self.buffer}"
            )
        if self.max_staleness < 0:
            raise ConfigError(f"async: max_staleness must be >= 0, got {self.max_staleness}")
        if not self.job_timeout_s > 0 or math.isinf(self.job_timeout_s):
            raise ConfigError(
                f"async: job_timeout_s must be a positive number of seconds, "
                f"got {self.job_timeout_s}"
            )

"""FedDST's readjustment schedule: which rounds readjust, and with which alpha_r.

The schedule is its own object (RigL keeps the update and its schedule apart); the fleet manager
uses it to decide when a round carries a ``Readjust`` and sends ``alpha_r`` in the command, and a
device running without a fleet manager can use the same object. Rounds are numbered from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from device.errors import ConfigError


class AlphaSchedule(Protocol):
    """Called with a round number r (from 1), returns alpha_r in [0, 1].

    alpha_r is the fraction of each layer's active weights dropped and regrown in round r.
    """

    def __call__(self, round_: int) -> float: ...


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ConfigError(f"readjust alpha must be a fraction in [0, 1], got {alpha!r}")


@dataclass(frozen=True)
class ConstantAlpha:
    """alpha_r = alpha for every round."""

    alpha: float

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)

    def __call__(self, round_: int) -> float:
        del round_  # constant by definition
        return self.alpha


@dataclass(frozen=True)
class CosineAlpha:
    """alpha_r = alpha/2 * (1 + cos(pi * r / t_end)) for r < t_end, and 0 from t_end on.

    Decays from ``alpha`` at r = 0 to 0 at r = t_end (FedDST, after RigL's cosine update schedule);
    held at 0 afterwards rather than rising again with the cosine.
    """

    alpha: float
    t_end: int

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if self.t_end < 1:
            raise ConfigError(f"cosine alpha schedule needs t_end >= 1, got {self.t_end}")

    def __call__(self, round_: int) -> float:
        if round_ >= self.t_end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * round_ / self.t_end))


@dataclass(frozen=True)
class FedDSTSchedule:
    """Readjust on rounds ``first_round, first_round + readjust_every, ...`` strictly before t_end.

    ``alpha(r)`` is the alpha schedule's value for round r (whether or not r readjusts).
    """

    alpha_schedule: AlphaSchedule
    readjust_every: int
    t_end: int
    first_round: int = 1

    def __post_init__(self) -> None:
        if self.readjust_every < 1:
            raise ConfigError(f"readjust_every (R_adj) must be >= 1, got {self.readjust_every}")
        if self.first_round < 1:
            raise ConfigError(
                f"first_round must be >= 1 (rounds count from 1), got {self.first_round}"
            )

    def is_readjust_round(self, round_: int) -> bool:
        return (
            self.first_round <= round_ < self.t_end
            and (round_ - self.first_round) % self.readjust_every == 0
        )

    def alpha(self, round_: int) -> float:
        return self.alpha_schedule(round_)

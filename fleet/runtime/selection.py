"""Choosing a round's devices: who is eligible (online, not cordoned, carrying the run's tags:
``DeviceRegistry.eligible``), how many to select (over-selection), and the strategy's choice
among them (``Strategy.configure_round``, seeded per run, round and ``spec.seed``).

Waiting for enough eligible devices handles births meanwhile (``drain``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from device.errors import NotFoundError
from device.seeding import derive_seed
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.spec import RunSpec
from fleet.strategies.base import Candidate, GlobalModel, RoundConfig, Strategy


def select_count(spec: RunSpec) -> int:
    """How many devices a round selects: ``ceil(k * over_select)``, at least 1, so that k
    updates can close it without waiting for the stragglers."""
    return max(1, math.ceil(spec.clients_per_round * spec.over_select))


class Selection:
    """The eligible devices of a run and the strategy's choice among them. ``drain(timeout_s)``
    handles the messages queued or arriving within ``timeout_s`` seconds (births and wills
    update the registry)."""

    def __init__(
        self,
        spec: RunSpec,
        registry: DeviceRegistry,
        strategy: Strategy,
        *,
        drain: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.strategy = strategy
        self.drain = drain
        self.clock = clock

    def candidates(self) -> list[Candidate]:
        """The eligible devices now, with their dataset sizes and profiles."""
        return [
            Candidate(device_id=d.device_id, num_examples=d.dataset_size, profile=d.profile)
            for d in self.registry.eligible(tags=self.spec.tags)
        ]

    def wait_for_devices(self, count: int, timeout_s: float) -> int:
        """Handle births until ``count`` devices are eligible (or ``timeout_s`` passes); returns
        how many are eligible."""
        deadline = self.clock() + timeout_s
        eligible = len(self.registry.eligible(tags=self.spec.tags))
        while eligible < count and self.clock() < deadline:
            self.drain(0.1)
            eligible = len(self.registry.eligible(tags=self.spec.tags))
        return eligible

    def wait_for_candidates(self, want: int) -> list[Candidate]:
        """Give late births a moment: wait (up to the round timeout) for ``want`` devices.

        Returns the candidates then, possibly fewer than ``want``; ``NotFoundError`` when none
        is eligible.
        """
        deadline = self.clock() + self.spec.round_timeout_s
        candidates = self.candidates()
        while len(candidates) < want and self.clock() < deadline:
            self.drain(0.2)
            candidates = self.candidates()
        if not candidates:
            raise NotFoundError(
                f"no eligible device is online for run {self.spec.run_id!r} "
                f"(tags {list(self.spec.tags)})"
            )
        return candidates

    def choose(
        self, round_: int, model: GlobalModel, resumed: tuple[str, ...] | None
    ) -> tuple[tuple[str, ...], RoundConfig]:
        """The round's devices and the strategy's configuration of it. ``resumed``: the devices
        a resumed round selected before (kept, with the settings configured again);
        otherwise ``select_count`` devices, waiting for late births."""
        spec = self.spec
        rng = np.random.default_rng(derive_seed(spec.run_id, round_, "select", spec.seed))
        if resumed is not None:
            return resumed, self.strategy.configure_round(round_, model, self.candidates(), rng)
        want = select_count(spec)
        candidates = self.wait_for_candidates(want)
        config = self.strategy.configure_round(round_, model, candidates, rng, num_select=want)
        return tuple(config.selected), config

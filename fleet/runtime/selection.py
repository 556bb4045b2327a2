"""Choosing a round's devices: who is eligible (online, not cordoned, carrying the run's tags:
``DeviceRegistry.eligible``, and able to build the run's model: ``can_build``), how many to
select (over-selection), and the strategy's choice among them (``Strategy.configure_round``,
seeded per run, round and ``spec.seed``).

Waiting for enough eligible devices handles births meanwhile (``drain``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from device.errors import NotFoundError
from device.model_id import digest_of
from device.model_ref import ModelOffer, ModelRef
from device.model_registry import BUILTIN
from device.seeding import derive_seed
from fleet.ops.registry import DeviceInfo, DeviceRegistry
from fleet.runtime.spec import RunSpec
from fleet.strategies.base import Candidate, GlobalModel, RoundConfig, Strategy


def select_count(spec: RunSpec) -> int:
    """How many devices a round selects: ``ceil(k * over_select)``, at least 1, so that k
    updates can close it without waiting for the stragglers."""
    return max(1, math.ceil(spec.clients_per_round * spec.over_select))


def can_build(offers: Sequence[ModelOffer], model: ModelRef, architecture_digest: bytes) -> bool:
    """Whether a device that announced ``offers`` can train ``model`` (whose build has
    ``architecture_digest``; empty: unknown).

    A device that announces nothing is an older agent: it builds the built-in models only. A
    device that announces models must offer the run's source (its registered name or factory;
    the kwargs are the run's to choose), and is excluded when it offers exactly the run's model
    (same kwargs) with another digest: it would refuse the round.
    """
    if not offers:
        return model.name in BUILTIN
    same_source = [o for o in offers if o.model.source == model.source]
    return bool(same_source) and not any(
        o.model.same_model(model)
        and o.architecture_digest
        and architecture_digest
        and o.architecture_digest != architecture_digest
        for o in same_source
    )


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
        self._architecture: bytes | None = None

    def architecture(self) -> bytes:
        """The architecture digest of the run's model (built once, on ``meta``)."""
        if self._architecture is None:
            self._architecture = digest_of(self.spec.model)
        return self._architecture

    def eligible(self) -> list[DeviceInfo]:
        """The devices that may be selected now: ``DeviceRegistry.eligible`` for the run's tags,
        and able to build the run's model (``can_build``)."""
        model = self.spec.model
        devices = self.registry.eligible(tags=self.spec.tags)
        # The digest is needed only against an offer of exactly this model that carries one.
        compared = any(
            o.architecture_digest and o.model.same_model(model) for d in devices for o in d.models
        )
        digest = self.architecture() if compared else b""
        return [d for d in devices if can_build(d.models, model, digest)]

    def candidates(self) -> list[Candidate]:
        """The eligible devices now, with their dataset sizes and profiles."""
        return [
            Candidate(device_id=d.device_id, num_examples=d.dataset_size, profile=d.profile)
            for d in self.eligible()
        ]

    def wait_for_devices(self, count: int, timeout_s: float) -> int:
        """Handle births until ``count`` devices are eligible (or ``timeout_s`` passes); returns
        how many are eligible."""
        deadline = self.clock() + timeout_s
        eligible = len(self.eligible())
        while eligible < count and self.clock() < deadline:
            self.drain(0.1)
            eligible = len(self.eligible())
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
            unable = len(self.registry.eligible(tags=self.spec.tags))
            raise NotFoundError(
                f"no eligible device is online for run {self.spec.run_id!r} "
                f"(tags {list(self.spec.tags)})"
                + (
                    f"; {unable} online device(s) cannot build model {self.spec.model.text!r} "
                    "(see the models column of `fleet devices list`)"
                    if unable
                    else ""
                )
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

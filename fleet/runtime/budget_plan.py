"""The round's density budgets: the run's ``budgets`` option applied to the selected devices.

``BudgetPlanner.plan`` reads each selected device's registry record (hardware, profile, dataset
size, tags) and asks ``fleet.strategies.budgets.BudgetPolicy`` for its density. The result is a
pure function of those records, the global model and the run spec, so a resumed round
recomputes the same budgets (as long as the devices did not report new profiles meanwhile).
A device whose reports are unusable gets the default density (no budget) and one warning per
run, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from device.errors import NotFoundError
from device.wire.messages import LocalTraining
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.spec import RunSpec
from fleet.strategies.base import GlobalModel
from fleet.strategies.budgets import BudgetChoice, BudgetPolicy

log = logging.getLogger("fleet.runtime.runner")


class BudgetPlanner:
    """Chooses each selected device's density budget for a round (module docstring)."""

    def __init__(self, spec: RunSpec, registry: DeviceRegistry) -> None:
        self.spec = spec
        self.registry = registry
        self.policy = BudgetPolicy.parse(spec.budgets)
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return self.policy.active

    def plan(
        self, selected: Sequence[str], model: GlobalModel, training: LocalTraining
    ) -> dict[str, float]:
        """``{device_id: budget}`` for the budgeted devices (others train the global mask)."""
        if not self.policy.active or not model.masks:
            return {}
        budgets: dict[str, float] = {}
        for device_id in selected:
            choice = self._choose(device_id, model, training)
            if choice.warning and device_id not in self._warned:
                self._warned.add(device_id)
                log.warning("device %s gets the default density: %s", device_id, choice.warning)
            if choice.density > 0.0:
                budgets[device_id] = choice.density
        return budgets

    def _deadline_s(self) -> float:
        """Seconds a job may take: the round timeout, or in async mode the job timeout."""
        options = self.spec.async_options
        if self.spec.mode == "async" and options is not None:
            return options.job_timeout_s
        return self.spec.round_timeout_s

    def _choose(self, device_id: str, model: GlobalModel, training: LocalTraining) -> BudgetChoice:
        try:
            info = self.registry.get(device_id)
        except NotFoundError:
            return BudgetChoice(0.0, "default", "not in the registry")
        if self.policy.mode == "tags":
            return self.policy.for_tags(info.matches, model)
        return self.policy.auto(
            model,
            memory_bytes=info.hardware.memory_bytes,
            profile=info.profile,
            num_examples=info.dataset_size,
            training=training,
            round_timeout_s=self._deadline_s(),
        )

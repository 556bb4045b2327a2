"""The strategy's work before round 1, if it has any (PruneFL's initial pruning).

The job is "round 0" of the run: the command goes to one device, whose result arrives on its
update topic for round 0 (``MessageHandler`` keeps it). A device that fails, sends a result the
strategy refuses, or misses the deadline (``round_timeout_s``) is replaced by the next choice
among the remaining candidates; the new model is checkpointed before round 1 opens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from device.errors import NotFoundError, ValidationError
from device.wire.transport import Transport
from fleet.runtime.checkpoint import CurrentModel
from fleet.runtime.collection import RoundState
from fleet.runtime.commands import Commands
from fleet.runtime.handler import MessageHandler
from fleet.runtime.selection import Selection
from fleet.runtime.spec import ProgressCallback, RunSpec, global_density
from fleet.strategies.base import Strategy

log = logging.getLogger(__name__)


def run_initial_job(
    spec: RunSpec,
    strategy: Strategy,
    current: CurrentModel,
    *,
    selection: Selection,
    commands: Commands,
    handler: MessageHandler,
    transport: Transport,
    progress: ProgressCallback,
    clock: Callable[[], float],
) -> None:
    """Run the strategy's initial job to completion (a no-op for strategies without one).

    Raises ``NotFoundError`` when the job failed on every candidate device.
    """
    assert current.model is not None
    excluded: set[str] = set()
    while True:
        candidates = [c for c in selection.wait_for_candidates(1) if c.device_id not in excluded]
        job = strategy.initial_job(current.model, candidates) if candidates else None
        if job is None:
            if excluded:
                raise NotFoundError(
                    f"initial job failed on every candidate device: {sorted(excluded)}"
                )
            return
        commands.publish_model()
        deadline = clock() + spec.round_timeout_s
        command = job.command(
            current.digest,
            deadline_unix_s=deadline,
            partition=commands.partition_for(job.device_id),
        )
        commands.send(job.device_id, 0, command)
        handler.initial_device = job.device_id
        handler.initial_result = None
        state = RoundState(0, (job.device_id,), deadline)
        while handler.initial_result is None and not state.failed and clock() < deadline:
            message = transport.get(timeout_s=min(0.5, deadline - clock()))
            if message is not None:
                handler.handle(message, state)
        handler.initial_device = None
        result = handler.initial_result
        if result is None:
            log.warning(
                "initial job on %s failed or timed out; trying another device", job.device_id
            )
            excluded.add(job.device_id)
            continue
        try:
            model = strategy.on_initial_result(current.model, result)
        except ValidationError as exc:
            handler.reject(job.device_id, 0, exc)
            excluded.add(job.device_id)
            continue
        current.set(model, mask_changed=True)
        current.checkpoint(round_=None)
        progress("initial_job", {"device_id": job.device_id, "density": global_density(model)})
        return

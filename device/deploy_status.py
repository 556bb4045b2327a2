"""What a device's retained status says about its deployed model (``DeployedModel``).

Built from the models directory's ``state.json`` and every process's usage counters, so the
fleet learns the active version, since when, predictions and errors, the version before it,
and the newest deployment's state and reason even when no ``fleet model`` command listened.
"""

from __future__ import annotations

import dataclasses
import logging

from device.errors import SparseFleetError
from device.inference import InferenceModel
from device.model_store import ModelStore
from device.wire.messages import DeployedModel, DeployState

__all__ = ["deployed_model"]

log = logging.getLogger(__name__)


def deployed_model(
    store: ModelStore, model: InferenceModel | None, device_id: str = ""
) -> DeployedModel | None:
    """The status's ``deployed`` field: None before the first deployment event (and when
    ``state.json`` is unreadable, which is logged); ``model``, the live model of this process,
    flushes its counters first so that they are counted."""
    try:
        state = store.state()
    except SparseFleetError as exc:
        log.warning("%s: %s", device_id, exc)
        return None
    last = state.last_event
    if state.active is None:
        deployed = DeployedModel(version="")
    else:
        if model is not None:
            model.flush()  # this process's live counters into its usage file
        inferences, errors = store.usage(state.active)
        deployed = DeployedModel(
            version=state.active.version,
            artefact_sha256=bytes.fromhex(state.active.sha256),
            deployment_id=state.active.deployment_id,
            since_unix_s=state.active.since_unix_s,
            inferences=inferences,
            errors=errors,
            previous_version=state.previous.version if state.previous is not None else "",
        )
    if last is None:
        return deployed if state.active is not None else None
    return dataclasses.replace(
        deployed,
        last_deployment_id=last.deployment_id,
        last_state=DeployState(last.state),
        last_reason=last.reason,
        last_event_unix_s=last.at_unix_s,
    )

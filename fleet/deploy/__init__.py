"""Model deployment: export a run's model as a signed sparse artefact, publish it to devices
over MQTT (canary first), track each device's state, roll back (docs/deployment.md).

One concept per module: ``signing`` (the fleet manager's Ed25519 deployment key), ``export``
(checkpoint -> artefact, and dense ONNX/TorchScript exports), ``targets`` (which devices a
deployment addresses), ``rollout`` (publishing, canary, waiting, rollback) and ``tracking``
(device events and statuses into the store). The store's side is ``fleet.state.deployments``.
"""

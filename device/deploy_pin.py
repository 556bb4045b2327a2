"""Pinning a device to one deployed model version (``deploy.pin`` in its config).

A fleet operator pins a device (by hand, or with Ansible's ``fleet_device_model_version``) to
hold it on a version it keeps in its models directory, e.g. while a newer model is under
suspicion on that kind of device. The pin is local configuration, so it survives restarts and
outranks the fleet: the deployer (``device.deploy``) activates the pinned version when the
agent starts and refuses notices of any other version with a ``failed`` event whose reason is
``pin_reason``. ``activate_pin`` is the start-up half.
"""

from __future__ import annotations

from device.deploy_checks import DeployFailure
from device.errors import SparseFleetError
from device.model_store import ModelStore
from device.trust import TrustedKeys
from device.wire.artefact import read_artefact

__all__ = ["activate_pin", "pin_reason"]


def pin_reason(pin: str, serving: str) -> str:
    """Why a deployment of another version is refused (``serving``: what the device serves,
    e.g. ``"version 'v1'"``, or "" for nothing)."""
    return (
        f"this device is pinned to model version {pin!r} (deploy.pin in its config); it serves "
        f"{serving or 'no model'} and installs no other version until the pin is removed"
    )


def activate_pin(store: ModelStore, pin: str, trusted: TrustedKeys) -> str | None:
    """Make ``pin`` the active version of ``store`` when it is not already.

    Returns None when the pinned version is active afterwards (it was, or it was switched to
    atomically, as a local activation with no deployment id), else why not: it is not kept in
    the models directory, or its file fails the checks a load makes (structure, digests, a
    trusted signature, the label inside). Nothing changes in that case."""
    state = store.state()
    if state.active is not None and state.active.version == pin:
        return None
    kept = store.versions()
    if pin not in kept:
        return (
            f"pinned model version {pin!r} is not in {store.root} "
            f"(kept: {', '.join(kept) or 'none'})"
        )
    try:
        artefact = read_artefact(store.read(pin))
        trusted.verify(artefact)
        if artefact.manifest.version != pin:
            raise DeployFailure(f"its file holds version {artefact.manifest.version!r}")
        store.activate(pin, artefact.sha256.hex())
    except (SparseFleetError, ValueError, OSError) as exc:
        return f"cannot activate pinned model version {pin!r}: {exc}"
    return None

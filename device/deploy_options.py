"""From a device config's ``deploy`` section to the agent's ``DeployOptions``.

The trusted keys are read here (``ConfigError`` naming a bad key file, before the agent
connects); the device's data gives the deployer what to check an artefact against (its class
names when the config lists them; for a bundled dataset its class count and example shape) and
a few examples for the self-test.
"""

from __future__ import annotations

import logging

import numpy as np

from device.data.local_spec import LocalDataSpec
from device.deploy import DeployOptions, LocalSample
from device.errors import DataError
from device.local_data import BundledData, DeviceData
from device.settings import DeviceConfig
from device.trust import load_trusted_keys

__all__ = ["SELFTEST_EXAMPLES", "deploy_options"]

log = logging.getLogger(__name__)

SELFTEST_EXAMPLES = 64


def deploy_options(config: DeviceConfig, data: DeviceData | None) -> DeployOptions | None:
    """The deployer's options, or None when the config has no ``deploy`` section.

    A bundled dataset (loaded at start, never changed) gives the sample at once; the device's
    own data is re-scanned by the training jobs, which the deployer's thread must not race, so
    for it only the class names are checked."""
    section = config.deploy
    if section is None:
        return None
    classes = config.data.classes if isinstance(config.data, LocalDataSpec) else None
    sample = _bundled_sample(data) if isinstance(data, BundledData) else None
    return DeployOptions(
        models_dir=section.models_dir,
        trusted=load_trusted_keys(section.trusted_keys),
        classes=tuple(classes) if classes is not None else None,
        remote_inference=section.remote_inference,
        keep_versions=section.keep_versions,
        download_timeout_s=section.download_timeout_s,
        retries=section.retries,
        selftest_examples=SELFTEST_EXAMPLES,
        local_data=lambda: sample,
        pin=section.pin,
    )


def _bundled_sample(data: BundledData) -> LocalSample | None:
    try:
        dataset = data.train()
    except DataError as exc:  # no data to check against: the checks that need it are skipped
        log.warning("deployments are checked without data: %s", exc)
        return None
    n = min(len(dataset), SELFTEST_EXAMPLES)
    return LocalSample(
        x=dataset.x[:n].numpy().astype(np.float32),
        y=dataset.y[:n].numpy().astype(np.int64),
        num_classes=dataset.num_classes,
        example_shape=dataset.example_shape,
    )

"""The device id rule, shared by the device agent (config load) and the fleet manager (enrolment,
certificates): one definition, so that what one side accepts the other never refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.errors import ConfigError
from device.identity import (
    FLEET_MANAGER_USER,
    RESERVED_NAMES,
    device_id_problem,
    validate_device_id,
)
from device.settings import load_device_config

BAD_IDS = ["", "a/b", "dev 9", "dev+", "dev#", "a:b", ".hidden", "-x", "x" * 65, "dév"]


@pytest.mark.parametrize("device_id", ["d", "pi-kitchen-01", "A.b_c-9", "x" * 64])
def test_good_ids_pass(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    assert device_id_problem(device_id) is None


@pytest.mark.parametrize("device_id", BAD_IDS)
def test_ids_that_cannot_be_one_topic_level_or_file_name_are_refused(device_id: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed"):
        validate_device_id(device_id)


@pytest.mark.parametrize(
    "device_id", [*sorted(RESERVED_NAMES), f"{FLEET_MANAGER_USER}-coordinator"]
)
def test_the_fleet_managers_ids_are_reserved(device_id: str) -> None:
    """A device connecting as ``fleet-manager`` (or one of its role ids) would take over the
    fleet manager's MQTT session on a broker that does not force client id = username."""
    with pytest.raises(ConfigError, match="reserved"):
        validate_device_id(device_id)


def test_the_fleet_side_uses_the_same_rule() -> None:
    """fleet.ops keeps its public names, and they are this module's objects."""
    from device import identity
    from fleet.ops import certs, enroll

    assert certs.validate_device_id is identity.validate_device_id
    assert certs.FLEET_MANAGER_USER == enroll.FLEET_MANAGER_USER == identity.FLEET_MANAGER_USER
    assert certs.RESERVED_NAMES is identity.RESERVED_NAMES


@pytest.mark.parametrize("device_id", ["fleet-manager", "dev 9", "a/b"])
def test_a_device_config_with_a_bad_id_is_refused_at_its_line(
    device_id: str, tmp_path: Path
) -> None:
    """Refused when the config loads, before anything connects."""
    path = tmp_path / "device.yaml"
    path.write_text(f"data: {{dataset: digits}}\ndevice_id: '{device_id}'\n")
    with pytest.raises(ConfigError, match=rf"device\.yaml:2: device_id: '{device_id}' "):
        load_device_config(path)

"""``fleet-device`` without a broker: config validation and errors with exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.cli import main
from device.errors import ConfigError, DataError
from tests.device.userdata import IMAGE_CLASSES, bar_images

REPO = Path(__file__).resolve().parents[2]


def test_check_accepts_the_example_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example must stay valid: users copy it."""
    assert main(["check", "--config", str(REPO / "examples" / "device.yaml"), "--no-broker"]) == 0
    out = capsys.readouterr().out
    assert "device pi-kitchen-01" in out and "training examples" in out


def test_bad_config_exits_with_the_config_code_and_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "device.yaml"
    path.write_text("device_id: d1\nbroker:\n  url: mqtt://x\n  keepalive_s: soon\n")
    assert main(["check", "--config", str(path), "--no-broker"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "device.yaml:4: broker.keepalive_s: expected an integer" in err


def test_an_unknown_profile_model_is_a_located_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the profiled model would profile nothing useful; say so before starting."""
    path = tmp_path / "device.yaml"
    path.write_text("device_id: d1\ndata:\n  dataset: digits\nprofile_model: mnist_cnm\n")
    assert main(["check", "--config", str(path), "--no-broker"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "device.yaml:4: profile_model: unknown model 'mnist_cnm'; known: " in err
    assert "mnist_cnn" in err


def test_world_readable_password_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret others can read is a leak waiting to happen; refuse to start with it."""
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    path = tmp_path / "device.yaml"
    path.write_text(
        f"device_id: d1\nbroker:\n  password_file: {secret}\ndata:\n  dataset: digits\n"
    )
    assert main(["check", "--config", str(path)]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "readable by others" in err and "hunter2" not in err


def test_check_reads_data_that_leaves_its_classes_to_the_run_with_classes_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = bar_images(tmp_path / "img", per_class=4)
    path = tmp_path / "device.yaml"
    path.write_text(
        f"device_id: d1\ndata:\n  format: imagefolder\n  path: {images}\n  resize: [8, 8]\n"
        "  channels: 1\n"
    )
    assert main(["check", "--config", str(path), "--no-broker"]) == 0
    assert "not read (its classes come from the run; give --classes" in capsys.readouterr().out
    given = ",".join(IMAGE_CLASSES)
    assert main(["check", "--config", str(path), "--no-broker", "--classes", given]) == 0
    assert "imagefolder" in (out := capsys.readouterr().out) and "12 training examples" in out
    code = main(["check", "--config", str(path), "--no-broker", "--classes", "left,right"])
    assert code == DataError.exit_code
    assert "middle" in capsys.readouterr().err

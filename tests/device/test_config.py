"""Config files: a typo or a wrong type must point at the file, the line and the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from device.config import SettingError, from_mapping, load
from device.errors import ConfigError


@dataclass(frozen=True)
class Training:
    lr: float = 0.01
    epochs: int = 1


@dataclass(frozen=True)
class Run:
    name: str
    strategy: Literal["fedavg", "feddst"] = "fedavg"
    training: Training = field(default_factory=Training)
    tags: tuple[str, ...] = ()
    data_dir: Path | None = None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_file_builds_nested_dataclasses(tmp_path: Path) -> None:
    path = write(
        tmp_path, "name: a\nstrategy: feddst\ntraining:\n  lr: 1\ntags: [x, y]\ndata_dir: data\n"
    )
    run = load(path, Run)
    assert run == Run(
        name="a",
        strategy="feddst",
        training=Training(lr=1.0),
        tags=("x", "y"),
        data_dir=tmp_path / "data",
    )


def test_wrong_type_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraining:\n  epochs: 2\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: training\.lr: expected a number"):
        load(path, Run)


def test_unknown_key_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraning:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:2: traning: unknown setting; known: "):
        load(path, Run)


def test_literal_lists_the_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\nstrategy: fedsgd\n")
    with pytest.raises(ConfigError, match=r":2: strategy: expected one of 'fedavg', 'feddst'"):
        load(path, Run)


def test_missing_required_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "strategy: feddst\n")
    with pytest.raises(ConfigError, match=r"name: required setting is missing"):
        load(path, Run)


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraining: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: not valid YAML"):
        load(path, Run)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.yaml", Run)


def test_bool_is_not_an_integer() -> None:
    with pytest.raises(ConfigError, match=r"training\.epochs: expected an integer, got True"):
        from_mapping({"name": "a", "training": {"epochs": True}}, Run)


@dataclass(frozen=True)
class Schedule:
    rounds: int = 10
    end: int = 5

    def __post_init__(self) -> None:
        if self.end > self.rounds:
            raise SettingError("end", f"must be at most rounds ({self.rounds}), got {self.end}")


@dataclass(frozen=True)
class Plan:
    schedule: Schedule = field(default_factory=Schedule)


def test_a_schema_check_points_at_the_setting_it_rejects(tmp_path: Path) -> None:
    """A cross-field check is reported at the rejected setting's own line, like a type error."""
    path = write(tmp_path, "schedule:\n  rounds: 4\n  end: 9\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: schedule.end: must be at most rounds"):
        load(path, Plan)


def test_an_empty_value_is_none_not_a_crash(tmp_path: Path) -> None:
    """``key:`` with nothing after it is YAML's null; it must be reported like any wrong type
    (it used to escape as a yaml ParserError traceback)."""
    path = write(tmp_path, "name:\nstrategy: feddst\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: name: expected a string, got None"):
        load(path, Run)


def test_an_empty_value_for_an_optional_setting_means_none(tmp_path: Path) -> None:
    assert load(write(tmp_path, "name: a\ndata_dir:\n"), Run).data_dir is None


def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    """YAML loaders keep the last of two equal keys, so a whole first section would be ignored
    without a word; name both lines instead."""
    path = write(tmp_path, "name: a\ntraining:\n  lr: 0.5\nname: b\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: name: given twice .*first on line 1"):
        load(path, Run)


def test_a_python_tag_is_refused_as_invalid_yaml(tmp_path: Path) -> None:
    """Only safe YAML is read; an object tag is a located config error, never constructed."""
    path = write(tmp_path, "name: !!python/name:os.getcwd ''\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: not valid YAML: could not determine"):
        load(path, Run)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text \(byte 9\)"):
        load(path, Run)

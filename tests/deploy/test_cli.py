"""``fleet model`` without a broker: keygen, export, inspect, history, and the errors a user
meets first (one line, the documented exit code)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from device.errors import ConfigError, NotFoundError
from fleet.cli import cli
from fleet.runtime.run_control import RunFiles
from tests.deploy.helpers import RUN, store_with_run


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def fleet(state: Path, *args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["--state-dir", str(state), *map(str, args)])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    store_with_run(tmp_path / "state", versions=3).close()
    return tmp_path / "state"


def test_export_writes_a_signed_artefact_and_reports_its_manifest(
    state: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.sfm"
    result = fleet(state, "model", "export", RUN, "--dataset", "digits", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["file"] == str(out) and report["bytes"] == out.stat().st_size
    assert report["manifest"]["source"]["round"] == 2
    assert (state / "pki" / "deploy-signing.key").stat().st_mode & 0o077 == 0
    inspected = fleet(state, "model", "inspect", out)
    assert inspected.exit_code == 0, inspected.output
    assert "signature: valid" in inspected.output and "lab-r2-int8" in inspected.output


def test_export_takes_the_dataset_from_the_run_launch_record(state: Path, tmp_path: Path) -> None:
    RunFiles(state, RUN).write_launch({"kind": "simulate", "data": {"dataset": "digits"}})
    out = tmp_path / "m.sfm"
    result = fleet(state, "model", "export", RUN, "--round", "1", "--values", "fp16", "-o", out)
    assert result.exit_code == 0, result.output
    from device.wire.artefact import read_artefact

    manifest = read_artefact(out.read_bytes()).manifest
    assert manifest.preprocess == {"mean": [0.3053], "std": [0.376]}
    assert manifest.version == "lab-r1-fp16"


def test_export_of_an_unknown_run_is_one_line_and_exit_code_5(state: Path, tmp_path: Path) -> None:
    result = fleet(state, "model", "export", "nope", "-o", tmp_path / "x")
    assert result.exit_code == NotFoundError.exit_code
    assert result.output.strip().startswith("fleet: error:") and "nope" in result.output


def test_keygen_refuses_to_replace_a_key_silently(state: Path) -> None:
    assert fleet(state, "model", "keygen").exit_code == 0
    again = fleet(state, "model", "keygen")
    assert again.exit_code == ConfigError.exit_code and "--force" in again.output
    assert fleet(state, "model", "keygen", "--force").exit_code == 0


def test_rollback_with_nothing_deployed_is_a_clear_error(state: Path) -> None:
    result = fleet(state, "model", "rollback")
    assert result.exit_code == NotFoundError.exit_code
    assert "no version to roll back to" in result.output


def test_history_and_status_of_an_empty_fleet(state: Path) -> None:
    history = fleet(state, "model", "history")
    assert history.exit_code == 0 and "nothing deployed yet" in history.output
    status = fleet(state, "model", "status", "--no-refresh", "--json")
    assert status.exit_code == 0
    assert json.loads(status.output) == {"devices": []}


def test_inspect_refuses_a_tampered_artefact(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.sfm"
    assert fleet(state, "model", "export", RUN, "-o", out).exit_code == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    result = fleet(state, "model", "inspect", out)
    assert result.exit_code != 0 and result.output.startswith("fleet: error:")

"""examples/byo end to end: its data preparation, its run file and its own model file.

The example's ``prepare_wine.py`` writes scikit-learn's bundled wine table into ``tmp_path``,
its run file (shortened to 2 rounds, otherwise as shipped) is simulated over a real mosquitto
with ``examples/byo`` on the path of this process and, through PYTHONPATH, of the simulated
devices' worker processes, as docs/your-model.md tells a user to. No server-side test set:
every round must store the devices' federated figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.cli.helpers import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "byo"


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """``examples/byo`` importable here and in spawned device processes."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", f"{EXAMPLE}{os.pathsep}{pythonpath}" if pythonpath else str(EXAMPLE)
    )
    return EXAMPLE


def _prepare(out_dir: Path) -> Path:
    """Run the example's ``prepare_wine.prepare`` as the script would."""
    spec = importlib.util.spec_from_file_location("prepare_wine", EXAMPLE / "prepare_wine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path: Path = module.prepare(out_dir)
    return path


def test_the_byo_example_trains_feddst_over_mosquitto_with_federated_evaluation(
    tmp_path: Path, example_on_path: Path
) -> None:
    csv_path = _prepare(tmp_path / "data")
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + 178 and lines[0].endswith(",cultivar")

    config = yaml.safe_load((example_on_path / "wine-feddst.yaml").read_text())
    assert config["run"]["model"]["factory"] == "wine_model:build"
    assert config["data"]["data_dir"] == "data"  # relative to the run file
    config["run"]["rounds"] = 2
    run_file = tmp_path / "wine-feddst.yaml"
    run_file.write_text(yaml.safe_dump(config))

    fleet = Fleet(state_dir=tmp_path / "state", tmp=tmp_path)
    result = fleet("simulate", run_file, "--transport", "mqtt")
    assert result.exit_code == 0, result.output
    result = fleet("run", "status", config["run"]["id"], "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["status"] == "finished" and status["strategy"] == "feddst"
    assert status["config"]["model_ref"]["factory"] == "wine_model:build"
    devices = config["simulation"]["devices"]
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    for entry in status["rounds"]:
        assert entry["accuracy"] is None  # no test set on the fleet manager
        assert entry["federated_devices"] == devices  # fraction 1.0: every device answers
        assert 0 < entry["federated_examples"] < 178
        assert 0.0 <= entry["federated_accuracy"] <= 1.0
        assert entry["federated_loss"] >= 0.0
    assert status["federated_accuracy"] == status["rounds"][-1]["federated_accuracy"]
    # Each simulated device read its own directory of CSV rows cut from the prepared file.
    device_dirs = sorted((fleet.state_dir / "simdata" / config["run"]["id"]).iterdir())
    assert len(device_dirs) == devices and all(any(d.rglob("*.csv")) for d in device_dirs)

"""Run files with federated evaluation and a user's dataset, and what `fleet run status` (and
--json), the live progress and `fleet run report` show of federated evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from device.errors import ConfigError
from fleet.cli.runfile import load_config, run_spec, sim_spec
from fleet.report import build_figures, load_series, markdown
from fleet.runtime.spec import FederatedEvaluation
from fleet.state.store import Store
from tests.cli.helpers import Fleet
from tests.device.userdata import bar_images

FEDERATED = "evaluate: {every: 2, fraction: 0.5, min_devices: 2, timeout_s: 30}"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


RUN = """\
run:
  model: mlp
  strategy: fedavg
  rounds: 2
  clients_per_round: 2
{run_extra}
{data}
"""


def test_evaluate_settings_reach_the_run_spec(tmp_path: Path) -> None:
    path = write(tmp_path, RUN.format(run_extra=f"  {FEDERATED}", data=""))
    spec = run_spec(load_config(path), "r")
    assert spec.evaluate == FederatedEvaluation(
        every=2, fraction=0.5, min_devices=2, timeout_s=30.0
    )


def test_a_bad_evaluate_setting_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, RUN.format(run_extra="  evaluate: {every: 0}", data=""))
    with pytest.raises(ConfigError, match=r"run\.yaml:6: run\.evaluate: every: must be at least"):
        load_config(path)


def test_a_local_format_data_section_reaches_the_simulation(tmp_path: Path) -> None:
    bar_images(tmp_path / "images", per_class=1)
    data = """\
data:
  dataset: imagefolder
  data_dir: images
  classes: [left, middle, right]
  options: {channels: 1, resize: [8, 8]}
  eval_fraction: 0.3
  seed: 5
"""
    config = load_config(write(tmp_path, RUN.format(run_extra="", data=data)))
    sim = sim_spec(config)
    assert sim.dataset == "imagefolder" and sim.data_dir == tmp_path / "images"
    assert sim.data_options == {
        "channels": 1,
        "resize": [8, 8],
        "classes": ["left", "middle", "right"],
        "eval_fraction": 0.3,
        "seed": 5,
    }


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ("  dataset: npz\n  data_dir: a\n", r":8: data: classes: required for dataset npz"),
        (
            "  dataset: npz\n  data_dir: a\n  classes: [a, b]\n  options: {window: 3}\n",
            r":11: data\.options: window: is a setting of format csv",
        ),
        ("  dataset: digits\n  classes: [a, b]\n", r":9: data\.classes: only for the local"),
        (
            "  dataset: npz\n  data_dir: a\n  classes: [a, b]\n  eval_fraction: 0\n",
            r":11: data\.eval_fraction: must be above 0 while evaluate is true",
        ),
    ],
)
def test_bad_local_data_settings_name_the_setting(tmp_path: Path, data: str, where: str) -> None:
    path = write(tmp_path, RUN.format(run_extra="", data="data:\n" + data))
    with pytest.raises(ConfigError, match=where):
        load_config(path)


def test_a_run_without_a_test_set_is_valid_and_measured_on_the_devices(
    fleet: Fleet, tmp_path: Path
) -> None:
    """No server-side test set (data.evaluate: false): federated evaluation is the measure,
    in the progress lines, `fleet run status` (text and --json) and the report."""
    config = write(
        tmp_path,
        "run:\n  id: fed\n  model: mlp\n  strategy: fedavg\n  rounds: 3\n"
        "  clients_per_round: 3\n  round_timeout_s: 300\n  training: {epochs: 1, lr: 0.05}\n"
        f"  {FEDERATED}\n"
        "data:\n  dataset: digits\n  evaluate: false\nsimulation:\n  devices: 4\n",
    )
    result = fleet("simulate", config)
    assert result.exit_code == 0, result.output
    assert "fed " in next(line for line in result.stdout.splitlines() if "round 2/3" in line)

    status = fleet("run", "status", "fed", "--json")
    data = json.loads(status.stdout)
    by_round = {r["round"]: r for r in data["rounds"]}
    assert by_round[1]["federated_accuracy"] is None  # not due
    for round_ in (2, 3):  # every 2, and the last
        assert 0.0 <= by_round[round_]["federated_accuracy"] <= 1.0
        assert by_round[round_]["federated_devices"] == 2
        assert by_round[round_]["federated_examples"] > 0
        assert by_round[round_]["accuracy"] is None  # no server-side test set
    assert data["federated_accuracy"] == by_round[3]["federated_accuracy"]
    text = fleet("run", "status", "fed").stdout
    assert "federated accuracy" in text and "2 devices" in text

    with Store(fleet.state_dir) as store:
        series = [load_series(store, "fed", layers=False)]
    figures = build_figures(series)
    lines = {
        line.get_label(): line for line in figures["accuracy_vs_round.png"].axes[0].get_lines()
    }
    federated = lines["fed (fedavg), federated"]
    assert list(federated.get_xdata()) == [2, 3] and federated.get_linestyle() == "--"
    report = markdown(series, list(figures))
    row = next(line for line in report.splitlines() if line.startswith("| fed |"))
    assert f"{100 * by_round[3]['federated_accuracy']:.1f}%" in row
    assert not math.isnan(series[0].final_federated_accuracy)

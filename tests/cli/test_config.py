"""Run files: what `fleet config check` accepts, and errors that point at the file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from device.data import MNIST_FILES, write_idx
from device.errors import ConfigError
from fleet.cli.runfile import (
    check_run_id,
    default_run_id,
    demo_config,
    dense_baseline,
    load_config,
    run_spec,
    sim_spec,
)
from fleet.strategies import create_strategy
from tests.cli.helpers import Fleet, error_line

# Run files (a top-level `run:`); examples/ also holds device configs, which fleet-device reads.
EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")
    if "run" in (yaml.safe_load(p.read_text()) or {})
)


def test_the_examples_exist() -> None:
    """The issue asks for MNIST FedDST, MNIST PruneFL, the FedAvg baselines and the demo."""
    names = {p.name for p in EXAMPLES}
    assert {
        "mnist-feddst.yaml",
        "mnist-prunefl.yaml",
        "mnist-fedavg.yaml",
        "mnist-fedavgm.yaml",
        "digits-demo.yaml",
    } <= names


def _tiny_mnist(directory: Path) -> None:
    """Four small IDX files under the names MNIST's loader looks for (8 images a split)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, (images, labels) in MNIST_FILES.items():
        del split
        write_idx(directory / f"{images}.gz", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{labels}.gz", rng.integers(0, 10, 8, dtype=np.uint8))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_config_check(fleet: Fleet, example: Path, tmp_path: Path) -> None:
    """A shipped example that fails validation would be the first thing a user tries. The MNIST
    examples read ../data/mnist relative to themselves: copies beside small IDX files stand in
    for the real data set (config check looks for the files, it does not train)."""
    copy = tmp_path / "examples" / example.name
    copy.parent.mkdir()
    copy.write_text(example.read_text())
    _tiny_mnist(tmp_path / "data" / "mnist")
    result = fleet("config", "check", copy)
    assert result.exit_code == 0, result.output
    assert f"{copy}: OK" in result.stdout
    config = load_config(example)
    # The strategy the file names accepts its options (what `run start` will build).
    create_strategy(config.run.strategy, **run_spec(config, "x").strategy_options)


def test_config_check_json_summarises_the_run(fleet: Fleet) -> None:
    path = fleet.write_config(rounds=7)
    result = fleet("config", "check", path, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert (data["strategy"], data["model"], data["rounds"]) == ("feddst", "mlp", 7)
    assert data["options"]["clients_per_round"] == 3


def test_a_wrong_type_names_file_line_and_field(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "run:\n  model: mlp\n  strategy: feddst\n  rounds: 3\n  clients_per_round: 2\n"
        "  training:\n    lr: fast\n"
    )
    result = fleet("config", "check", path)
    assert result.exit_code == 3
    assert error_line(result) == (
        f"fleet: error: {path}:7: run.training.lr: expected a number, got 'fast'"
    )


def test_an_unknown_key_is_an_error_not_a_silent_default(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(
        "run:\n  model: mlp\n  strategy: feddst\n  rounds: 3\n  clients_per_round: 2\n"
        "  round_timeout: 10\n"
    )
    result = fleet("config", "check", path)
    assert result.exit_code == 3
    line = error_line(result)
    assert f"{path}:6: run.round_timeout: unknown setting" in line
    assert "round_timeout_s" in line  # the known settings are listed


def test_a_bad_strategy_option_points_at_the_options_line(fleet: Fleet) -> None:
    path = fleet.write_config(options="options: {density: 1.5}")
    result = fleet("config", "check", path)
    assert result.exit_code == 3
    line = error_line(result)
    assert f"{path}:9: run.options:" in line
    assert "density must be a kept fraction in (0, 1], got 1.5" in line


def test_an_unknown_strategy_option_lists_the_known_ones(fleet: Fleet) -> None:
    path = fleet.write_config(options="options: {densty: 0.3}")
    line = error_line(fleet("config", "check", path))
    assert "unknown option(s) ['densty']" in line
    assert "density" in line


def test_unknown_model_lists_the_registry(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(
        "run:\n  model: resnet\n  strategy: feddst\n  rounds: 3\n  clients_per_round: 2\n"
    )
    result = fleet("config", "check", path)
    assert result.exit_code == 3
    line = error_line(result)
    assert "unknown model 'resnet'" in line and "mnist_cnn" in line


def test_a_model_that_cannot_read_the_dataset_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    """Caught at check time, not as a shape error on every device in round 1."""
    path = tmp_path / "mismatch.yaml"
    path.write_text(
        "run:\n  model: mnist_cnn\n  strategy: fedavg\n  rounds: 3\n  clients_per_round: 2\n"
        "data:\n  dataset: digits\n"
    )
    line = error_line(fleet("config", "check", path))
    assert f"{path}:2: run.model:" in line
    assert "(1, 28, 28)" in line and "(1, 8, 8)" in line


def test_options_may_not_repeat_run_level_settings(fleet: Fleet) -> None:
    path = fleet.write_config(options="options: {clients_per_round: 5}")
    line = error_line(fleet("config", "check", path))
    assert "options.clients_per_round: set it once, as run.clients_per_round" in line


def test_a_missing_file_is_a_config_error(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet("config", "check", tmp_path / "nope.yaml")
    assert result.exit_code == 3
    assert "nope.yaml: no such file" in error_line(result)


def test_run_spec_carries_run_level_settings_into_the_strategy(fleet: Fleet) -> None:
    """clients_per_round and training are given once and reach the strategy; FedDST's run
    length defaults to the run's rounds (its T_end is half of it)."""
    config = load_config(fleet.write_config(rounds=12))
    spec = run_spec(config, "r1")
    assert spec.run_id == "r1" and spec.rounds == 12 and spec.clients_per_round == 3
    options = spec.strategy_options
    assert options["clients_per_round"] == 3
    assert options["training"]["lr"] == 0.05
    assert options["total_rounds"] == 12
    assert options["density"] == 0.3


def test_sim_spec_takes_devices_from_the_file_or_the_override(fleet: Fleet) -> None:
    config = load_config(fleet.write_config())
    assert sim_spec(config).devices == 4
    assert sim_spec(config, devices=9).devices == 9
    assert sim_spec(config).dataset == "digits"


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "a b", "x" * 65])
def test_run_ids_that_cannot_name_files_or_topics_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="run id"):
        check_run_id(bad)


def test_default_run_id_is_the_stem_and_the_time() -> None:
    run_id = default_run_id("my run", now=0.0)
    assert run_id.startswith("my-run-")
    assert check_run_id(run_id) == run_id


def test_the_demo_example_is_the_demo() -> None:
    """`fleet demo` builds its digits run in code; examples/digits-demo.yaml documents it. They
    must not drift apart."""
    path = next(p for p in EXAMPLES if p.name == "digits-demo.yaml")
    from_file = load_config(path)
    in_code = demo_config("digits")
    assert from_file.run == in_code.run
    assert from_file.data == in_code.data
    assert from_file.simulation == in_code.simulation


def test_the_dense_baseline_changes_only_the_strategy() -> None:
    feddst = demo_config("digits", rounds=4)
    fedavg = dense_baseline(feddst)
    assert fedavg.run.strategy == "fedavg" and fedavg.run.options == {}
    assert (fedavg.run.model, fedavg.run.rounds, fedavg.run.training) == (
        feddst.run.model,
        feddst.run.rounds,
        feddst.run.training,
    )
    assert fedavg.data == feddst.data and fedavg.simulation == feddst.simulation


def test_config_check_fails_when_the_data_the_run_needs_is_missing(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Regression (issue 23, item 7): config check said OK for an MNIST run whose data
    directory does not exist, and `run start` then failed with exit 6."""
    example = Path(__file__).resolve().parents[2] / "examples" / "mnist-feddst.yaml"
    copy = tmp_path / "examples" / "mnist-feddst.yaml"
    copy.parent.mkdir()
    copy.write_text(example.read_text())
    result = fleet("config", "check", copy)
    assert result.exit_code == 3
    line = error_line(result)
    assert "data.data_dir" in line and "MNIST" in line and "does not exist" in line
    assert str(tmp_path / "examples" / ".." / "data" / "mnist") in line


def test_config_check_needs_the_training_split_only_for_simulations(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A run for real devices reads only the test split on the fleet manager; a simulated run
    partitions the training split over its devices, so it needs both."""
    data = tmp_path / "mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    images, labels = MNIST_FILES["test"]
    write_idx(data / f"{images}.gz", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
    write_idx(data / f"{labels}.gz", rng.integers(0, 10, 8, dtype=np.uint8))
    body = (
        "run:\n  model: mnist_cnn\n  strategy: fedavg\n  rounds: 1\n  clients_per_round: 1\n"
        f"data:\n  dataset: mnist\n  data_dir: {data}\n"
    )
    real = tmp_path / "real.yaml"
    real.write_text(body)
    assert fleet("config", "check", real).exit_code == 0
    simulated = tmp_path / "sim.yaml"
    simulated.write_text(body + "simulation:\n  devices: 2\n")
    result = fleet("config", "check", simulated)
    assert result.exit_code == 3 and "MNIST train split not found" in error_line(result)

"""Run files and device configs that name a user's model: a factory with kwargs, a registered
name, prunable patterns, and every way of getting them wrong (one error at the file and line).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device.errors import ConfigError
from device.model_ref import ModelRef
from device.settings import load_device_config
from fleet.cli.runfile import load_config, run_spec
from fleet.runtime.spec import RunSpec
from tests.cli.helpers import Fleet, error_line
from tests.model_packages import make_package, unique_name

RUN = """\
run:
  model: {model}
  strategy: feddst
  rounds: 2
  clients_per_round: 2
  {extra}
data:
  dataset: digits
"""


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = unique_name()
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "site", name)))
    return name


def _write(tmp_path: Path, model: str, extra: str = "") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(model=model, extra=extra), encoding="utf-8")
    return path


def test_a_factory_model_with_kwargs_becomes_the_runs_reference(
    package: str, tmp_path: Path
) -> None:
    path = _write(
        tmp_path,
        f'{{factory: "{package}:build", kwargs: {{width: 24}}, input_shape: [1, 8, 8], '
        "num_classes: 10}",
        extra='prunable: ["fc1\\\\.weight"]',
    )
    spec = run_spec(load_config(path), "r1")
    expected = ModelRef(
        factory=f"{package}:build", kwargs={"width": 24}, input_shape=(1, 8, 8), num_classes=10
    )
    assert spec.model == expected and spec.model_name == f'{package}:build{{"width":24}}'
    assert spec.prunable == (r"fc1\.weight",)
    assert RunSpec.from_json(spec.to_json()) == spec  # as the store keeps it


def test_a_plain_string_names_a_model_as_before_and_old_specs_still_load() -> None:
    stored = {
        "run_id": "old",
        "model_name": "mlp",
        "strategy": "fedavg",
        "rounds": 1,
        "clients_per_round": 1,
    }
    spec = RunSpec.from_json(stored)
    assert spec.model == ModelRef(name="mlp") and spec.prunable == ()


@pytest.mark.parametrize(
    ("model", "extra", "where", "message"),
    [
        ("resnet", "", "run.model", "unknown model 'resnet'; known: "),
        ('"{pkg}_gone:build"', "", "run.model", "model factory '{pkg}_gone:build': cannot import"),
        ('"{pkg}:broken_raises"', "", "run.model", "raised RuntimeError: no GPU here"),
        ('"{pkg}:broken_not_module"', "", "run.model", "returned dict, not a torch.nn.Module"),
        ("{{factory: nocolon}}", "", "run.model", "is not 'package.module:callable'"),
        ("{{name: mlp, kwargs: {{hidden: 0}}}}", "", "run.model", "hidden must be at least 1"),
        ("mlp", 'prunable: ["bn.*"]', "run.prunable", "'bn.*' matches no parameter"),
        ("mlp", 'prunable: ["("]', "run.prunable", "is not a regular expression"),
        (
            "{{name: mlp, input_shape: [1, 28, 28], num_classes: 10}}",
            "",
            "run.model",
            "reads examples of shape (1, 28, 28), but dataset 'digits' has (1, 8, 8)",
        ),
    ],
)
def test_bad_models_are_one_error_at_the_setting(
    package: str, tmp_path: Path, model: str, extra: str, where: str, message: str
) -> None:
    path = _write(tmp_path, model.format(pkg=package), extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:") and f": {where}" in text, text
    assert message.format(pkg=package) in text, text


def test_the_runs_classes_are_stored_with_it_and_checked_against_the_model(
    tmp_path: Path,
) -> None:
    names = [f"digit-{i}" for i in range(10)]
    spec = run_spec(load_config(_write(tmp_path, "mlp", f"classes: {names}")), "r1")
    assert spec.classes == tuple(names)
    assert RunSpec.from_json(spec.to_json()) == spec
    assert run_spec(load_config(_write(tmp_path, "mlp")), "r2").classes == ()


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (str(list("abcdefghijk")), "11 names but the model has only 10 outputs (num_classes)"),
        ("[a]", "needs at least 2 classes, got 1"),
        ("[a, b, a, c, d, e, f, g, h, i]", "listed more than once: a"),
    ],
)
def test_bad_run_classes_are_one_error_at_the_setting(
    tmp_path: Path, classes: str, message: str
) -> None:
    path = _write(tmp_path, "mlp", f"classes: {classes}")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: run\.classes: .*{re.escape(message)}"):
        load_config(path)


def test_the_data_sections_classes_are_the_runs_unless_they_disagree(tmp_path: Path) -> None:
    digits = [str(i) for i in range(10)]
    local = f"data:\n  dataset: npz\n  data_dir: arrays\n  classes: {digits}\n"
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(model="mlp", extra="").split("data:")[0] + local)
    assert run_spec(load_config(path), "r").classes == tuple(digits)  # taken from data
    other = list(reversed(digits))
    path.write_text(RUN.format(model="mlp", extra=f"classes: {other}").split("data:")[0] + local)
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: data\.classes: .* differ from run"):
        load_config(path)


def test_fleet_config_check_names_the_failing_factory(
    fleet: Fleet, package: str, tmp_path: Path
) -> None:
    result = fleet("config", "check", _write(tmp_path, f'"{package}:broken_raises"'))
    assert result.exit_code == 3
    assert f"run.model: model factory '{package}:broken_raises' raised" in error_line(result)


DEVICE = """\
device_id: pi-1
{models}
"""


def test_a_device_offers_the_builtins_unless_its_config_lists_models(
    package: str, tmp_path: Path
) -> None:
    path = tmp_path / "device.yaml"
    path.write_text(DEVICE.format(models=""), encoding="utf-8")
    assert [r.text for r in load_device_config(path).model_refs()] == [
        "cifar_cnn",
        "femnist_cnn",
        "mlp",
        "mnist_cnn",
    ]
    path.write_text(
        DEVICE.format(
            models=f'models: [mlp, "{package}:build", {{factory: "{package}:build", '
            "kwargs: {width: 4}}]"
        ),
        encoding="utf-8",
    )
    assert [r.text for r in load_device_config(path).model_refs()] == [
        "mlp",
        f"{package}:build",
        f'{package}:build{{"width":4}}',
    ]
    path.write_text(DEVICE.format(models="models: [resnet]"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"device.yaml:2: models: unknown model 'resnet'"):
        load_device_config(path)

"""The device's data as its agent sees it: the config's ``data:`` section (a bundled dataset or a
local format, with located errors), the re-scan before each job, and the side each job reads."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from device.data import Dataset, LocalDataSpec, load_digits
from device.errors import ConfigError, DataError
from device.local_data import (
    BundledData,
    DataCounts,
    LocalData,
    data_for_job,
    open_device_data,
)
from device.settings import DataConfig, load_device_config
from device.wire.messages import EvaluateCommand, RoundCommand
from tests.device.userdata import BAD_DATA, IMAGE_CLASSES, bad_data, bar_images, image_spec

ROUND = RoundCommand(model_version=1, model_digest=b"d", partition="3")
EVALUATE = EvaluateCommand(model_version=1, model_digest=b"d")


def device_yaml(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text("device_id: pi-1\ndata:\n" + textwrap.indent(textwrap.dedent(data), "  "))
    return path


# -- the config's data section ------------------------------------------------------------------


def test_a_local_format_section_loads_with_its_options(tmp_path: Path) -> None:
    path = device_yaml(
        tmp_path,
        """\
        format: csv
        path: logs
        classes: [walk, run]
        label_column: activity
        timestamp_column: t
        window: 32
        stride: 16
        eval_fraction: 0.25
        seed: 7
        """,
    )
    data = load_device_config(path).data
    assert data == LocalDataSpec(
        format="csv",
        path=tmp_path / "logs",  # relative to the file, as every path of the config
        classes=("walk", "run"),
        label_column="activity",
        timestamp_column="t",
        window=32,
        stride=16,
        eval_fraction=0.25,
        seed=7,
    )


def test_the_bundled_datasets_keep_working(tmp_path: Path) -> None:
    path = device_yaml(tmp_path, "dataset: digits\n")
    data = load_device_config(path).data
    assert data == DataConfig(dataset="digits") and data.eval_fraction == 0.0


def test_a_bad_format_option_is_reported_at_its_line(tmp_path: Path) -> None:
    path = device_yaml(
        tmp_path,
        """\
        format: csv
        path: logs
        classes: [walk, run]
        label_column: activity
        window: 0
        """,
    )
    with pytest.raises(ConfigError, match=r"device\.yaml:7: data\.window: must be at least 1"):
        load_device_config(path)


def test_an_option_of_another_format_is_an_error_not_ignored(tmp_path: Path) -> None:
    path = device_yaml(tmp_path, "format: imagefolder\npath: img\nclasses: [a, b]\nwindow: 4\n")
    with pytest.raises(ConfigError, match=r":6: data\.window: is a setting of format csv"):
        load_device_config(path)


def test_a_device_may_leave_the_classes_to_the_run(tmp_path: Path) -> None:
    """The run's classes come with its model snapshot: the config need not repeat them, and
    nothing is read until they are known."""
    root = bar_images(tmp_path / "img", per_class=4)
    path = device_yaml(tmp_path, f"format: imagefolder\npath: {root}\nresize: [8, 8]\n")
    spec = load_device_config(path).data
    assert isinstance(spec, LocalDataSpec) and spec.classes is None
    data = LocalData(spec)
    with pytest.raises(
        DataError,
        match=r"no run has declared its classes yet.*run\.classes|"
        r"no run has declared its classes yet.*`classes:`",
    ):
        data.refresh()
    train, counts = data_for_job(data, ROUND, IMAGE_CLASSES)
    assert counts == DataCounts(train=12, evaluation=0) and len(train) == 12
    assert train.num_classes == 3


def test_a_run_without_classes_leaves_a_device_without_them_unable_to_read(
    tmp_path: Path,
) -> None:
    data = LocalData(image_spec(bar_images(tmp_path / "img"), classes=None))
    with pytest.raises(DataError, match="no run has declared its classes yet"):
        data_for_job(data, ROUND, ())


def test_classes_that_disagree_with_the_runs_fail_the_job_naming_both(tmp_path: Path) -> None:
    """Same names in another order would silently swap labels: refused, not trained."""
    data = LocalData(image_spec(bar_images(tmp_path / "img")))
    swapped = ("middle", "left", "right")
    with pytest.raises(DataError) as caught:
        data_for_job(data, ROUND, swapped)
    message = str(caught.value)
    assert "left, middle, right" in message and "middle, left, right" in message
    train, counts = data_for_job(data, ROUND, IMAGE_CLASSES)  # the run's own order trains
    assert counts is not None and len(train) == counts.train > 0


def test_a_label_outside_the_runs_classes_fails_the_job(tmp_path: Path) -> None:
    data = LocalData(image_spec(bar_images(tmp_path / "img"), classes=None))
    with pytest.raises(DataError, match="right"):
        data_for_job(data, ROUND, ("left", "middle"))


def test_a_bundled_dataset_takes_only_as_many_classes_as_it_has() -> None:
    data = BundledData(load_digits(split="train"))
    data_for_job(data, ROUND, tuple(str(i) for i in range(10)))
    with pytest.raises(DataError, match=r"the run declares 3 classes .* the data has 10"):
        data_for_job(data, ROUND, ("a", "b", "c"))


def test_bundled_and_local_settings_do_not_mix(tmp_path: Path) -> None:
    path = device_yaml(tmp_path, "dataset: digits\nformat: npz\n")
    with pytest.raises(ConfigError, match=r"device\.yaml:4: data\.format: unknown setting"):
        load_device_config(path)


# -- the data before each job -------------------------------------------------------------------


def test_new_images_are_used_by_the_next_job(tmp_path: Path) -> None:
    """Growing data: images recorded since the last job count at the next refresh."""
    root = bar_images(tmp_path / "img", per_class=4)
    data = LocalData(image_spec(root, eval_fraction=0.0))
    assert data.refresh() == DataCounts(train=12, evaluation=0)
    assert len(data.train()) == 12
    bar_images(tmp_path / "more", per_class=2, seed=5)
    for name in IMAGE_CLASSES:
        for image in (tmp_path / "more" / name).iterdir():
            image.rename(root / name / f"new-{image.name}")
    assert data.refresh() == DataCounts(train=18, evaluation=0)
    train = data.train()
    assert len(train) == 18 and train.example_shape == (1, 8, 8)


def test_a_job_reads_its_side_of_the_split(tmp_path: Path) -> None:
    data = LocalData(image_spec(bar_images(tmp_path / "img", per_class=20), eval_fraction=0.3))
    train, counts = data_for_job(data, ROUND)
    evaluation, _ = data_for_job(data, EVALUATE)
    assert counts is not None and (len(train), len(evaluation)) == (
        counts.train,
        counts.evaluation,
    )
    assert counts.train + counts.evaluation == 60 and counts.evaluation > 0
    # Disjoint: no evaluation example is one the device trained on.
    rows = {bytes(x.numpy()) for x in train.x}
    assert not any(bytes(x.numpy()) in rows for x in evaluation.x)


def test_no_evaluation_side_says_which_setting_to_change(tmp_path: Path) -> None:
    data = LocalData(image_spec(bar_images(tmp_path / "img", per_class=2), eval_fraction=0.0))
    with pytest.raises(DataError, match="eval_fraction"):
        data_for_job(data, EVALUATE)


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_is_one_error_naming_the_file_or_setting(kind: str, tmp_path: Path) -> None:
    data = LocalData(bad_data(kind, tmp_path))
    with pytest.raises(DataError, match=BAD_DATA[kind]):
        data_for_job(data, ROUND)


def test_a_bundled_dataset_split_is_deterministic_and_disjoint() -> None:
    digits = load_digits(split="train")
    a = BundledData(digits, eval_fraction=0.2, seed=3)
    b = BundledData(digits, eval_fraction=0.2, seed=3)
    counts = a.refresh()
    assert counts.train + counts.evaluation == len(digits)
    assert 0.1 < counts.evaluation / len(digits) < 0.3
    assert np.array_equal(a.evaluation().y.numpy(), b.evaluation().y.numpy())
    assert np.array_equal(a.train().x.numpy(), b.train().x.numpy())


def test_without_eval_fraction_a_bundled_dataset_evaluates_on_its_training_examples() -> None:
    """As before local formats: nothing is taken away from training."""
    digits = load_digits(split="train")
    data = BundledData(digits)
    assert data.refresh() == DataCounts(train=len(digits), evaluation=len(digits))
    assert data.evaluation() is data.train()


def test_open_device_data_follows_the_config(tmp_path: Path) -> None:
    assert isinstance(open_device_data(DataConfig(dataset="digits")), BundledData)
    root = bar_images(tmp_path / "img", per_class=1)
    assert isinstance(open_device_data(image_spec(root)), LocalData)


def test_a_plain_data_source_gets_the_commands_partition() -> None:
    """Agents built with a callable (tests, older callers) are handed what they were before."""
    seen: list[str] = []
    digits = load_digits(split="test")

    def source(partition: str) -> Dataset:
        seen.append(partition)
        return digits

    assert data_for_job(source, ROUND) == (digits, None)
    data_for_job(source, EVALUATE)
    assert seen == ["3", ""]

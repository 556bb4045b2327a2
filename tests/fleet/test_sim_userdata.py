"""A user's dataset split into per-device directories for a simulation: every device reads, in
the format it is given, exactly the examples its partition holds; the fleet manager's test set
stays out of all of them."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from device.data import LocalDataSpec, open_source
from device.errors import DataError
from fleet.sim.userdata import DeviceDirectories, materialise
from tests.device.userdata import SENSOR_CLASSES, bar_images, image_spec, sensor_csvs

IDS = ["sim-0000", "sim-0001", "sim-0002"]


def rows(spec: LocalDataSpec, side: str = "train") -> Counter[bytes]:
    """Every example of one side of ``spec``'s data, decoded, as a multiset of bytes (with its
    label), so that sets of examples compare whatever their order and identities."""
    source = open_source(spec)
    source.scan()
    examples = source.train() if side == "train" else source.evaluation()
    if not len(examples):
        return Counter()
    x, y = examples.batch(np.arange(len(examples)))
    return Counter(bytes(xi.numpy()) + bytes([int(yi)]) for xi, yi in zip(x, y, strict=True))


def union(specs: list[LocalDataSpec]) -> Counter[bytes]:
    total: Counter[bytes] = Counter()
    for spec in specs:
        total += rows(dataclasses.replace(spec, eval_fraction=0.0))
    return total


def test_image_folders_become_symlink_trees_that_hold_the_training_side(tmp_path: Path) -> None:
    spec = image_spec(bar_images(tmp_path / "img", per_class=10), eval_fraction=0.25)
    specs = materialise(
        spec,
        tmp_path / "devices",
        IDS,
        partitioner="dirichlet",
        partition_options={"beta": 0.5, "min_size": 2},
        seed=1,
        hold_out=True,
    )
    assert [s.path for s in specs] == [tmp_path / "devices" / d for d in IDS]
    links = [p for p in (tmp_path / "devices").rglob("*.png")]
    assert links and all(p.is_symlink() for p in links)  # nothing copied
    assert union(specs) == rows(spec, "train")  # each training example on exactly one device
    assert not set(union(specs)) & set(rows(spec, "evaluation"))  # the test set held out
    assert all(s.format == "imagefolder" and s.channels == 1 for s in specs)


def test_without_a_test_set_every_example_is_handed_out(tmp_path: Path) -> None:
    spec = image_spec(bar_images(tmp_path / "img", per_class=6), eval_fraction=0.25)
    specs = materialise(
        spec,
        tmp_path / "devices",
        IDS,
        partitioner="iid",
        partition_options={},
        seed=0,
        hold_out=False,
    )
    assert sum(union(specs).values()) == 18


def test_devices_split_their_own_data_for_federated_evaluation(tmp_path: Path) -> None:
    spec = image_spec(bar_images(tmp_path / "img", per_class=30), eval_fraction=0.3)
    specs = materialise(
        spec, tmp_path / "d", IDS, partitioner="iid", partition_options={}, seed=0, hold_out=True
    )
    counts = [DeviceDirectories(specs).counts(i) for i in range(3)]
    assert all(c.evaluation > 0 and c.train > 0 for c in counts)
    assert len({s.seed for s in specs}) == 3  # each device its own split


@pytest.mark.parametrize(("window", "stride"), [(None, None), (8, 8), (8, 3)])
def test_csv_rows_and_windows_are_cut_again_exactly(
    tmp_path: Path, window: int | None, stride: int | None
) -> None:
    """With windows, each run of a device's consecutive windows is a file of its own, so the
    device cuts the same windows again (overlapping ones too) and no window straddles two
    devices' rows. Rows are shuffled in the file: the timestamp orders them, as on a device."""
    folder = sensor_csvs(tmp_path / "csv", files=2)
    for path in folder.iterdir():
        lines = path.read_text().splitlines()
        body = lines[1:]
        np.random.default_rng(0).shuffle(body)
        path.write_text("\n".join([lines[0], *body]) + "\n")
    spec = LocalDataSpec(
        format="csv",
        path=folder,
        classes=SENSOR_CLASSES,
        label_column="activity",
        timestamp_column="t",
        window=window,
        stride=stride,
        eval_fraction=0.2,
    )
    specs = materialise(
        spec,
        tmp_path / "devices",
        IDS,
        partitioner="dirichlet",
        partition_options={"beta": 1.0, "min_size": 2},
        seed=2,
        hold_out=True,
    )
    assert union(specs) == rows(spec, "train")
    assert all(s.format == "csv" and s.window == window for s in specs)


def test_npz_examples_are_written_per_device(tmp_path: Path) -> None:
    (tmp_path / "arrays").mkdir()
    x = np.random.default_rng(0).normal(size=(40, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "arrays" / "all.npz", x=x, y=np.arange(40) % 2)
    spec = LocalDataSpec(format="npz", path=tmp_path / "arrays", classes=("a", "b"))
    specs = materialise(
        spec,
        tmp_path / "devices",
        IDS,
        partitioner="iid",
        partition_options={},
        seed=0,
        hold_out=True,
    )
    assert union(specs) == rows(spec, "train")
    assert all((s.path is not None and (s.path / "part.npz").is_file()) for s in specs)


def test_the_directories_are_the_same_on_every_call(tmp_path: Path) -> None:
    """A resumed simulation must give each device the data it had."""
    spec = image_spec(bar_images(tmp_path / "img", per_class=8))

    def listing() -> list[str]:
        materialise(
            spec,
            tmp_path / "d",
            IDS,
            partitioner="dirichlet",
            partition_options={"beta": 0.5, "min_size": 2},
            seed=4,
            hold_out=True,
        )
        return sorted(
            str(Path(folder, name).relative_to(tmp_path / "d"))
            for folder, _, names in os.walk(tmp_path / "d")
            for name in names
        )

    assert listing() == listing()


def test_a_device_without_examples_is_refused_up_front(tmp_path: Path) -> None:
    spec = image_spec(bar_images(tmp_path / "img", per_class=1), eval_fraction=0.0)
    with pytest.raises(DataError, match="gets no example"):
        materialise(
            spec,
            tmp_path / "d",
            [f"sim-{i:04d}" for i in range(5)],
            partitioner="dirichlet",
            partition_options={"beta": 0.1, "min_size": 0},
            seed=0,
            hold_out=False,
        )

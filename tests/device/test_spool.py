"""A side larger than ``data.in_memory_mb`` is decoded into a nameless file, read per batch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import device.data.local_source as local_source
from device.data import LocalDataSpec, open_source
from device.data.spool import Spool, spooled_tensor
from device.errors import DataError
from device.local_data import LocalData
from device.trainer import evaluate

CLASSES = ("a", "b", "c")


def npz_data(root: Path, n: int = 300, features: int = 40) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, len(CLASSES), size=n)
    np.savez(root / "part.npz", x=x, y=y)
    return root


def mapped_files(directory: Path) -> list[str]:
    """The file mappings of this process under ``directory`` (from /proc/self/maps)."""
    prefix = str(directory.resolve())
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return [line.split(maxsplit=5)[5].strip() for line in maps if prefix in line]


def spec(root: Path, **options: object) -> LocalDataSpec:
    return LocalDataSpec(
        format="npz",
        path=root,
        classes=CLASSES,
        eval_fraction=0.2,
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_side_over_the_limit_is_a_nameless_file_with_the_same_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_source, "SPOOL_CHUNK_BYTES", 1000)  # 6 examples per decode call
    root = npz_data(tmp_path / "data")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    in_memory = LocalData(spec(root))
    spooled = LocalData(spec(root, in_memory_mb=0.005, spool_dir=spool_dir))  # 5 KiB
    for data in (in_memory, spooled):
        data.refresh()
    assert mapped_files(spool_dir) == []
    train, held_out = spooled.train(), spooled.evaluation()
    assert torch.equal(train.x, in_memory.train().x)
    assert torch.equal(train.y, in_memory.train().y)
    assert torch.equal(held_out.x, in_memory.evaluation().x)
    # Both sides are mapped from the spool directory, by no name anyone could open or leave.
    mapped = mapped_files(spool_dir)
    assert len(mapped) == 2 and all("(deleted)" in m or "#" in m for m in mapped), mapped
    assert os.listdir(spool_dir) == []
    model = torch.nn.Linear(40, 3)
    assert evaluate(model, train) == evaluate(model, in_memory.train())


def test_small_sides_stay_in_memory(tmp_path: Path) -> None:
    root = npz_data(tmp_path / "data")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    data = LocalData(spec(root, spool_dir=spool_dir))  # default limit: 256 MiB
    data.refresh()
    data.train()
    assert mapped_files(spool_dir) == []


def test_a_spool_without_room_is_one_data_error_naming_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError, match=r"cannot spool 1 MiB of decoded examples to .*no-such-dir"):
        spooled_tensor((1024, 256), missing)
    source = open_source(spec(npz_data(tmp_path / "data"), in_memory_mb=0, spool_dir=missing))
    source.scan()
    with pytest.raises(DataError, match=r"set data\.spool_dir"):
        source.train().to_dataset(spool=Spool(in_memory_mb=0, directory=missing))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True])
def test_in_memory_mb_must_be_a_size(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="in_memory_mb"):
        spec(tmp_path, in_memory_mb=value)

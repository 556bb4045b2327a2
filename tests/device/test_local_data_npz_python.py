"""``format: npz`` (memory-mapped arrays) and ``format: python`` (a user's function).

npz files are written with numpy at test time; the python tests write a throw-away module into
``tmp_path`` and put it on ``sys.path`` with monkeypatch.
"""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from device.data import LabelSpace, LocalDataSpec, LocalSource, open_source
from device.data.npzsource import read_npz
from device.errors import DataError

CLASSES = ("zero", "one", "two")


def npz_source(path: Path, **options: object) -> LocalSource:
    settings: dict[str, object] = {
        "format": "npz",
        "path": path,
        "classes": CLASSES,
        "eval_fraction": 0.0,
    }
    return open_source(LocalDataSpec(**{**settings, **options}))  # type: ignore[arg-type]


def images(n: int, offset: int = 0) -> np.ndarray:
    """``[n, 1, 2, 3]`` uint8 examples whose first pixel is ``offset + i``."""
    x = np.zeros((n, 1, 2, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(offset, offset + n)
    return x


# --- npz ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reads_x_and_y_mapped_when_stored(tmp_path: Path, compressed: bool) -> None:
    """Uncompressed x is memory-mapped (rows read on use, not the array at load); compressed
    x is loaded; both decode to the same float32 examples."""
    path = tmp_path / "data.npz"
    save = np.savez_compressed if compressed else np.savez
    save(path, x=images(5), y=np.array([0, 1, 2, 1, 0]))
    arrays = read_npz(str(path), LabelSpace(CLASSES))
    assert arrays.mapped is not compressed
    assert isinstance(arrays.x, np.memmap) is not compressed
    data = npz_source(path).train().to_dataset()
    assert data.x.shape == (5, 1, 2, 3) and data.x.dtype == torch.float32
    assert data.x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert data.y.tolist() == [0, 1, 2, 1, 0]


def test_npz_maps_fortran_order_and_version_2_headers(tmp_path: Path) -> None:
    """The mapping reads the member's own header: Fortran order and npy format 2.0 (what
    numpy writes for very large headers) map to the same values numpy loads."""
    x = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(4, 3))
    y = np.array([0, 1, 2, 0])
    fortran = tmp_path / "f.npz"
    np.savez(fortran, x=x, y=y)
    version2 = tmp_path / "v2.npz"
    with zipfile.ZipFile(version2, "w", zipfile.ZIP_STORED) as archive:
        for name, array in (("x", x), ("y", y)):
            with archive.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, array, version=(2, 0))
    for path in (fortran, version2):
        arrays = read_npz(str(path), LabelSpace(CLASSES))
        assert arrays.mapped and np.array_equal(arrays.x, x)
        assert npz_source(path).train().to_dataset().x.tolist() == x.tolist()


def test_npz_string_labels_are_class_names(tmp_path: Path) -> None:
    path = tmp_path / "named.npz"
    np.savez(path, x=np.ones((3, 4), np.float32), y=np.array(["two", "zero", "two"]))
    assert npz_source(path).train().labels().tolist() == [2, 0, 2]


def test_npz_directory_grows_by_files_and_rereads_only_changed_ones(tmp_path: Path) -> None:
    folder = tmp_path / "days"
    folder.mkdir()
    np.savez(folder / "day1.npz", x=images(4), y=np.zeros(4, np.int64))
    src = npz_source(folder)
    first = src.scan()
    assert (first.examples, first.listed, first.rows_read) == (4, 1, 4)
    np.savez(folder / "day2.npz", x=images(3, offset=10), y=np.ones(3, np.int64))
    grown = src.scan()
    assert (grown.examples, grown.added, grown.listed, grown.reused, grown.rows_read) == (
        7,
        3,
        1,
        1,
        3,
    )
    data = src.train().to_dataset()
    assert data.x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 10, 11, 12]
    assert src.train().identities()[4] == "day2.npz#0"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, np.int64)}, "x has 3 examples, y 4 labels"),
        ({"x": np.zeros((3, 2))}, r"no array 'y'; it holds: x"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 3])}, r"y: label 3 \(index 1; classes are 0"),
        ({"x": np.zeros((2, 2)), "y": np.array(["one", "four"])}, r"y\[1\]: label 'four'"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.0, 1.0])}, "class indices .* got float64"),
        ({"x": np.zeros(2), "y": np.array([0, 1])}, r"x must be numbers shaped \[N, F\]"),
        ({"x": np.array([{}, {}], dtype=object), "y": np.array([0, 1])}, "unreadable array"),
    ],
)
def test_bad_npz_is_one_data_error_naming_the_file(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays, allow_pickle=True)
    with pytest.raises(DataError, match=rf"{path}: .*{message}"):
        npz_source(path).scan()


def test_npz_that_is_not_a_zip_and_non_finite_rows_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=rf"{junk}: not an npz file"):
        npz_source(junk).scan()
    path = tmp_path / "nan.npz"
    x = np.zeros((3, 2), np.float32)
    x[2, 1] = np.inf
    np.savez(path, x=x, y=np.zeros(3, np.int64))
    src = npz_source(path)
    assert src.scan().examples == 3  # found when decoded, not at scan time
    with pytest.raises(DataError, match=rf"{path}: x\[2\] holds a value that is not a finite"):
        src.train().to_dataset()


def test_npz_member_layout_is_what_the_mapping_assumes(tmp_path: Path) -> None:
    """numpy.savez stores members uncompressed; if it ever compressed them, mapping would
    silently stop (this test says so first)."""
    path = tmp_path / "a.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.zeros(2, np.int64))
    with zipfile.ZipFile(path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


# --- python ------------------------------------------------------------------------------------

USER_MODULE = """
import torch

class Squares(torch.utils.data.Dataset):
    def __init__(self, n, root=None):
        self.n = n
        self.root = root

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 3), float(i)), i % 3

def build(n=5, root=None):
    return Squares(n, root)

def from_file(root):
    with open(root) as f:
        return Squares(int(f.read()))

def broken():
    raise RuntimeError("the sensor is unplugged")

def not_a_dataset():
    return 42

def stream():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1), 0
    return Stream()

class Bad(torch.utils.data.Dataset):
    def __init__(self, item):
        self.item = item
    def __len__(self):
        return 2
    def __getitem__(self, i):
        if self.item == "raise" and i == 1:
            raise KeyError("missing frame 1")
        return {"label": (torch.zeros(2), 5), "pair": torch.zeros(2),
                "float": (torch.zeros(2), 1.5), "raise": (torch.zeros(2), 0),
                "scalar": (torch.tensor(1.0), 0)}[self.item]

def bad(item):
    return Bad(item)

def varying():
    return [(torch.zeros(2 if i < 1024 else 3), 0) for i in range(1200)]
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of the user's, importable only for this test (a fresh name per test)."""
    name = f"user_data_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def py_source(function: str, **options: object) -> LocalSource:
    settings: dict[str, object] = {
        "format": "python",
        "function": function,
        "classes": CLASSES,
        "eval_fraction": 0.0,
    }
    return open_source(LocalDataSpec(**{**settings, **options}))  # type: ignore[arg-type]


def test_python_function_builds_the_dataset_with_kwargs(user_module: str) -> None:
    src = py_source(f"{user_module}:build", kwargs={"n": 4})
    assert src.scan().examples == 4
    data = src.train().to_dataset()
    assert data.x.shape == (4, 2, 3) and data.y.tolist() == [0, 1, 2, 0]
    assert data.x[3, 1, 2].item() == 3.0


def test_python_function_is_called_again_at_each_scan_with_root(
    user_module: str, tmp_path: Path
) -> None:
    """The function is the origin: growing data means it returns more items next time."""
    count = tmp_path / "count.txt"
    count.write_text("3")
    src = py_source(f"{user_module}:from_file", path=count)
    assert src.scan().examples == 3
    count.write_text("6")
    result = src.scan()
    assert (result.examples, result.added) == (6, 3)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_module_xyz:build", r"cannot import module 'no_such_module_xyz' \(Module"),
        ("{m}:missing", r"has no attribute 'missing'"),
        ("{m}:broken", r"raised RuntimeError: the sensor is unplugged"),
        ("{m}:not_a_dataset", r"returned int, not a map-style torch Dataset"),
        ("{m}:stream", r"returned an iterable-style dataset"),
    ],
)
def test_python_function_failures_are_one_data_error_naming_the_setting(
    user_module: str, function: str, message: str
) -> None:
    target = function.format(m=user_module)
    with pytest.raises(DataError, match=rf"data.function '{target}'.*{message}"):
        py_source(target).scan()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("label", r"item 0: label 5 \(classes are 0..2\) is not one of the run's classes"),
        ("pair", r"item 0 is Tensor, expected a pair \(x, label\)"),
        ("float", r"item 0: label 1.5 is not an int class index"),
        ("raise", r"item 1 raised KeyError: 'missing frame 1'"),
        ("scalar", r"item 0: x is shaped \(\); an example must be \[F\]"),
    ],
)
def test_python_bad_items_fail_naming_setting_and_item(
    user_module: str, item: str, message: str
) -> None:
    src = py_source(f"{user_module}:bad", kwargs={"item": item})
    assert src.scan().examples == 2
    with pytest.raises(DataError, match=rf"data.function '{user_module}:bad': {message}"):
        src.train().to_dataset()


def test_python_items_of_two_shapes_fail_even_across_chunks(user_module: str) -> None:
    """Items are decoded 1,024 at a time; a shape change in a later chunk is still refused."""
    src = py_source(f"{user_module}:varying")
    with pytest.raises(DataError, match=r"differ in shape: \(2,\) and \(3,\)"):
        src.train().to_dataset()
    with pytest.raises(DataError, match=r"item 1024 is shaped \(3,\), item 1023 \(2,\)"):
        src.train().batch([1023, 1024])

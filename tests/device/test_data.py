"""Datasets: the Dataset invariants, MNIST IDX reading and checking, download, digits, registry."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from device.data import (
    MNIST_CONTENT_SHA256,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    Dataset,
    Split,
    dataset_names,
    dirichlet,
    download_mnist,
    export_mnist_subset,
    iid,
    load_dataset,
    load_digits,
    load_mnist,
    partition,
    read_idx,
    read_sha256sums,
    shards,
    write_idx,
)
from device.errors import ConfigError, DataError
from device.seeding import derive_seed

if TYPE_CHECKING:
    from conftest import FakeMnist, HttpServer, MakeMnist

Encode = Callable[[np.ndarray], bytes]

torch.set_num_threads(1)

# The real MNIST, when this checkout sits next to the project's shared data (or
# SPARSEFLEET_MNIST_DIR names another copy).
REAL_MNIST = Path(
    os.environ.get(
        "SPARSEFLEET_MNIST_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
    )
)
MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def expected_pixels(images: np.ndarray) -> torch.Tensor:
    """The documented normalisation, computed independently in float64."""
    scaled = (images.astype(np.float64) / 255.0 - 0.1307) / 0.3081
    return torch.from_numpy(scaled[:, None]).to(torch.float32)


# --- Dataset -----------------------------------------------------------------------------------


def small_dataset(n: int = 6) -> Dataset:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2)
    return Dataset(x, torch.arange(n, dtype=torch.int64) % 3, 3)


def test_dataset_subset_keeps_order_and_leaves_the_original_untouched() -> None:
    """A device's partition is ``subset(indices)``: the examples and labels at those indices,
    in that order, copied so that training on it cannot alter the shared dataset."""
    full = small_dataset()
    part = full.subset(np.array([4, 1]))
    assert torch.equal(part.x, full.x[[4, 1]]) and part.y.tolist() == [1, 1]
    part.x.zero_()
    assert float(full.x[4].sum()) > 0
    assert len(full.subset(np.array([], dtype=np.int64))) == 0


def test_dataset_subset_rejects_indices_out_of_range() -> None:
    """A partition computed for another dataset must fail loudly, not wrap around."""
    with pytest.raises(DataError, match=r"out of range.*6 examples"):
        small_dataset().subset([0, 6])
    with pytest.raises(DataError, match="out of range"):
        small_dataset().subset([-1])
    with pytest.raises(DataError, match=r"1-D integer array, got torch\.bool"):
        small_dataset().subset(np.ones(6, dtype=bool))


@pytest.mark.parametrize(
    ("x", "y", "classes", "message"),
    [
        (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 2, "float32"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32), 2, "int64"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), 2, "3 examples but 2 labels"),
        (torch.zeros(3, 4), torch.tensor([0, 1, 2]), 2, r"labels must lie in \[0, 2\)"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), 1, "at least 2"),
    ],
)
def test_dataset_rejects_inconsistent_tensors(
    x: torch.Tensor, y: torch.Tensor, classes: int, message: str
) -> None:
    """The trainer relies on float32 inputs and int64 labels in range; a bad dataset must be
    refused at construction with the reason, not fail later inside the loss."""
    with pytest.raises(DataError, match=message):
        Dataset(x, y, classes)


# --- MNIST from IDX files ----------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_load_mnist_reads_both_splits_normalised(make_mnist: MakeMnist, compressed: bool) -> None:
    """Gzipped and raw IDX files give the stored images as [N, 1, 28, 28] float32 normalised
    by (x/255 - 0.1307)/0.3081, with the stored labels as int64."""
    fake = make_mnist(compressed=compressed)
    sizes: tuple[tuple[Split, int], ...] = (("train", 60), ("test", 20))
    for split, n in sizes:
        data = load_mnist(fake.directory, split=split)
        assert data.x.shape == (n, 1, 28, 28) and data.num_classes == 10
        assert torch.allclose(data.x, expected_pixels(fake.images[split]), atol=1e-6)
        assert data.y.dtype == torch.int64 and data.y.tolist() == fake.labels[split].tolist()
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


def test_load_mnist_missing_directory_names_it_and_the_files(tmp_path: Path) -> None:
    """A user who forgot the data must learn where it was looked for, which files are
    expected, and how to get them."""
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_mnist(missing)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    # the command it gives runs as written (no option that no command has: issue 23, item 7)
    assert f"download_mnist('{missing}')" in message and "copy" in message


def test_load_mnist_names_the_one_missing_file(make_mnist: MakeMnist) -> None:
    """With one file gone the message says which one, not just that something is wrong."""
    fake = make_mnist()
    fake.path("test", 1).unlink()
    load_mnist(fake.directory, split="train")  # the other split is unaffected
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\b"):
        load_mnist(fake.directory, split="test")


def test_load_mnist_unknown_split_is_a_value_error(make_mnist: MakeMnist) -> None:
    """Splits follow the registry rule: a ValueError listing the known ones."""
    with pytest.raises(ValueError, match="unknown split 'val'; known: test, train"):
        load_mnist(make_mnist().directory, split="val")  # type: ignore[arg-type]


def rewrite(fake: FakeMnist, split: str, kind: int, data: bytes) -> Path:
    """Replace one file of ``fake`` with ``data`` (compressed like the rest), without SUMS."""
    (fake.directory / "SHA256SUMS").unlink(missing_ok=True)
    path = fake.path(split, kind)
    path.write_bytes(gzip.compress(data) if fake.compressed else data)
    return path


IMAGES = np.zeros((3, 28, 28), dtype=np.uint8)
LABELS = np.array([1, 2, 3], dtype=np.uint8)


# case -> (file broken: 0 images / 1 labels, its bytes from an IDX encoder, expected message)
MALFORMED: dict[str, tuple[int, Callable[[Encode], bytes], str]] = {
    "short magic": (0, lambda enc: b"\x00\x00\x08", "truncated IDX header"),
    "nonzero first byte": (
        0,
        lambda enc: b"\x01" + enc(IMAGES)[1:],
        "bad IDX magic number 0x01000803",
    ),
    "unknown type code": (
        0,
        lambda enc: b"\x00\x00\x07" + enc(IMAGES)[3:],
        "bad IDX magic number 0x00000703",
    ),
    "short dimensions": (0, lambda enc: enc(IMAGES)[:6], r"truncated IDX header \(3 dimensions"),
    "short data": (0, lambda enc: enc(IMAGES)[:-1], "IDX data truncated"),
    "trailing bytes": (0, lambda enc: enc(IMAGES) + b"\x00", "trailing bytes"),
    "27x27 images": (
        0,
        lambda enc: enc(np.zeros((3, 27, 27), dtype=np.uint8)),
        r"shape \[N, 28, 28\].*\[3, 27, 27\]",
    ),
    "labels as images": (0, lambda enc: enc(LABELS), r"shape \[N, 28, 28\]"),
    "images as labels": (1, lambda enc: enc(IMAGES), r"labels of shape \[N\]"),
    "count mismatch": (
        0,
        lambda enc: enc(np.zeros((4, 28, 28), dtype=np.uint8)),
        "4 images but .* 3 labels",
    ),
    "label 10": (1, lambda enc: enc(np.array([1, 10, 2], dtype=np.uint8)), "label 10 at index 1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("compressed", [True, False])
def test_load_mnist_rejects_malformed_files_naming_file_and_fault(
    make_mnist: MakeMnist, encode_idx: Encode, compressed: bool, case: str
) -> None:
    """Strict header checks: every malformed file is refused with its path and what is wrong,
    rather than silently training on misaligned pixels."""
    kind, build, message = MALFORMED[case]
    fake = make_mnist(compressed=compressed, n_train=3)
    other = 1 - kind
    rewrite(fake, "train", other, encode_idx(LABELS if other == 1 else IMAGES))
    path = rewrite(fake, "train", kind, build(encode_idx))
    with pytest.raises(DataError, match=message) as info:
        load_mnist(fake.directory, verify=False)
    assert path.name in str(info.value) and str(fake.directory) in str(info.value)


def test_load_mnist_rejects_empty_files(make_mnist: MakeMnist, encode_idx: Encode) -> None:
    """Consistent but empty files are refused: a device with no examples cannot train."""
    fake = make_mnist()
    rewrite(fake, "train", 0, encode_idx(np.zeros((0, 28, 28), dtype=np.uint8)))
    rewrite(fake, "train", 1, encode_idx(np.zeros(0, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: holds no images"):
        load_mnist(fake.directory, verify=False)


def test_load_mnist_rejects_a_corrupt_gzip_stream(make_mnist: MakeMnist) -> None:
    """A truncated .gz (an interrupted copy) is a DataError naming the file, not an EOFError."""
    fake = make_mnist()
    path = fake.path("train", 0)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{path.name}: cannot read IDX file"):
        load_mnist(fake.directory, verify=False)


def test_load_mnist_checks_files_against_sha256sums(
    make_mnist: MakeMnist, encode_idx: Encode
) -> None:
    """A file whose bytes differ from its SHA256SUMS entry is refused, naming the file and the
    checksum file; verify=False is the explicit way around it."""
    fake = make_mnist()
    path = fake.path("train", 1)
    flipped = fake.labels["train"].copy()
    flipped[0] = (flipped[0] + 1) % 10
    path.write_bytes(gzip.compress(encode_idx(flipped)))
    with pytest.raises(DataError) as info:
        load_mnist(fake.directory)
    assert path.name in str(info.value) and "SHA256SUMS" in str(info.value)
    assert "does not match" in str(info.value)
    assert load_mnist(fake.directory, verify=False).y[0] == int(flipped[0])


def test_load_mnist_checks_the_stored_bytes_before_parsing(make_mnist: MakeMnist) -> None:
    """A corrupted file listed in SHA256SUMS reads as a checksum error (re-download it), not
    as a confusing header error."""
    fake = make_mnist()
    fake.path("train", 0).write_bytes(b"garbage")
    with pytest.raises(DataError, match="does not match"):
        load_mnist(fake.directory)


def test_load_mnist_without_sums_accepts_only_canonical_content(make_mnist: MakeMnist) -> None:
    """Without SHA256SUMS the files must be the canonical MNIST; anything else is refused with
    the way to record one's own checksums."""
    fake = make_mnist(sums=False)
    with pytest.raises(DataError) as info:
        load_mnist(fake.directory)
    message = str(info.value)
    assert "canonical MNIST" in message and "SHA256SUMS" in message and "sha256sum" in message
    assert len(load_mnist(fake.directory, verify=False)) == 60


def test_load_mnist_rejects_a_malformed_sha256sums_with_its_line(make_mnist: MakeMnist) -> None:
    """A damaged checksum file is reported with its line number, not ignored."""
    fake = make_mnist()
    sums = fake.directory / "SHA256SUMS"
    sums.write_text(sums.read_text() + "not-a-digest  x\n")
    with pytest.raises(DataError, match=r"SHA256SUMS, line 5: expected"):
        load_mnist(fake.directory)


def test_read_sha256sums_reads_the_sha256sum_format(tmp_path: Path) -> None:
    """Both text (two spaces) and binary (`` *``) markers, a ``./`` prefix and blank lines are
    what sha256sum writes; the digest is normalised to lower case."""
    digest = "AB" * 32
    path = tmp_path / "SHA256SUMS"
    path.write_text(f"{digest}  a.gz\n\n{'cd' * 32} *./b\n")
    assert read_sha256sums(path) == {"a.gz": "ab" * 32, "b": "cd" * 32}
    path.write_text(f"{'ab' * 32}  a\n{'cd' * 32}  a\n")
    with pytest.raises(DataError, match="a listed twice"):
        read_sha256sums(path)


def test_shared_sums_file_uses_the_format_we_read() -> None:
    """The project's copy of MNIST ships a SHA256SUMS; it must parse with our reader."""
    if not (REAL_MNIST / "SHA256SUMS").is_file():
        pytest.skip(f"no MNIST copy at {REAL_MNIST} (set SPARSEFLEET_MNIST_DIR to one)")
    sums = read_sha256sums(REAL_MNIST / "SHA256SUMS")
    assert set(sums) == {f"{n}.gz" for pair in MNIST_FILES.values() for n in pair}


@pytest.mark.parametrize(
    ("dtype", "compress"), [(np.uint8, True), (np.int16, False), (np.float32, True)]
)
def test_write_idx_and_read_idx_round_trip_big_endian_types(
    tmp_path: Path, dtype: type, compress: bool
) -> None:
    """Multi-byte IDX types are big-endian on disk; a round trip must restore the values."""
    array: np.ndarray = (np.arange(24).reshape(2, 3, 4) * 257 - 300).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_export_mnist_subset_makes_a_device_directory(
    make_mnist: MakeMnist, tmp_path: Path
) -> None:
    """A Pi's own data directory holds just its share, under the canonical names with its own
    SHA256SUMS, so load_mnist verifies it unchanged and returns exactly that subset."""
    fake = make_mnist()
    indices = np.array([5, 0, 42])
    out = export_mnist_subset(fake.directory, indices, tmp_path / "pi-07")
    own = load_mnist(out)  # verify=True: checked against the written SHA256SUMS
    full = load_mnist(fake.directory)
    assert torch.equal(own.x, full.x[indices]) and torch.equal(own.y, full.y[indices])
    assert set(read_sha256sums(out / "SHA256SUMS")) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    }
    with pytest.raises(DataError, match=r"within \[0, 60\)"):
        export_mnist_subset(fake.directory, [60], tmp_path / "bad")


# --- the real MNIST ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_mnist_dir() -> Path:
    if not all((REAL_MNIST / f"{n}.gz").is_file() for p in MNIST_FILES.values() for n in p):
        pytest.skip(f"no MNIST copy at {REAL_MNIST} (set SPARSEFLEET_MNIST_DIR to one)")
    return REAL_MNIST


@pytest.fixture(scope="module")
def real_mnist_train(real_mnist_dir: Path) -> Dataset:
    return load_mnist(real_mnist_dir, split="train")


def test_real_mnist_has_60000_and_10000_checked_images(
    real_mnist_dir: Path, real_mnist_train: Dataset
) -> None:
    """The shared copy loads with its checksums verified, with MNIST's known sizes and class
    counts, and normalised to about zero mean and unit spread."""
    train = real_mnist_train
    test = load_mnist(real_mnist_dir, split="test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels()).tolist() == MNIST_TRAIN_CLASS_COUNTS
    assert np.bincount(test.labels()).tolist() == MNIST_TEST_CLASS_COUNTS
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1) < 1e-3


def test_real_mnist_matches_the_builtin_canonical_hashes(
    real_mnist_dir: Path, tmp_path: Path, encode_idx: Encode
) -> None:
    """Without a SHA256SUMS the built-in hashes of the canonical content accept the real files
    (whatever gzip produced them) and refuse one altered byte."""
    for pair in MNIST_FILES.values():
        for name in pair:
            (tmp_path / f"{name}.gz").symlink_to(real_mnist_dir / f"{name}.gz")
    assert len(load_mnist(tmp_path, split="test")) == 10000
    for name, digest in MNIST_CONTENT_SHA256.items():
        with gzip.open(real_mnist_dir / f"{name}.gz", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    labels = read_idx(real_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    labels[0] = (labels[0] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(labels))
    with pytest.raises(DataError, match="not that of the canonical MNIST file"):
        load_mnist(tmp_path, split="test")


# --- download ----------------------------------------------------------------------------------


def serve(fake: FakeMnist, server: HttpServer, *, sums: bool = True) -> Path:
    """Publish ``fake``'s files under the server's base URL (with or without SHA256SUMS)."""
    served = server.root / "mnist"
    shutil.copytree(fake.directory, served)
    if not sums:
        (served / "SHA256SUMS").unlink()
    return served


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_download_fetches_verifies_and_records_checksums(
    make_mnist: MakeMnist, http_server: HttpServer, tmp_path: Path
) -> None:
    """download_mnist fetches the four files, checks them against the served SHA256SUMS, and
    leaves a cache that load_mnist verifies and reads as the original data."""
    fake = make_mnist()
    serve(fake, http_server)
    cache = download_mnist(tmp_path / "cache", http_server.base_url)
    for split in ("train", "test"):
        got = load_mnist(cache, split=split)
        assert got.y.tolist() == fake.labels[split].tolist()
        assert torch.allclose(got.x, expected_pixels(fake.images[split]), atol=1e-6)
    assert read_sha256sums(cache / "SHA256SUMS") == read_sha256sums(fake.directory / "SHA256SUMS")
    assert leftovers(cache) == []


def test_download_skips_files_already_present_and_valid(
    make_mnist: MakeMnist, http_server: HttpServer, tmp_path: Path
) -> None:
    """A second download fetches only the checksum list, not the data again (slow links)."""
    serve(make_mnist(), http_server)
    download_mnist(tmp_path / "cache", http_server.base_url, splits=("test",))
    http_server.requests.clear()
    download_mnist(tmp_path / "cache", http_server.base_url, splits=("test",))
    assert http_server.requests == ["/mnist/SHA256SUMS"]


def test_download_refuses_a_file_that_fails_its_checksum(
    make_mnist: MakeMnist, http_server: HttpServer, tmp_path: Path, encode_idx: Encode
) -> None:
    """A download whose bytes differ from the served checksum is refused, and nothing is left
    under the final name or as a temporary file (the write is atomic)."""
    served = serve(make_mnist(), http_server)
    target = served / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(encode_idx(np.zeros(20, dtype=np.uint8))))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: SHA-256 .* does not match"):
        download_mnist(cache, http_server.base_url, splits=("test",))
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()
    assert leftovers(cache) == []


def test_download_without_served_sums_accepts_only_canonical_mnist(
    make_mnist: MakeMnist, http_server: HttpServer, tmp_path: Path
) -> None:
    """A mirror that serves no SHA256SUMS (404) is checked against the built-in canonical
    hashes, so generated stand-in data is refused there."""
    serve(make_mnist(), http_server, sums=False)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not that of the canonical MNIST file"):
        download_mnist(cache, http_server.base_url, splits=("test",))
    assert list(cache.iterdir()) == []


def test_download_caps_the_size_of_a_file(
    make_mnist: MakeMnist, http_server: HttpServer, tmp_path: Path
) -> None:
    """A server sending more than max_bytes cannot fill the disk of a small device."""
    serve(make_mnist(), http_server)
    with pytest.raises(DataError, match="more than the 100 accepted"):
        download_mnist(tmp_path / "cache", http_server.base_url, max_bytes=100)
    assert leftovers(tmp_path / "cache") == []


def test_download_from_an_unreachable_server_names_the_url(tmp_path: Path) -> None:
    """No server listening: a DataError naming what could not be fetched, not a URLError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mnist"
    with pytest.raises(DataError, match=rf"cannot download {url}/SHA256SUMS"):
        download_mnist(tmp_path / "cache", url, timeout_s=5)


def test_download_refuses_non_http_urls(tmp_path: Path) -> None:
    """Only http(s) is fetched; a file:// or typo'd URL is a configuration error."""
    with pytest.raises(ConfigError, match="http:// or https://"):
        download_mnist(tmp_path, "file:///etc")


# --- digits ------------------------------------------------------------------------------------


def rows(dataset: Dataset) -> list[tuple[float, ...]]:
    flat = torch.cat([dataset.x.reshape(len(dataset), -1), dataset.y[:, None].float()], 1)
    return sorted(map(tuple, flat.tolist()))


def test_digits_split_is_fixed_stratified_and_complete() -> None:
    """The zero-download dataset: 1,347 train and 450 test images of 1x8x8 whose union is
    exactly the 1,797 digits (nothing shared, nothing lost), about a quarter of every class
    in test, the same on every call."""
    train, test = load_digits(split="train"), load_digits(split="test")
    assert train.x.shape == (1347, 1, 8, 8) and test.x.shape == (450, 1, 8, 8)
    everything = load_digits(test_fraction=1e-9)  # rounds to no test image at all
    assert len(everything) == 1797
    combined = Dataset(torch.cat([train.x, test.x]), torch.cat([train.y, test.y]), 10)
    assert rows(combined) == rows(everything)
    assert all(43 <= n <= 46 for n in np.bincount(test.labels()))
    assert torch.equal(load_digits(split="test").x, test.x)


def test_digits_are_normalised_and_flatten_for_the_mlp() -> None:
    """Pixels are (p/16 - 0.3053)/0.3760: about zero mean and unit spread over all digits;
    ``flatten`` gives the [N, 64] rows the mlp also accepts."""
    everything = load_digits(test_fraction=1e-9)
    assert abs(float(everything.x.mean())) < 1e-3 and abs(float(everything.x.std()) - 1) < 1e-3
    flat = load_digits(flatten=True)
    assert flat.x.shape == (1347, 64)
    assert torch.equal(flat.x, load_digits().x.reshape(1347, 64))


# --- registry ----------------------------------------------------------------------------------


def test_load_dataset_dispatches_by_name(make_mnist: MakeMnist) -> None:
    """The registry loads each dataset with its own arguments."""
    assert dataset_names() == ["digits", "mnist"]
    fake = make_mnist()
    assert len(load_dataset("mnist", fake.directory, split="test")) == 20
    assert len(load_dataset("digits", split="test")) == 450


def test_load_dataset_unknown_name_lists_the_known_ones() -> None:
    """Registries raise ValueError naming what exists (DESIGN section 10.6)."""
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; known: digits, mnist"):
        load_dataset("cifar")


def test_load_dataset_mnist_without_a_directory_says_what_to_pass() -> None:
    """MNIST is read from files: with no directory the error says to pass one."""
    with pytest.raises(DataError, match=r"pass data_dir .*train-images-idx3-ubyte.gz"):
        load_dataset("mnist")


# --- partitioners ------------------------------------------------------------------------------

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def label_arrays(draw: st.DrawFn, max_classes: int = 6, max_per_class: int = 60) -> np.ndarray:
    """Labels with 1..max_classes classes of 0..max_per_class examples each, shuffled; class
    ids may have gaps (a class with no example)."""
    counts = draw(
        st.lists(st.integers(0, max_per_class), min_size=1, max_size=max_classes).filter(
            lambda c: sum(c) > 0
        )
    )
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(draw(st.integers(0, 2**32))).permutation(labels)


def assert_disjoint(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Every part is sorted int64 within [0, n) and no index is in two parts; returns all."""
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    everything = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    assert len(np.unique(everything)) == len(everything)
    assert everything.size == 0 or (everything.min() >= 0 and everything.max() < n)
    return everything


@settings(max_examples=60, deadline=None)
@given(labels=label_arrays(), num_clients=st.integers(1, 12), seed=SEEDS)
def test_iid_gives_every_example_once_in_near_equal_parts(
    labels: np.ndarray, num_clients: int, seed: int
) -> None:
    """iid: each example to exactly one client, client sizes differing by at most one."""
    if num_clients > len(labels):
        with pytest.raises(ConfigError, match="clients but only"):
            iid(labels, num_clients, seed=seed)
        return
    parts = iid(labels, num_clients, seed=seed)
    assert len(parts) == num_clients
    assert sorted(assert_disjoint(parts, len(labels)).tolist()) == list(range(len(labels)))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    labels=label_arrays(),
    num_clients=st.integers(1, 10),
    beta=st.sampled_from([0.05, 0.5, 5.0]),
    min_size=st.integers(0, 3),
    seed=SEEDS,
)
def test_dirichlet_gives_every_example_once_and_min_size_each(
    labels: np.ndarray, num_clients: int, beta: float, min_size: int, seed: int
) -> None:
    """dirichlet: every example of every class goes to exactly one client and every client
    holds at least min_size examples; when no draw can meet that, a ConfigError says so."""
    try:
        parts = dirichlet(labels, num_clients, seed=seed, beta=beta, min_size=min_size)
    except ConfigError as exc:
        # Only acceptable when min_size is demanding: not enough examples, or no draw found.
        assert min_size > 0 and ("exceeds" in str(exc) or "no draw" in str(exc))
        return
    assert len(parts) == num_clients and min(len(p) for p in parts) >= min_size
    assert sorted(assert_disjoint(parts, len(labels)).tolist()) == list(range(len(labels)))


def shard_capacity(labels: np.ndarray, classes_per_client: int, per_class: int) -> int:
    """Brute force: the most clients that can each get distinct classes with per_class
    examples each. K clients fit iff sum_c min(count_c // per_class, K) >= K * classes (each
    class serves a client at most once; the column-wise deal realises any such count)."""
    fits = np.bincount(labels)[np.unique(labels)] // per_class
    if classes_per_client > len(fits):
        return 0
    best = 0
    for k in range(1, int(fits.sum()) + 1):
        if int(np.minimum(fits, k).sum()) >= k * classes_per_client:
            best = k
    return best


@settings(max_examples=60, deadline=None)
@given(
    labels=label_arrays(max_per_class=40),
    num_clients=st.integers(1, 15),
    classes_per_client=st.integers(1, 3),
    per_class=st.integers(1, 6),
    seed=SEEDS,
)
def test_shards_give_distinct_classes_with_exact_counts_or_say_how_many_fit(
    labels: np.ndarray, num_clients: int, classes_per_client: int, per_class: int, seed: int
) -> None:
    """shards: every client gets exactly classes_per_client distinct classes with exactly
    per_class examples each, no example twice; when impossible, the error states the largest
    number of clients that fits, and that number does fit."""
    capacity = shard_capacity(labels, classes_per_client, per_class)
    kwargs = {"classes_per_client": classes_per_client, "per_class": per_class}
    if num_clients > capacity:
        with pytest.raises(ConfigError, match=rf"enough for at most {capacity} clients"):
            shards(labels, num_clients, seed=seed, **kwargs)
        if capacity == 0:
            return
        num_clients = capacity
    parts = shards(labels, num_clients, seed=seed, **kwargs)
    assert len(parts) == num_clients
    assert_disjoint(parts, len(labels))
    for part in parts:
        classes, counts = np.unique(labels[part], return_counts=True)
        assert len(classes) == classes_per_client and set(counts.tolist()) == {per_class}


def mnist_like_labels() -> np.ndarray:
    """Labels with MNIST's training class counts, in a fixed shuffled order."""
    labels = np.repeat(np.arange(10), MNIST_TRAIN_CLASS_COUNTS)
    return np.random.default_rng(7).permutation(labels)


def test_shards_k400_on_mnist_gives_2_classes_of_20_and_mixes_the_pairs() -> None:
    """FedDST's MNIST setting: 400 clients x 2 classes x 20 images from 60,000 labels, every
    class used equally (80 clients each), and the class pairs spread over many combinations
    rather than a few fixed ones (a client's two classes are not tied to each other)."""
    labels = mnist_like_labels()
    parts = shards(labels, 400, seed=derive_seed("test", "shards"))
    assert len(parts) == 400 and len(assert_disjoint(parts, len(labels))) == 16000
    pairs = [tuple(np.unique(labels[p]).tolist()) for p in parts]
    assert all(len(pair) == 2 for pair in pairs)
    assert all(np.bincount(labels[p]).max() == 20 for p in parts)
    assert np.bincount(np.concatenate(pairs)).tolist() == [80] * 10
    assert len(set(pairs)) >= 35  # of the 45 possible pairs


def test_shards_on_real_mnist_labels(real_mnist_train: Dataset) -> None:
    """The same split on the real MNIST training labels."""
    labels = real_mnist_train.labels()
    parts = shards(labels, 400, seed=1)
    assert {len(p) for p in parts} == {40}
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


def test_dirichlet_beta_controls_label_skew() -> None:
    """Small beta concentrates each client on few classes, large beta approaches the global
    class mix: the knob that sets how non-IID a simulation is."""
    labels = mnist_like_labels()

    def dominant_share(beta: float) -> float:
        parts = dirichlet(labels, 50, seed=3, beta=beta, min_size=1)
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    assert dominant_share(0.05) > 0.7
    assert dominant_share(1000.0) < 0.15  # about the largest class's 11% of MNIST


def test_partitioners_are_deterministic_and_seed_dependent() -> None:
    """Same seed, same split; another seed, another split."""
    labels = mnist_like_labels()
    for name, kwargs in (("shards", {}), ("dirichlet", {"beta": 0.5}), ("iid", {})):
        first = partition(name, labels, 100, 11, **kwargs)
        again = partition(name, labels, 100, 11, **kwargs)
        other = partition(name, labels, 100, 12, **kwargs)
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


SPLIT_DIGEST = """
import hashlib, numpy as np
from device.data import partition
labels = np.random.default_rng(7).permutation(np.repeat(np.arange(10), {counts}))
h = hashlib.sha256()
for name, kwargs in (("shards", {{}}), ("dirichlet", {{"beta": 0.3}}), ("iid", {{}})):
    for part in partition(name, labels, 400, {seed}, **kwargs):
        h.update(part.tobytes() + b"|")
print(h.hexdigest())
"""


def test_partitions_are_the_same_in_another_process() -> None:
    """The fleet manager and simulated devices compute splits in different processes: a fresh
    interpreter (with another hash seed) must produce the identical split."""
    code = SPLIT_DIGEST.format(counts=MNIST_TRAIN_CLASS_COUNTS, seed=derive_seed("run-a", 0))
    local: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(code, local)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout.strip() == out.getvalue().strip() != ""


def test_partitioners_accept_a_tensor_of_labels() -> None:
    """Dataset.y is a tensor; passing it directly must give the same split as its numpy form."""
    labels = mnist_like_labels()[:2000]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            iid(torch.from_numpy(labels), 7, seed=1), iid(labels, 7, seed=1), strict=True
        )
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda y: partition("pathological", y, 4, 0), ValueError, "unknown partitioner"),
        (lambda y: iid(y, 0, seed=0), ConfigError, "num_clients must be a positive integer"),
        (lambda y: iid(y, 2, seed=-1), ConfigError, r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda y: dirichlet(y, 2, seed=0, beta=0.0), ConfigError, "beta must be a positive"),
        (lambda y: dirichlet(y, 50, seed=0, min_size=10), ConfigError, "exceeds the 100"),
        (lambda y: shards(y, 2, seed=0, per_class=0), ConfigError, "at least 1"),
        (lambda y: iid(y.reshape(10, 10), 2, seed=0), DataError, "1-D integer array"),
        (lambda y: iid(y - 5, 2, seed=0), DataError, "non-negative"),
        (lambda y: iid(y.astype(float), 2, seed=0), DataError, "1-D integer array"),
    ],
)
def test_partitioners_reject_bad_arguments(
    call: Callable[[np.ndarray], object], error: type, message: str
) -> None:
    """Bad arguments are named errors with the reason (unknown names list the known ones)."""
    with pytest.raises(error, match=message):
        call(np.arange(100) % 10)
    if error is ValueError:
        with pytest.raises(ValueError, match="known: dirichlet, iid, shards"):
            call(np.arange(100) % 10)

"""Fixtures for device tests: small MNIST-format IDX directories and a local HTTP server.

The IDX bytes are built here with ``struct`` straight from the format's definition (magic
``0x000008NN``, big-endian uint32 dimensions, then the data), independently of
``device.data``, so the reader is tested against the format and not against its own writer.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: npt.NDArray[np.uint8]) -> bytes:
    """An unsigned-byte IDX file holding ``array``: magic 0x00 0x00 0x08 ndim, dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@dataclass(frozen=True)
class FakeMnist:
    """A generated MNIST-format directory and the arrays stored in it."""

    directory: Path
    images: dict[str, npt.NDArray[np.uint8]]  # split -> [N, 28, 28]
    labels: dict[str, npt.NDArray[np.uint8]]  # split -> [N]
    compressed: bool

    def path(self, split: str, kind: int) -> Path:
        """Path of the images (kind 0) or labels (kind 1) file of ``split``."""
        name = MNIST_NAMES[split][kind]
        return self.directory / (f"{name}.gz" if self.compressed else name)


MakeMnist = Callable[..., FakeMnist]


def write_sums(directory: Path, names: list[str]) -> None:
    """``directory/SHA256SUMS`` in sha256sum's format for ``names``."""
    lines = [f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (directory / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture
def encode_idx() -> Callable[[npt.NDArray[np.uint8]], bytes]:
    """:func:`idx_bytes`, for tests that build (or break) IDX files themselves."""
    return idx_bytes


@pytest.fixture
def make_mnist(tmp_path: Path) -> MakeMnist:
    """Factory: a directory with small random MNIST-format train and test files.

    Arguments: ``name`` (sub-directory), ``n_train``, ``n_test``, ``compressed`` (gzip or raw
    files), ``sums`` (write a matching SHA256SUMS), ``seed``. Labels cycle through 0-9 in a
    shuffled order so every class is present.
    """

    def make(
        name: str = "mnist",
        *,
        n_train: int = 60,
        n_test: int = 20,
        compressed: bool = True,
        sums: bool = True,
        seed: int = 0,
    ) -> FakeMnist:
        rng = np.random.default_rng(seed)
        directory = tmp_path / name
        directory.mkdir(parents=True, exist_ok=True)
        images: dict[str, npt.NDArray[np.uint8]] = {}
        labels: dict[str, npt.NDArray[np.uint8]] = {}
        written: list[str] = []
        for split, n in (("train", n_train), ("test", n_test)):
            images[split] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels[split] = rng.permutation(np.arange(n) % 10).astype(np.uint8)
            for base, array in zip(MNIST_NAMES[split], (images[split], labels[split]), strict=True):
                data = idx_bytes(array)
                file_name = f"{base}.gz" if compressed else base
                (directory / file_name).write_bytes(
                    gzip.compress(data, mtime=0) if compressed else data
                )
                written.append(file_name)
        if sums:
            write_sums(directory, written)
        return FakeMnist(directory, images, labels, compressed)

    return make


@dataclass
class HttpServer:
    """A running loopback HTTP server serving ``root``; ``requests`` logs the paths asked for."""

    base_url: str
    root: Path
    requests: list[str]


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    """Serve ``tmp_path/www`` over HTTP on a free loopback port (127.0.0.1, port chosen by the
    OS) from a background thread, for download tests that must not touch the internet."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}/mnist", root, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

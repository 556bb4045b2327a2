"""Downloading MNIST into a cache directory, for users who have internet.

Each file lands in a temporary file, is checked (checksum and IDX structure) and fsynced, and only
then gets its final name; the result is a directory :func:`device.data.mnist.load_mnist` reads.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from device import __version__
from device.data.checksums import parse_sha256sums, sha256_file, write_sha256sums
from device.data.dataset import Split, check_split
from device.data.idx import read_idx_with_digest
from device.data.mnist import MNIST_CONTENT_SHA256, MNIST_FILES
from device.errors import ConfigError, DataError

__all__ = ["DEFAULT_MNIST_URL", "download_mnist"]

#: Where :func:`download_mnist` fetches from by default (the mirror torchvision uses; another
#: is ``https://storage.googleapis.com/cvdf-datasets/mnist``).
DEFAULT_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist"


def _fetch(url: str, timeout_s: float, max_bytes: int, sink: IO[bytes] | None) -> bytes:
    """GET ``url``; stream into ``sink`` (returning b"") or return the body. Caps the size."""
    request = urllib.request.Request(url, headers={"User-Agent": f"sparsefleet/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise DataError(f"{url}: {length} bytes announced, more than the {max_bytes} accepted")
        body: list[bytes] = []
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if received > max_bytes:
                raise DataError(f"{url}: more than the {max_bytes} bytes accepted")
            if sink is None:
                body.append(chunk)
            else:
                sink.write(chunk)
        return b"".join(body)


# HTTPError is a URLError; timeouts and resets are OSErrors; a short body or a malformed URL
# raise http.client's exceptions (IncompleteRead, InvalidURL).
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def _download_error(url: str, exc: Exception) -> DataError:
    return DataError(f"cannot download {url}: {exc}")


def _check_download(
    path: Path, name: str, served_sums: Mapping[str, str] | None, source: str
) -> None:
    """``path`` (holding MNIST file ``name``) has the expected checksum and is well-formed IDX."""
    if served_sums is not None:
        actual = sha256_file(path)
        if actual != served_sums[name]:
            raise DataError(
                f"{source}: SHA-256 {actual} does not match {served_sums[name]} in the "
                f"server's SHA256SUMS (corrupt or replaced download)"
            )
        read_idx_with_digest(path)
        return
    _, content_sha = read_idx_with_digest(path)
    if content_sha != MNIST_CONTENT_SHA256[name.removesuffix(".gz")]:
        raise DataError(
            f"{source}: content SHA-256 {content_sha} is not that of the canonical MNIST file "
            f"{name}, and the server serves no SHA256SUMS to check other data against"
        )


def download_mnist(
    cache_dir: str | os.PathLike[str],
    base_url: str = DEFAULT_MNIST_URL,
    *,
    splits: Sequence[Split] = ("train", "test"),
    timeout_s: float = 60.0,
    max_bytes: int = 64 << 20,
    overwrite: bool = False,
) -> Path:
    """Download the gzipped MNIST files of ``splits`` from ``base_url`` into ``cache_dir``.

    Files are fetched as ``{base_url}/{name}.gz``. When the server also serves
    ``{base_url}/SHA256SUMS`` (sha256sum format, listing the ``.gz`` names), each download must
    match it; otherwise (HTTP 404, or 403 as S3 answers) it must match the canonical MNIST content
    (:data:`MNIST_CONTENT_SHA256`). Every file is written to a temporary file in ``cache_dir``,
    checked (checksum and IDX structure), fsynced and only then renamed into place, so an
    interrupted or bad download never leaves a partial file under the final name. Files already
    present that pass the same check are not fetched again unless ``overwrite``. Finally
    ``cache_dir/SHA256SUMS`` records the files, so :func:`load_mnist` verifies them cheaply.

    Args:
        cache_dir: created if missing.
        base_url: an ``http://`` or ``https://`` URL (no trailing file name).
        splits: which splits to fetch.
        timeout_s: socket timeout per request, in seconds.
        max_bytes: the most bytes accepted per file (the largest MNIST file is 9.9 MB).
        overwrite: fetch even files that are present and valid.

    Returns:
        ``cache_dir`` as a Path, ready for :func:`load_mnist`.

    Raises:
        ConfigError: ``base_url`` is not http(s).
        DataError: the server cannot be reached, answers with an error, sends too much, or a
            file fails its checksum or IDX check (nothing is left under the final name).
    """
    for split in splits:
        check_split(split)
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"MNIST download base URL must be http:// or https://, got {base_url!r}")
    base = base_url.rstrip("/")
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)

    sums_url = f"{base}/SHA256SUMS"
    served_sums: dict[str, str] | None
    try:
        text = _fetch(sums_url, timeout_s, 1 << 16, None)
    except urllib.error.HTTPError as exc:
        # S3 buckets answer 403 rather than 404 for a key that does not exist.
        if exc.code not in (403, 404, 410):
            raise _download_error(sums_url, exc) from exc
        served_sums = None
    except _NETWORK_ERRORS as exc:
        raise _download_error(sums_url, exc) from exc
    else:
        try:
            served_sums = parse_sha256sums(text.decode("utf-8"), sums_url)
        except UnicodeDecodeError as exc:
            raise DataError(f"{sums_url}: not a text checksum file ({exc})") from exc

    names = [f"{name}.gz" for split in splits for name in MNIST_FILES[split]]
    if served_sums is not None:
        unlisted = [n for n in names if n not in served_sums]
        if unlisted:
            raise DataError(f"{sums_url} does not list {', '.join(unlisted)}")

    for name in names:
        final = directory / name
        if final.is_file() and not overwrite:
            try:
                _check_download(final, name, served_sums, sums_url)
                continue
            except DataError:
                pass  # present but wrong: fetch it again
        url = f"{base}/{name}"
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                try:
                    _fetch(url, timeout_s, max_bytes, sink)
                except _NETWORK_ERRORS as exc:
                    raise _download_error(url, exc) from exc
                sink.flush()
                os.fsync(sink.fileno())
            _check_download(tmp, name, served_sums, url)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    write_sha256sums(directory, names)
    return directory

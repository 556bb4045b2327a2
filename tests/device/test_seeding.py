"""derive_seed: seeds named by run, round and device, identical in every process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from device.seeding import derive_seed


def test_derive_seed_is_blake2b_of_the_slash_joined_parts() -> None:
    """The documented rule, so that other implementations (or a later Python) agree."""
    expected = hashlib.blake2b(b"run-1/3/pi-07", digest_size=8).digest()
    assert derive_seed("run-1", 3, "pi-07") == int.from_bytes(expected, "big")


def test_derive_seed_is_the_same_in_another_process() -> None:
    """Unlike hash(), the seed does not change with the process or PYTHONHASHSEED."""
    code = "from device.seeding import derive_seed; print(derive_seed('run-1', 3, 'pi-07'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "4321"},
    )
    assert int(out.stdout) == derive_seed("run-1", 3, "pi-07")


def test_derive_seed_separates_its_parts() -> None:
    """Different part lists give different seeds, and the seed fits numpy and torch."""
    seeds = {derive_seed("r", 1, "d"), derive_seed("r", 1, "e"), derive_seed("r", 11, "d")}
    seeds.add(derive_seed("r1", "d"))
    assert len(seeds) == 4 and all(0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize(
    ("parts", "error", "message"),
    [
        ((), ValueError, "at least one part"),
        (("a/b",), ValueError, "contains '/'"),
        (("a", True), TypeError, "part 1 must be str or int, got bool"),
        ((1.5,), TypeError, "part 0 must be str or int, got float"),
    ],
)
def test_derive_seed_refuses_ambiguous_parts(
    parts: tuple[object, ...], error: type[Exception], message: str
) -> None:
    """A '/' inside a part would make ("a/b",) and ("a", "b") the same seed; bools and floats
    read ambiguously. All are refused rather than silently colliding."""
    with pytest.raises(error, match=message):
        derive_seed(*parts)  # type: ignore[arg-type]

"""The deterministic train/evaluation split of a device's own examples, by example identity.

An example's side depends only on its identity (a string a loader derives from where the
example lives: ``cat/0001.png``, ``log.csv#812``, ``day3.npz#17``), the split's seed and the
evaluation fraction:

    u = int.from_bytes(blake2b(identity, key=seed as 8 bytes, person=b"sf-split", 8-byte
        digest), "big") / 2**64,   evaluation  iff  u < eval_fraction.

So the same example falls on the same side on every scan, in every process and on every
machine, however much data arrives later (Python's ``hash()`` is salted per process and is never
used). The evaluation share is ``eval_fraction`` in expectation, not exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["SplitMemo", "split_point"]

_PERSON = b"sf-split"


def _keyed(seed: int) -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=8, key=seed.to_bytes(8, "big"), person=_PERSON)


def split_point(identity: str, seed: int, *, keyed: hashlib.blake2b | None = None) -> float:
    """``u`` in [0, 1) for ``identity`` under ``seed`` (see the module docstring).

    ``keyed`` is ``_keyed(seed)`` made once for many identities (copying a keyed state is
    twice as fast as keying a new one); the result is the same."""
    state = (keyed or _keyed(seed)).copy()
    state.update(identity.encode("utf-8", "surrogateescape"))
    return int.from_bytes(state.digest(), "big") / 2**64


class SplitMemo:
    """Each identity's side, computed once: a re-scan of 50,000 known examples hashes none.

    ``sides(identities)`` returns the evaluation flags in order and forgets identities that are
    no longer there, so the memo never outgrows the data.
    """

    def __init__(self, *, seed: int, eval_fraction: float) -> None:
        self._seed = seed
        self._fraction = eval_fraction
        self._memo: dict[str, bool] = {}

    def sides(self, identities: Iterable[str]) -> tuple[npt.NDArray[np.bool_], int, int]:
        """``(is_evaluation, added, removed)``: the flags in the order of ``identities``, how
        many identities were not known at the previous call and how many known ones are gone.

        Identities must be distinct (each loader guarantees it)."""
        old: Mapping[str, bool] = self._memo
        memo: dict[str, bool] = {}
        added = 0
        keyed = _keyed(self._seed)
        for identity in identities:
            side = old.get(identity)
            if side is None:
                side = split_point(identity, self._seed, keyed=keyed) < self._fraction
                added += 1
            memo[identity] = side
        removed = len(old) - (len(memo) - added)
        self._memo = memo
        flags = np.fromiter(memo.values(), dtype=np.bool_, count=len(memo))
        return flags, added, removed

"""Seeds derived from names, the same on every machine, Python version and process.

Every random choice in SparseFleet (a model's initial weights, a partition of a dataset, the
shuffling of a device's local data in a round) draws from a seed derived here from the names of
what it belongs to, e.g. ``derive_seed(run_id, round_number, device_id)``. Python's ``hash()`` is
salted per process (PYTHONHASHSEED), so it must never be used for this.
"""

from __future__ import annotations

import hashlib

__all__ = ["SEED_BITS", "derive_seed"]

#: Derived seeds are unsigned integers below ``2**SEED_BITS``; numpy and torch accept them all.
SEED_BITS = 64


def derive_seed(*parts: str | int) -> int:
    """The seed for the thing named by ``parts``: blake2b over the ``/``-joined parts.

    The parts are joined with ``/`` (integers in decimal) and hashed with an 8-byte blake2b
    digest, read as a big-endian unsigned integer in ``[0, 2**64)``. Deterministic across
    processes and machines.

    So that the joined text names one list of parts only, string parts must not contain ``/``
    (``derive_seed("a/b")`` would otherwise equal ``derive_seed("a", "b")``), and at least one
    part is required.

    Raises:
        TypeError: a part is neither ``str`` nor ``int`` (``bool`` is refused too: ``True`` and
            ``1`` would otherwise name different seeds for what reads as the same thing).
        ValueError: no parts, or a string part contains ``/``.
    """
    if not parts:
        raise ValueError("derive_seed needs at least one part")
    texts: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise TypeError(f"derive_seed part {i} must be str or int, got {type(part).__name__}")
        if isinstance(part, str) and "/" in part:
            raise ValueError(f"derive_seed part {i} ({part!r}) contains '/', the separator")
        texts.append(str(part))
    digest = hashlib.blake2b("/".join(texts).encode("utf-8"), digest_size=SEED_BITS // 8).digest()
    return int.from_bytes(digest, "big")

"""Partitioners: one dataset's example indices split over simulated devices.

:func:`shards` (the FedDST/LotteryFL pathological split), :func:`dirichlet` and :func:`iid`
return one sorted ``int64`` index array per client, disjoint, as a pure function of their
arguments and ``seed``; :func:`partition` is the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from device.data.dataset import IndexArray
from device.errors import ConfigError, DataError

__all__ = ["PARTITIONERS", "dirichlet", "iid", "partition", "partitioner_names", "shards"]


def _as_labels(labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor) -> IndexArray:
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise DataError(
            f"labels must be a 1-D integer array, got {array.dtype} with shape {array.shape}"
        )
    if array.size and array.min() < 0:
        raise DataError(f"labels must be non-negative, found {int(array.min())}")
    return array.astype(np.int64, copy=False)


def _rng(seed: int, num_clients: int, who: str) -> np.random.Generator:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"{who}: num_clients must be a positive integer, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"{who}: seed must be an integer in [0, 2**64), got {seed!r}")
    return np.random.default_rng(seed)


def iid(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
) -> list[IndexArray]:
    """Every example to exactly one of ``num_clients`` clients, uniformly at random.

    Client sizes differ by at most one (the first ``N mod num_clients`` clients get one more).
    Each index array is sorted.

    Raises:
        ConfigError: ``num_clients`` is not in ``[1, N]`` or the seed is invalid.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "iid")
    if num_clients > len(y):
        raise ConfigError(f"iid: {num_clients} clients but only {len(y)} examples")
    order = rng.permutation(len(y))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def _max_shard_clients(fits: IndexArray, classes_per_client: int) -> int:
    """The most clients that ``classes_per_client`` distinct classes each can serve.

    ``fits[c]`` is how many clients class ``c`` can serve. K clients fit iff
    ``sum_c min(fits[c], K) >= K * classes_per_client``; the left side grows by at most
    ``#{c: fits[c] > K}`` per extra client, so feasibility is an interval [0, K_max].
    """
    if classes_per_client > len(fits):
        return 0
    upper = int(fits.sum()) // classes_per_client
    if upper == 0:
        return 0
    candidates = np.arange(1, upper + 1)
    served = np.minimum(fits[None, :], candidates[:, None]).sum(axis=1)
    feasible = candidates[served >= candidates * classes_per_client]
    return int(feasible.max()) if feasible.size else 0


def _level_counts(caps: IndexArray, total: int, rng: np.random.Generator) -> IndexArray:
    """Per-class slot counts, as even as ``caps`` allow, summing to ``total`` (<= caps.sum())."""
    lo, hi = 0, int(caps.max())
    while lo < hi:  # the highest level L with sum(min(caps, L)) <= total
        mid = (lo + hi + 1) // 2
        if int(np.minimum(caps, mid).sum()) <= total:
            lo = mid
        else:
            hi = mid - 1
    counts = np.minimum(caps, lo)
    remainder = total - int(counts.sum())
    if remainder:
        # By the choice of L, fewer classes than remain are above it: one extra slot each.
        counts[rng.choice(np.flatnonzero(caps > lo), size=remainder, replace=False)] += 1
    return counts


def shards(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
    classes_per_client: int = 2,
    per_class: int = 20,
) -> list[IndexArray]:
    """The pathological non-IID split of FedDST and LotteryFL.

    Each client gets ``classes_per_client`` distinct classes with exactly ``per_class``
    examples of each (defaults: 2 classes x 20 images, as in FedDST with K = 400 on MNIST), no
    example is given twice, and examples no client needs are left out.

    How: classes get client slots as evenly as their sizes allow (class ``c`` can fill at most
    ``min(count_c // per_class, num_clients)``); slots are laid out class after class and dealt
    to clients column-wise, which gives every client distinct classes; then random swaps of
    classes between clients (keeping every client's classes distinct) decorrelate which
    classes are paired; finally each class's examples, shuffled, are dealt ``per_class`` at a
    time. Each returned index array is sorted.

    Raises:
        ConfigError: a parameter is out of range, or the labels cannot serve that many clients
            (the message says how many they can serve).
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "shards")
    if classes_per_client < 1 or per_class < 1:
        raise ConfigError(
            f"shards: classes_per_client and per_class must be at least 1, "
            f"got {classes_per_client} and {per_class}"
        )
    classes, class_counts = np.unique(y, return_counts=True)
    fits = class_counts // per_class
    caps = np.minimum(fits, num_clients)
    total = num_clients * classes_per_client
    if classes_per_client > len(classes) or int(caps.sum()) < total:
        raise ConfigError(
            f"shards: cannot give {num_clients} clients {classes_per_client} distinct classes "
            f"with {per_class} examples each: the labels hold {len(classes)} classes "
            f"({', '.join(f'{c}: {n}' for c, n in zip(classes, class_counts, strict=True))} "
            f"examples), enough for at most {_max_shard_clients(fits, classes_per_client)} clients"
        )
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    counts = _level_counts(caps, total, rng)
    order = rng.permutation(len(classes))
    # Column-wise deal: client k gets slots k, k + K, k + 2K, ...; a class's run of at most K
    # consecutive slots therefore lands on distinct clients.
    table = np.repeat(order, counts[order]).reshape(classes_per_client, num_clients).T
    rows: list[list[int]] = table.tolist()
    if num_clients > 1 and classes_per_client < len(classes):
        steps = 10 * total
        picks = zip(
            rng.integers(num_clients, size=steps).tolist(),
            rng.integers(classes_per_client, size=steps).tolist(),
            rng.integers(num_clients, size=steps).tolist(),
            rng.integers(classes_per_client, size=steps).tolist(),
            strict=True,
        )
        for k1, j1, k2, j2 in picks:
            a, b = rows[k1], rows[k2]
            c1, c2 = a[j1], b[j2]
            if c1 != c2 and c2 not in a and c1 not in b:
                a[j1], b[j2] = c2, c1
    rows = [rows[k] for k in rng.permutation(num_clients).tolist()]
    cursor = [0] * len(classes)
    parts: list[IndexArray] = []
    for row in rows:
        chunks = []
        for c in row:
            chunks.append(pools[c][cursor[c] : cursor[c] + per_class])
            cursor[c] += per_class
        parts.append(np.sort(np.concatenate(chunks)).astype(np.int64))
    return parts


def dirichlet(
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    *,
    seed: int,
    beta: float = 0.5,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[IndexArray]:
    """Label-skewed split: each class spread over clients by Dirichlet(beta) proportions.

    For every class, proportions ``p ~ Dir(beta, ..., beta)`` over the ``num_clients`` clients
    split that class's shuffled examples (client k gets ``floor``-rounded share ``p_k``).
    Small ``beta`` (e.g. 0.1) gives each client few classes; large ``beta`` approaches iid.
    Every example goes to exactly one client. Draws are repeated (up to ``max_tries``) until
    every client holds at least ``min_size`` examples. Each returned index array is sorted.

    Raises:
        ConfigError: ``beta <= 0``, ``min_size < 0``, ``num_clients * min_size`` exceeds the
            examples, or no draw in ``max_tries`` gave every client ``min_size`` examples.
        DataError: ``labels`` is not a 1-D array of non-negative integers.
    """
    y = _as_labels(labels)
    rng = _rng(seed, num_clients, "dirichlet")
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"dirichlet: beta must be a positive number, got {beta}")
    if min_size < 0 or max_tries < 1:
        raise ConfigError(
            f"dirichlet: min_size must be >= 0 and max_tries >= 1, got {min_size}, {max_tries}"
        )
    if num_clients * min_size > len(y):
        raise ConfigError(
            f"dirichlet: {num_clients} clients x min_size {min_size} exceeds the {len(y)} examples"
        )
    members = [np.flatnonzero(y == c) for c in np.unique(y)]
    alpha = np.full(num_clients, float(beta))
    for _ in range(max_tries):
        # Sizes first, examples only for an accepted draw: rejected draws stay cheap.
        cuts = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in members:
            shares = np.cumsum(rng.dirichlet(alpha))[:-1]
            cut = np.minimum(np.floor(shares * len(idx)).astype(np.int64), len(idx))
            cuts.append(cut)
            sizes += np.diff(np.concatenate(([0], cut, [len(idx)])))
        if int(sizes.min()) < min_size:
            continue
        pieces: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for idx, cut in zip(members, cuts, strict=True):
            for k, chunk in enumerate(np.split(rng.permutation(idx), cut)):
                pieces[k].append(chunk)
        return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
    raise ConfigError(
        f"dirichlet: no draw in {max_tries} gave each of {num_clients} clients at least "
        f"{min_size} of the {len(y)} examples (beta={beta}); lower min_size or num_clients, "
        f"or raise beta"
    )


#: name -> partitioner ``(labels, num_clients, *, seed, **options) -> list of index arrays``.
PARTITIONERS: dict[str, Callable[..., list[IndexArray]]] = {
    "shards": shards,
    "dirichlet": dirichlet,
    "iid": iid,
}


def partitioner_names() -> list[str]:
    """The registered partitioner names, sorted."""
    return sorted(PARTITIONERS)


def partition(
    name: str,
    labels: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    num_clients: int,
    seed: int,
    **kwargs: Any,
) -> list[IndexArray]:
    """Split ``labels``' indices over ``num_clients`` clients with partitioner ``name``.

    ``kwargs`` are the partitioner's options (``classes_per_client``, ``per_class`` for
    shards; ``beta``, ``min_size`` for dirichlet). The result is a pure function of the
    arguments (with the same numpy version): derive ``seed`` from the run's name with
    :func:`device.seeding.derive_seed` so every process computes the same split.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
        ConfigError, DataError: as the partitioner raises them.
    """
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; known: {', '.join(partitioner_names())}")
    return PARTITIONERS[name](labels, num_clients, seed=seed, **kwargs)

"""Partial-sum form of every strategy's aggregation, exact so that sharding cannot change a bit.

Sharded aggregation (issue 9) splits a round's updates over K workers; each keeps an
``Accumulator``, the coordinator ``merge``s them and ``finish``es the round. For K = 1 and K = 3
(or any split, any arrival order, any merge tree) to give the *same bits*, the partial sums are
kept **exactly**, as integers:

- a float32 value is ``m * 2**(p - 149)`` with an integer ``|m| < 2**24`` and ``p`` in
  [0, 253]; an example count ``w`` is an integer in [1, 2**30); so ``w * x`` is the exact
  integer ``w * m`` (``< 2**54``) placed at bit ``p`` of a fixed-point number;
- ``ExactSum`` (``fleet.strategies.exact_sum``) keeps, per coordinate, that fixed-point number
  in int64 *limbs* of 32 bits (each add puts < 2**33 into a limb, so 2**30 adds cannot
  overflow); integer addition is associative and commutative, so the sum is the same whatever
  the order or the split, and ``remove`` (adding ``-w``) is exact too;
- ``finish`` turns each exact sum into float64 by one fixed procedure (carry-normalise, sign and
  magnitude, Horner from the top limb), divides by the exact integer total weight in float64 and
  rounds to float32, exactly where the strategies' own code does (``aggregate.weighted_mean``,
  ``masked_weighted_mean``). Vote counts and example counts are plain integers.

Why not the alternatives: float64 sums of exact products are still rounded at every addition
once exponents differ, so their result depends on the order; keeping every device's contribution
until the end is exact but hands the coordinator the whole round instead of one partial sum per
worker. The price of exactness is a few int64 passes per value (``bench/aggregate.py``).

Relation to ``Strategy.aggregate``: ``aggregate_exact(strategy, round, model, results)`` is
``finish`` of one accumulator holding every result; it runs the strategy's own code after the
sums (FedAvgM's momentum, PruneFL's reconfiguration and cost model, FedDST's vote and top-k), so
it differs from ``strategy.aggregate`` only where the latter's float64 running sum was rounded:
never when every float64 partial sum is exact, otherwise by at most one float32 ulp of a weight
(and, in FedDST, by a top-k tie that such an ulp decides). The runner gets bit-identical results
with and without workers by calling ``aggregate_exact`` instead of ``strategy.aggregate``.

Limits (``ValueError`` names them): example counts below ``2**30`` per device, at most ``2**30``
adds per accumulator, and for PruneFL a round total below ``2**29`` examples.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt

from fleet.strategies.aggregate import topk_mask
from fleet.strategies.base import ClientResult, FloatArray, GlobalModel, Strategy
from fleet.strategies.exact_sum import MAX_ADDS, MAX_WEIGHT, ExactSum

if TYPE_CHECKING:  # only for annotations: fleet.strategies.validate imports every strategy module
    from fleet.strategies.validate import SparseResult

__all__ = [
    "MAX_ADDS",
    "MAX_WEIGHT",
    "Accumulator",
    "ExactSum",
    "aggregate_exact",
    "kind_of",
]

IntArray = npt.NDArray[np.int64]

PRUNEFL_MAX_TOTAL = 2**29
"""PruneFL's ``finish`` reuses ``weighted_mean`` on copies of the exact mean; that is exact
(returns the mean unchanged) only while the round's total example count stays below this."""

Kind = Literal["mean", "vote"]
_KINDS: dict[str, Kind] = {"fedavg": "mean", "fedavgm": "mean", "prunefl": "mean", "feddst": "vote"}


def kind_of(strategy_name: str) -> Kind:
    """``"mean"`` (FedAvg, FedAvgM, PruneFL: every device trains the global mask) or ``"vote"``
    (FedDST: per-device masks, masked means and votes)."""
    try:
        return _KINDS[strategy_name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {strategy_name!r}; known: {', '.join(sorted(_KINDS))}"
        ) from None


@dataclass
class _Tensor:
    """One tensor's partial sums: ``num`` over ``slots`` (flat indices), plus for FedDST's masked
    tensors the example weight ``den`` and the ``votes`` of every coordinate."""

    slots: npt.NDArray[np.intp] | None  # None: every coordinate
    num: ExactSum
    den: IntArray | None = None
    votes: IntArray | None = None


@dataclass
class Accumulator:
    """Exact partial sums of one round's results for one strategy kind and one global model.

    Build with ``Accumulator.for_model(strategy_name, model)``; ``add`` validated results (the
    caller has run ``strategy.check_result``), ``merge`` accumulators of other shards (disjoint
    devices), ``finish`` on the coordinator. ``devices`` maps each added device to its example
    count; ``importance`` (PruneFL) holds the exact sums of the reporters' importance.
    """

    kind: Kind
    model_version: int
    shapes: dict[str, tuple[int, ...]]
    tensors: dict[str, _Tensor]
    devices: dict[str, int] = field(default_factory=dict)
    importance: dict[str, ExactSum] = field(default_factory=dict)
    reporters: list[str] = field(default_factory=list)

    @classmethod
    def for_model(cls, strategy_name: str, model: GlobalModel) -> Accumulator:
        """An empty accumulator for results trained from ``model`` under ``strategy_name``."""
        kind = kind_of(strategy_name)
        tensors: dict[str, _Tensor] = {}
        shapes = {name: tuple(w.shape) for name, w in model.weights.items()}
        for name, w in model.weights.items():
            mask = model.masks.get(name)
            if mask is None:
                tensors[name] = _Tensor(None, ExactSum(w.size))
            elif kind == "mean":
                # Every device trains exactly the global mask (check_result): sum only there.
                slots = np.flatnonzero(mask)
                tensors[name] = _Tensor(slots, ExactSum(slots.size))
            else:
                tensors[name] = _Tensor(
                    None,
                    ExactSum(w.size),
                    den=np.zeros(w.size, dtype=np.int64),
                    votes=np.zeros(w.size, dtype=np.int64),
                )
        return cls(kind, model.version, shapes, tensors)

    # -- building ---------------------------------------------------------------------------

    def add(self, result: ClientResult) -> None:
        """Add one device's validated result; a device already added raises ``ValueError``."""
        if result.device_id in self.devices:
            raise ValueError(f"device {result.device_id!r} is already in this accumulator")
        self._apply(result, result.num_examples)
        self.devices[result.device_id] = result.num_examples
        if result.importance:
            self.reporters.append(result.device_id)

    def add_sparse(self, result: SparseResult) -> None:
        """``add`` of a result validated by ``validate.check_sparse``: the same exact
        sums as ``add(result.to_client_result(model))``, without the dense copies."""
        if result.device_id in self.devices:
            raise ValueError(f"device {result.device_id!r} is already in this accumulator")
        weight = result.num_examples
        if not 1 <= weight < MAX_WEIGHT:
            raise ValueError(
                f"device {result.device_id!r}: num_examples {weight} is outside [1, 2**30)"
            )
        for name, t in self.tensors.items():
            values, idx = result.values[name], result.index[name]
            if t.votes is not None and t.den is not None:
                held = np.flatnonzero(result.masks[name]) if idx is None else idx
                t.num.add(values, weight, held)
                t.den[held] += weight
                t.votes[held] += 1
            elif t.slots is not None:
                if name not in result.on_global_mask:
                    # add() sums the dense weights at the global mask: zero where the
                    # device held nothing. (check_result makes this path unreachable.)
                    dense = np.zeros(int(np.prod(self.shapes[name])), dtype=np.float32)
                    dense[slice(None) if idx is None else idx] = values
                    values = dense[t.slots]
                t.num.add(values, weight)  # on the global mask: values are in slot order
            else:
                t.num.add(values, weight, idx)
        for name, g in result.importance.items():
            acc = self.importance.get(name)
            if acc is None:
                acc = self.importance[name] = ExactSum(int(np.prod(self.shapes[name])))
            acc.add(np.asarray(g, dtype=np.float32), 1)
        self.devices[result.device_id] = weight
        if result.importance:
            self.reporters.append(result.device_id)

    def remove(self, result: ClientResult) -> None:
        """Take back a result added earlier (exact): the same result, subtracted."""
        if result.device_id not in self.devices:
            raise ValueError(f"device {result.device_id!r} is not in this accumulator")
        if self.devices[result.device_id] != result.num_examples:
            raise ValueError(f"device {result.device_id!r} was added with another example count")
        self._apply(result, -result.num_examples)
        del self.devices[result.device_id]
        if result.device_id in self.reporters:
            self.reporters.remove(result.device_id)

    def _apply(self, result: ClientResult, weight: int) -> None:
        if not 1 <= abs(weight) < MAX_WEIGHT:
            raise ValueError(
                f"device {result.device_id!r}: num_examples {abs(weight)} is outside [1, 2**30)"
            )
        sign = 1 if weight > 0 else -1
        for name, t in self.tensors.items():
            values = np.asarray(result.weights[name], dtype=np.float32).reshape(-1)
            if t.votes is not None and t.den is not None:
                held = np.flatnonzero(result.masks[name])
                t.num.add(values[held], weight, held)
                t.den[held] += weight
                t.votes[held] += sign
            elif t.slots is not None:
                t.num.add(values[t.slots], weight)
            else:
                t.num.add(values, weight)
        if result.importance:
            for name, g in result.importance.items():
                acc = self.importance.get(name)
                if acc is None:
                    acc = self.importance[name] = ExactSum(int(np.prod(self.shapes[name])))
                acc.add(np.asarray(g, dtype=np.float32), sign)

    def merge(self, other: Accumulator) -> None:
        """Add another shard's sums (same kind and model version, disjoint devices)."""
        if other.kind != self.kind or other.model_version != self.model_version:
            raise ValueError(
                f"cannot merge a {other.kind} accumulator of model version {other.model_version} "
                f"into a {self.kind} one of version {self.model_version}"
            )
        if other.shapes != self.shapes:
            raise ValueError("cannot merge accumulators of different tensor shapes")
        both = sorted(set(self.devices) & set(other.devices))
        if both:
            raise ValueError(f"devices {both[:5]} are in both accumulators")
        for name, t in self.tensors.items():
            o = other.tensors[name]
            t.num.merge(o.num)
            if t.den is not None and o.den is not None and t.votes is not None:
                t.den += o.den
                assert o.votes is not None
                t.votes += o.votes
        for name, g in other.importance.items():
            mine = self.importance.get(name)
            if mine is None:
                mine = self.importance[name] = ExactSum(g.size)
            mine.merge(g)
        self.devices.update(other.devices)
        self.reporters.extend(other.reporters)

    # -- finishing --------------------------------------------------------------------------

    def means(self, model: GlobalModel) -> dict[str, FloatArray]:
        """Per tensor, the example-weighted mean as float32: masked mean where the tensor is
        FedDST-masked (the global value where nobody holds a coordinate), zero outside the global
        mask for the other kinds."""
        if not self.devices:
            raise ValueError("aggregation needs at least one result")
        total = sum(self.devices.values())
        out: dict[str, FloatArray] = {}
        for name, t in self.tensors.items():
            shape = self.shapes[name]
            sums = t.num.to_float64()
            if t.den is not None:
                flat = model.weights[name].astype(np.float64).reshape(-1)
                held = np.flatnonzero(t.den)
                flat[held] = sums[held] / t.den[held].astype(np.float64)
                out[name] = flat.reshape(shape).astype(np.float32)
            elif t.slots is not None:
                flat32 = np.zeros(int(np.prod(shape)), dtype=np.float32)
                flat32[t.slots] = (sums / float(total)).astype(np.float32)
                out[name] = flat32.reshape(shape)
            else:
                out[name] = (sums / float(total)).astype(np.float32).reshape(shape)
        return out

    def finish(self, strategy: Strategy, round: int, model: GlobalModel) -> GlobalModel:
        """The next global model, through the strategy's own code after the exact sums.

        Changes the strategy's state exactly as its ``aggregate`` would (FedAvgM momentum,
        PruneFL reconfiguration counters and cost model).
        """
        if kind_of(strategy.name) != self.kind or model.version != self.model_version:
            raise ValueError(
                f"accumulator ({self.kind}, model version {self.model_version}) does not match "
                f"strategy {strategy.name!r} and model version {model.version}"
            )
        means = self.means(model)
        if strategy.name in ("fedavg", "fedavgm"):
            # weighted_mean of a single array with weight 1 returns it bit for bit, so the
            # strategy's aggregate (momentum and all) runs on the exact mean.
            pseudo = ClientResult("<sharded>", 1, means, masks=dict(model.masks))
            return strategy.aggregate(round, model, [pseudo])
        if strategy.name == "prunefl":
            return self._finish_prunefl(strategy, round, model, means)
        return self._finish_feddst(strategy, model, means)

    def _finish_prunefl(
        self, strategy: Strategy, round: int, model: GlobalModel, means: dict[str, FloatArray]
    ) -> GlobalModel:
        # PruneFL's cost model needs every device's example count, so one pseudo-result per
        # device (sorted, as the runner sorts), each carrying the same exact mean: n_i * x summed
        # in float64 is exact while sum(n_i) < 2**29, and (W * x) / W is x again.
        total = sum(self.devices.values())
        if total >= PRUNEFL_MAX_TOTAL:
            raise ValueError(f"prunefl: {total} examples in one round; exact only below 2**29")
        importance = {
            name: acc.to_float64().reshape(self.shapes[name])
            for name, acc in self.importance.items()
        }
        pseudo = [
            ClientResult(
                device_id,
                count,
                means,
                masks=dict(model.masks),
                # float64, exactly as PruneFL's own sum_arrays hands it to the reconfiguration.
                importance=cast(Any, importance) if i == 0 and self.reporters else {},
            )
            for i, (device_id, count) in enumerate(sorted(self.devices.items()))
        ]
        return strategy.aggregate(round, model, pseudo)

    def _finish_feddst(
        self, strategy: Strategy, model: GlobalModel, means: dict[str, FloatArray]
    ) -> GlobalModel:
        """``aggregate.sparse_vote_merge`` from the exact masked means and vote counts."""
        state = strategy.state_dict()
        options: Any = getattr(strategy, "options")  # noqa: B009 - FedDSTOptions
        min_votes, fill = int(options.min_votes), bool(options.fill_to_budget)
        weights: dict[str, FloatArray] = {}
        masks: dict[str, npt.NDArray[np.bool_]] = {}
        for name in model.weights:
            t = self.tensors[name]
            if t.votes is None:
                weights[name] = means[name]
                continue
            budget = int(state[f"budget/{name}"])
            votes = t.votes.reshape(self.shapes[name])
            mean = means[name]
            eligible = votes >= max(min_votes, 1)
            if fill:
                k = budget
                priority = np.where(eligible, 2, np.where(votes > 0, 1, 0))
            else:
                k = min(budget, int(np.count_nonzero(eligible)))
                priority = eligible.astype(np.int64)
            mask = topk_mask(np.abs(mean), k, priority)
            weights[name] = np.where(mask, mean, np.float32(0.0)).astype(np.float32)
            masks[name] = mask
        return GlobalModel(model.version + 1, weights, masks, model.model_name)

    # -- handover ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise (numpy ``.npz``, uncompressed) for the handover to the coordinator."""
        arrays: dict[str, npt.NDArray[Any]] = {}
        meta: dict[str, Any] = {
            "kind": self.kind,
            "model_version": self.model_version,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "devices": self.devices,
            "reporters": self.reporters,
            "tensors": {},
            "importance": {},
        }
        for i, (name, t) in enumerate(self.tensors.items()):
            meta["tensors"][name] = {"i": i, "lo": t.num.lo, "adds": t.num.adds}
            arrays[f"t{i}_rows"] = t.num.rows
            if t.slots is not None:
                arrays[f"t{i}_slots"] = t.slots
            if t.den is not None and t.votes is not None:
                arrays[f"t{i}_den"] = t.den
                arrays[f"t{i}_votes"] = t.votes
        for i, (name, g) in enumerate(self.importance.items()):
            meta["importance"][name] = {"i": i, "lo": g.lo, "adds": g.adds}
            arrays[f"g{i}_rows"] = g.rows
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Accumulator:
        """Inverse of ``to_bytes``; ``ValueError`` for anything that is not such a file."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                files = {k: z[k] for k in z.files}
            meta = json.loads(bytes(files["meta"]).decode())
            shapes = {n: tuple(int(d) for d in s) for n, s in meta["shapes"].items()}
            tensors: dict[str, _Tensor] = {}
            for name, info in meta["tensors"].items():
                i = info["i"]
                rows = files[f"t{i}_rows"]
                slots = files.get(f"t{i}_slots")
                num = ExactSum(rows.shape[1])
                num.rows, num.lo, num.adds = rows.astype(np.int64), int(info["lo"]), info["adds"]
                tensors[name] = _Tensor(
                    slots, num, files.get(f"t{i}_den"), files.get(f"t{i}_votes")
                )
            importance: dict[str, ExactSum] = {}
            for name, info in meta["importance"].items():
                rows = files[f"g{info['i']}_rows"]
                g = ExactSum(rows.shape[1])
                g.rows, g.lo, g.adds = rows.astype(np.int64), int(info["lo"]), info["adds"]
                importance[name] = g
            return cls(
                kind_of_name(meta["kind"]),
                int(meta["model_version"]),
                shapes,
                tensors,
                {str(d): int(n) for d, n in meta["devices"].items()},
                importance,
                [str(d) for d in meta["reporters"]],
            )
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise ValueError(f"not a serialised accumulator: {exc}") from exc


def kind_of_name(value: str) -> Kind:
    """A ``Kind`` from its serialised name."""
    if value == "mean":
        return "mean"
    if value == "vote":
        return "vote"
    raise ValueError(f"unknown accumulator kind {value!r}; known: mean, vote")


def aggregate_exact(
    strategy: Strategy, round: int, model: GlobalModel, results: Sequence[ClientResult]
) -> GlobalModel:
    """``strategy.aggregate`` with exact sums: what any sharding of ``results`` finishes to.

    Checks every result with ``strategy.check_result`` first, as ``aggregate`` does.
    """
    acc = Accumulator.for_model(strategy.name, model)
    for r in results:
        strategy.check_result(model, r)
        acc.add(r)
    return acc.finish(strategy, round, model)

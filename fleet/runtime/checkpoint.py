"""The run's global model as the runner holds it: making a model current, checkpointing it, and
starting or restoring a run from the store.

Durability: a checkpoint of the new global model and the strategy's state is written before the
round is closed, so a restarted fleet manager continues from the store alone (``restore``: the
open round's input model, else the newest checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device.errors import ConfigError
from device.model_id import architecture_digest, layout_difference
from device.model_ref import ModelRef
from device.models import ModelLike, create_model, meta_model, prunable_names
from device.seeding import derive_seed
from device.wire.codec import KnownMask, model_digest
from fleet.runtime.spec import RunSpec
from fleet.state.store import Store
from fleet.strategies.base import GlobalModel, Strategy


def initial_model(
    model: ModelLike, seed: int, prunable: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], list[str], bytes]:
    """The seeded initial weights of ``model`` (every state_dict entry as float32, buffers
    included), the names of its prunable tensors (``prunable``: a run's regular expressions;
    empty: every Linear and Conv weight) and its architecture digest (``device.model_id``).

    Raises ``ConfigError`` (naming the model) when it cannot be built or a pattern is bad.
    """
    ref = ModelRef.of(model)
    try:
        module = create_model(ref, seed=seed)
        names = prunable_names(module, patterns=prunable)
    except ValueError as exc:  # unknown name, a bad pattern (a factory's error is a ConfigError)
        raise ConfigError(f"model {ref.text!r}: {exc}") from None
    weights = {
        k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()
    }
    return weights, names, architecture_digest(module, ref)


def initial_weights(
    model: ModelLike, seed: int, prunable: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The seeded initial weights of ``model`` and the names of its prunable tensors
    (``initial_model`` without the digest)."""
    weights, names, _ = initial_model(model, seed, prunable)
    return weights, names


def restored_architecture(spec: RunSpec, weights: Mapping[str, np.ndarray]) -> bytes:
    """The architecture digest of the run's model as this process builds it now, after checking
    that the build has the checkpoint's tensors (a changed model package would otherwise send
    devices weights of another layout); ``ConfigError`` naming the difference."""
    ref = spec.model
    module = meta_model(ref)
    difference = layout_difference(module, weights)
    if difference:
        raise ConfigError(
            f"run {spec.run_id!r}: model {ref.text!r} as built now does not match the run's "
            f"checkpoint ({difference}); install the model package the run started with"
        )
    return architecture_digest(module, ref)


def masks_differ(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Whether two mask sets differ in names or in any element."""
    if a.keys() != b.keys():
        return True
    return any(not np.array_equal(a[n], b[n]) for n in a)


class CurrentModel:
    """The current global model, its digest and mask version, and the model before it.

    Invariants: ``digest`` is ``model_digest`` of ``model`` (None until ``start_new`` or
    ``restore``); ``architecture_digest`` is the run's model's (``device.model_id``), the same
    for every version; ``mask_version`` is the version of the model whose masks are current
    (masks that did not change keep their version, so devices keep their cached masks); the
    mask book of ``model`` and of ``previous`` (what late updates were trained on) are kept, no
    other.
    """

    def __init__(self, spec: RunSpec, store: Store, strategy: Strategy) -> None:
        self.spec = spec
        self.store = store
        self.strategy = strategy
        self.model: GlobalModel | None = None
        self.digest = b""
        self.mask_version = 0
        self.architecture_digest = b""
        self.previous: tuple[GlobalModel, bytes] | None = None  # for the "next" late policy
        self._books: dict[int, dict[str, KnownMask]] = {}  # model version -> its masks

    def start_new(self) -> None:
        """Create the run in the store with the strategy's seeded initial model (version 0),
        checkpoint it and mark the run running."""
        spec = self.spec
        self.store.create_run(
            spec.run_id, config=spec.to_json(), strategy=spec.strategy, model_name=spec.model_name
        )
        weights, prunable, self.architecture_digest = initial_model(
            spec.model, spec.init_seed, spec.prunable
        )
        rng = np.random.default_rng(derive_seed(spec.run_id, "init", spec.seed))
        model = self.strategy.initialize(weights, spec.model_name, prunable, rng)
        self.set(model, mask_changed=True)
        self.checkpoint(round_=None)
        self.store.set_run_status(spec.run_id, "running")

    def restore(self) -> None:
        """Continue from the store: the open round's input model, else the newest checkpoint
        (with the strategy's state saved beside it)."""
        open_round = self.store.find_open_round(self.spec.run_id)
        version = open_round.model_version_in if open_round is not None else None
        checkpoint = self.store.load_checkpoint(self.spec.run_id, version)
        self.architecture_digest = restored_architecture(self.spec, checkpoint.weights)
        model = GlobalModel(
            version=checkpoint.record.version,
            weights=dict(checkpoint.weights),
            masks=dict(checkpoint.masks),
            model_name=self.spec.model_name,
        )
        self.strategy.load_state_dict(dict(checkpoint.extra_state))
        self.mask_version = int(checkpoint.record.meta.get("mask_version", model.version))
        self.set(model, mask_changed=False)
        self.store.set_run_status(self.spec.run_id, "running")

    def set(self, model: GlobalModel, *, mask_changed: bool) -> None:
        """Make ``model`` current; keep the previous one (late updates) and both mask books."""
        current = self._books.get(self.model.version) if self.model is not None else None
        if self.model is not None:
            self.previous = (self.model, self.digest)
        if mask_changed or current is None:
            if mask_changed:
                self.mask_version = model.version
            book = {
                name: KnownMask(version=self.mask_version, mask=mask)
                for name, mask in model.masks.items()
            }
        else:
            book = current  # same masks: reuse the digests instead of hashing them again
        keep = {model.version} | ({self.previous[0].version} if self.previous else set())
        self._books = {v: b for v, b in self._books.items() if v in keep}
        self._books[model.version] = book
        self.model = model
        self.digest = model_digest(model.weights, model.masks)

    def book_for(self, version: int) -> dict[str, KnownMask] | None:
        """The masks a device's update for model ``version`` may refer to (None: unknown)."""
        return self._books.get(version)

    def checkpoint(self, round_: int | None) -> str:
        """Save the current model, the strategy's state and the mask version; ``round_`` is the
        round that produced it (None: the initial model or the initial job's)."""
        assert self.model is not None
        return self.store.save_checkpoint(
            self.spec.run_id,
            self.model.version,
            self.model.weights,
            self.model.masks,
            self.strategy.state_dict(),
            {"mask_version": self.mask_version},
            round=round_,
        )

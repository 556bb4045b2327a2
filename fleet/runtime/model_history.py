"""The recent global model versions an asynchronous update may have trained from.

Buffered asynchronous rounds (``fleet.runtime.async_rounds``) accept updates up to
``max_staleness`` versions old. To judge and map such an update the fleet manager needs the
version it trained from: its weights (the base its delta is added to), its masks (what its
positions may refer to when it sends them implied, the mask book) and its digest (which the
update must name). ``ModelHistory`` keeps the last ``keep`` versions in memory and reloads them
from the checkpoints after a restart; an update naming a version it does not hold is
``unknown_model_version``.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.errors import NotFoundError
from device.wire.codec import KnownMask, model_digest
from fleet.state.store import Store
from fleet.strategies.base import GlobalModel

__all__ = ["HeldModel", "ModelHistory"]


@dataclass(frozen=True, eq=False)
class HeldModel:
    """One version: the model, its digest and its mask book (masks by name, with the version
    of the model that introduced them, as devices cache them)."""

    model: GlobalModel
    digest: bytes
    book: dict[str, KnownMask]


class ModelHistory:
    """The last ``keep`` (>= 1) model versions (module docstring)."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"a model history keeps at least 1 version, got {keep}")
        self.keep = keep
        self._held: dict[int, HeldModel] = {}

    def add(self, model: GlobalModel, digest: bytes, book: dict[str, KnownMask] | None) -> None:
        """Hold ``model`` (its book: None builds one with its own version as mask version),
        forgetting versions older than the newest ``keep``."""
        if book is None:
            book = {n: KnownMask(version=model.version, mask=m) for n, m in model.masks.items()}
        self._held[model.version] = HeldModel(model, digest, book)
        newest = max(self._held)
        self._held = {v: h for v, h in self._held.items() if v > newest - self.keep}

    def get(self, version: int) -> HeldModel | None:
        return self._held.get(version)

    def book_for(self, version: int) -> dict[str, KnownMask] | None:
        """The mask book of ``version`` (``envelope.decode``'s ``book_for``); None: unknown."""
        held = self._held.get(version)
        return None if held is None else held.book

    def load(self, store: Store, run_id: str, newest: int, model_name: str) -> None:
        """Hold the checkpointed versions ``newest - keep + 1 .. newest`` that exist."""
        for version in range(max(0, newest - self.keep + 1), newest + 1):
            try:
                checkpoint = store.load_checkpoint(run_id, version)
            except NotFoundError:
                continue
            model = GlobalModel(
                version, dict(checkpoint.weights), dict(checkpoint.masks), model_name
            )
            mask_version = int(checkpoint.record.meta.get("mask_version", version))
            book = {n: KnownMask(version=mask_version, mask=m) for n, m in model.masks.items()}
            self.add(model, model_digest(model.weights, model.masks), book)

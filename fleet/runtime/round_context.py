"""The open round of a run as validating its updates needs it, read from the store.

Aggregator workers and the coordinator load it from the store alone (the round's record, its
input checkpoint, the run's config), so any process that shares the store judges an update
exactly as the runner does (``fleet.strategies.validate``, ``strategy.check_result``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device.errors import DecodeError, NotFoundError, ValidationError
from device.wire import envelope
from device.wire.codec import KnownMask, model_digest
from device.wire.messages import DeviceUpdate
from fleet.state.store import RoundRecord, Store
from fleet.strategies import create_strategy
from fleet.strategies.accumulate import Accumulator
from fleet.strategies.base import ClientResult, GlobalModel, Strategy
from fleet.strategies.validate import Expectation, check_routing, reconstruct


@dataclass
class RoundContext:
    """What validating an update of one open round needs, read from the store."""

    run_id: str
    round: RoundRecord
    model: GlobalModel
    digest: bytes
    book: dict[str, KnownMask]
    strategy: Strategy
    max_update_bytes: int
    acc: Accumulator = field(init=False)

    def __post_init__(self) -> None:
        self.acc = Accumulator.for_model(self.strategy.name, self.model)

    @classmethod
    def load(cls, store: Store, run_id: str) -> RoundContext | None:
        """The open round of ``run_id`` with its input model, or None when no round is open."""
        record = store.find_open_round(run_id)
        if record is None:
            return None
        config = store.get_run(run_id).config
        checkpoint = store.load_checkpoint(run_id, record.model_version_in)
        model = GlobalModel(
            version=checkpoint.record.version,
            weights=dict(checkpoint.weights),
            masks=dict(checkpoint.masks),
            model_name=str(config["model_name"]),
        )
        strategy = create_strategy(str(config["strategy"]), **dict(config["strategy_options"]))
        strategy.load_state_dict(dict(checkpoint.extra_state))
        mask_version = int(checkpoint.record.meta.get("mask_version", model.version))
        book = {n: KnownMask(version=mask_version, mask=m) for n, m in model.masks.items()}
        return cls(
            run_id,
            record,
            model,
            model_digest(model.weights, model.masks),
            book,
            strategy,
            int(config.get("max_update_bytes", 256 * 1024 * 1024)),
        )

    def book_for(self, version: int) -> dict[str, KnownMask] | None:
        return self.book if version == self.model.version else None

    def routed(
        self, device_id: str, topic_run: str, topic_round: int, payload: bytes
    ) -> DeviceUpdate:
        """Decode an update and check that it belongs to this round and device, as the runner
        does (size limit, envelope, ``check_routing``); ``ValidationError`` says why not."""
        if len(payload) > self.max_update_bytes:
            raise ValidationError(
                f"{len(payload)} bytes exceeds the limit {self.max_update_bytes}",
                reason="oversized",
            )
        try:
            env = envelope.decode(payload, book_for=self.book_for, max_bytes=self.max_update_bytes)
        except DecodeError as exc:
            raise ValidationError(str(exc), reason=f"decode:{exc.reason}") from exc
        exp = Expectation(
            self.run_id, self.round.round, tuple(self.round.selected), self.model, self.digest
        )
        return check_routing(env, device_id, topic_run, topic_round, exp)

    def validate(
        self, device_id: str, topic_run: str, topic_round: int, payload: bytes
    ) -> tuple[DeviceUpdate, ClientResult]:
        """Decode and check an update as the runner does; ``ValidationError`` says why not."""
        update = self.routed(device_id, topic_run, topic_round, payload)
        result = reconstruct(update, self.model, device_id=device_id, model_digest=self.digest)
        self.strategy.check_result(self.model, result)
        return update, result

    def stored_result(self, store: Store, device_id: str) -> ClientResult:
        """A stored update of this round, decoded and validated again (recovery, removal)."""
        row = store.get_update(self.run_id, self.round.round, device_id)
        if row is None:
            raise NotFoundError(f"no stored update of {device_id!r} for round {self.round.round}")
        _, result = self.validate(device_id, self.run_id, self.round.round, row.load_payload())
        return result

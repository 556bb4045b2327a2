"""The dashboard's read-only view of a state directory's store, shared by the server's threads.

Every read goes through the public ``Store`` API, whose reads see committed rows only: a round
is shown open or closed, never half closed (``close_round`` is one transaction). Each call is a
short autocommit read, so the dashboard never holds a read transaction open: SQLite in WAL mode
lets a running run write (and checkpoint) while these reads happen, in this or another process.

Caches, each safe because what it keeps cannot change underneath it:

- the rounds of a run that is not running, keyed by the run's ``(status, current_round,
  updated_at)``: a finished or stopped run's rounds change only when it is resumed, which moves
  that key. A running run's rounds are read afresh every time.
- per-layer densities of a checkpoint, keyed by its SHA-256 digest (content-addressed files
  never change), so a run page loads each checkpoint file once per server, not once per view.
- the answered/late counts per round (``answers``): a finished run's once per ``run_key``; a
  running run's older closed rounds from the last count, its newest ones afresh (late updates
  arrive within a round or two), so a live run page costs a few queries, not one per round.
- each device's ``DeviceInfo``, kept while the store gives the same record object for it
  (``Store.list_devices`` reuses the record of a row that did not change), so listing 1,000
  devices rebuilds only the views of those that changed.

The store is opened lazily: a dashboard started before the first run shows an empty fleet and
picks the store up once ``fleet.db`` exists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from device.errors import NotFoundError
from fleet.ops.registry import DeviceInfo, DeviceRegistry, info_from_record
from fleet.state.devices import DEVICE_TOTALS
from fleet.state.store import (
    DeviceRecord,
    RejectionRecord,
    RoundRecord,
    RoundStatus,
    RunRecord,
    RunStatus,
    Store,
    UpdateRecord,
)

RunKey = tuple[str, int, float]
RECENT_ROUNDS = 3  # closed rounds of a running run whose late updates are still counted afresh
LayerDensity = dict[str, list[tuple[int, float]]]


def run_key(run: RunRecord) -> RunKey:
    """What changes whenever a run's rounds change, except while it runs (see module doc)."""
    return (str(run.status), run.current_round, run.updated_at)


class FleetReader:
    """Reads ``root``'s store for the dashboard; every method is safe from any thread.

    ``open_store`` makes the ``Store`` (tests inject one); it may raise NotFoundError while the
    state directory has no database yet, and every read then answers "nothing yet".
    """

    def __init__(
        self,
        root: Path,
        *,
        open_store: Callable[[Path], Store] | None = None,
    ) -> None:
        self.root = Path(root)
        self._open_store = open_store or (lambda path: Store(path, create=False))
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._rounds: dict[str, tuple[RunKey, tuple[RoundRecord, ...]]] = {}
        self._layers: dict[str, dict[str, float]] = {}
        self._answers: dict[str, tuple[RunKey, dict[int, tuple[int, int]]]] = {}
        self._infos: dict[str, tuple[DeviceRecord, DeviceInfo]] = {}

    # -- the store ----------------------------------------------------------------------------

    def store(self) -> Store | None:
        """The store, or None while ``root`` has no fleet database."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = self._open_store(self.root)
                except NotFoundError:
                    return None
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- runs and rounds ----------------------------------------------------------------------

    def runs(self, status: str | None = None) -> list[RunRecord]:
        """Runs in creation order (only those in ``status`` when given)."""
        store = self.store()
        return [] if store is None else store.list_runs(status=status)

    def run(self, run_id: str) -> RunRecord | None:
        store = self.store()
        if store is None:
            return None
        try:
            return store.get_run(run_id)
        except NotFoundError:
            return None

    def rounds(self, run: RunRecord) -> tuple[RoundRecord, ...]:
        """Every round of ``run`` in round order (cached unless the run is running)."""
        store = self.store()
        if store is None:
            return ()
        key = run_key(run)
        if run.status is not RunStatus.RUNNING:
            with self._lock:
                cached = self._rounds.get(run.run_id)
            if cached is not None and cached[0] == key:
                return cached[1]
        rounds = tuple(store.rounds(run.run_id))
        if run.status is not RunStatus.RUNNING:
            with self._lock:
                self._rounds[run.run_id] = (key, rounds)
        return rounds

    def updates(self, run_id: str, round_: int) -> list[UpdateRecord]:
        """The stored updates of one round, ordered by device id."""
        store = self.store()
        return [] if store is None else store.updates_for_round(run_id, round_)

    def open_round(self, run_id: str) -> RoundRecord | None:
        """The run's open round (one indexed row; cheap enough to poll), or None."""
        store = self.store()
        return None if store is None else store.find_open_round(run_id)

    def answers(self, run: RunRecord) -> dict[int, tuple[int, int]]:
        """``{round: (answered, late)}``: updates stored for each round, split by whether they
        arrived before the round closed (an open round's are all answered).

        Late updates arrive while the run runs, in practice during the next round or two: a
        running run's open round and its ``RECENT_ROUNDS`` newest closed rounds are counted
        afresh on every call, older ones are kept from the last count (one query per recent
        round, not per round of the run). A run that is not running is counted once, and again
        whenever its ``run_key`` moves (the count is then exact).
        """
        key = run_key(run)
        running = run.status is RunStatus.RUNNING
        with self._lock:
            cached = self._answers.get(run.run_id)
        if cached is not None and cached[0] == key and not running:
            return cached[1]
        previous = cached[1] if cached is not None and running else {}
        out: dict[int, tuple[int, int]] = {}
        for r in self.rounds(run):
            settled = r.status is RoundStatus.CLOSED and r.round <= run.current_round - (
                RECENT_ROUNDS + 1
            )
            if settled and r.round in previous:
                out[r.round] = previous[r.round]
                continue
            updates = self.updates(run.run_id, r.round)
            closed_at = r.closed_at
            late = sum(1 for u in updates if closed_at is not None and u.received_at > closed_at)
            out[r.round] = (len(updates) - late, late)
        with self._lock:
            self._answers[run.run_id] = (key, out)
        return out

    def update(self, run_id: str, round_: int, device_id: str) -> UpdateRecord | None:
        store = self.store()
        return None if store is None else store.get_update(run_id, round_, device_id)

    def rejections(
        self, *, run_id: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[RejectionRecord]:
        """Rejected messages, newest first."""
        store = self.store()
        if store is None:
            return []
        return store.rejections(run_id=run_id, device_id=device_id, limit=limit)

    def rejection_counts(self, *, run_id: str | None = None) -> dict[str, int]:
        store = self.store()
        return {} if store is None else store.rejection_counts(run_id=run_id)

    def layer_density(self, run_id: str) -> LayerDensity:
        """``{tensor: [(round, density), ...]}`` from the run's checkpoints' masks (round 0 is
        the model before round 1; the newest checkpoint of each round counts). Empty for a
        dense run. Density is the kept fraction in [0, 1]."""
        store = self.store()
        if store is None:
            return {}
        newest: dict[int, tuple[int, str]] = {}  # round -> (version, digest)
        for record in store.checkpoints(run_id):
            round_ = record.round or 0
            if record.version >= newest.get(round_, (-1, ""))[0]:
                newest[round_] = (record.version, record.digest)
        out: LayerDensity = {}
        for round_, (version, digest) in sorted(newest.items()):
            for name, density in self._densities(store, run_id, version, digest).items():
                out.setdefault(name, []).append((round_, density))
        return out

    def _densities(self, store: Store, run_id: str, version: int, digest: str) -> dict[str, float]:
        with self._lock:
            cached = self._layers.get(digest)
        if cached is not None:
            return cached
        checkpoint = store.load_checkpoint(run_id, version)
        densities = {
            name: float(mask.mean()) if mask.size else 1.0
            for name, mask in sorted(checkpoint.masks.items())
        }
        with self._lock:
            self._layers[digest] = densities
        return densities

    # -- devices ------------------------------------------------------------------------------

    def devices(self) -> list[DeviceInfo]:
        """Every known device ordered by id (tags: reported merged with the operator's).

        The same ``DeviceInfo`` object as last time for a device whose record is the same
        object (unchanged row), so views built from it can be kept too.
        """
        store = self.store()
        if store is None:
            return []
        previous = self._infos
        infos: dict[str, tuple[DeviceRecord, DeviceInfo]] = {}
        out: list[DeviceInfo] = []
        for record in store.list_devices():
            seen = previous.get(record.device_id)
            info = seen[1] if seen is not None and seen[0] is record else info_from_record(record)
            infos[record.device_id] = (record, info)
            out.append(info)
        self._infos = infos  # one assignment: a concurrent call sees the old or the new
        return out

    def device_records(self) -> list[DeviceRecord]:
        """Every device row as stored (cheaper than ``devices``: no tag merge, no profile)."""
        store = self.store()
        return [] if store is None else store.list_devices()

    def device_totals(self) -> dict[str, int]:
        """``Store.device_totals`` (every count 0 while there is no store)."""
        store = self.store()
        if store is None:
            return dict.fromkeys(DEVICE_TOTALS, 0)
        return store.device_totals()

    def device(self, device_id: str) -> DeviceInfo | None:
        store = self.store()
        return None if store is None else DeviceRegistry(store).find(device_id)

    def registry(self) -> DeviceRegistry | None:
        """The registry over this store, for the token-guarded write actions (cordon, ...)."""
        store = self.store()
        return None if store is None else DeviceRegistry(store)

    def all_rounds(self) -> Mapping[str, tuple[RunRecord, tuple[RoundRecord, ...]]]:
        """Every run with its rounds, for views that look across runs (a device's history)."""
        return {run.run_id: (run, self.rounds(run)) for run in self.runs()}

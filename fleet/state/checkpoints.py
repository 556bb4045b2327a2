"""Checkpoints: model versions of a run as deterministic ``.npz`` tensor files plus one row each.

``encode_checkpoint``/``decode_checkpoint`` are pure: equal models give equal bytes, so a model
saved twice is one file. ``save`` writes the file durably before the row commits (files first,
then rows). A version that a round has used (sent to devices, or produced by a closed round) is
immutable; one saved by a runner that died before closing its round may be replaced, because
the restarted runner re-aggregates it.
"""

from __future__ import annotations

import io
import sqlite3
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import DataError, NotFoundError
from fleet.state.columns import dumps, loads
from fleet.state.db import Database
from fleet.state.records import Checkpoint, CheckpointRecord, StoreConflictError
from fleet.state.runs import RunRepository
from fleet.state.tensors import TensorFiles

# A fixed timestamp inside the checkpoint zip makes identical checkpoints byte-identical, so they
# get the same digest and are stored once.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_CKPT_SECTIONS = ("weights", "masks", "extra")


def encode_checkpoint(
    weights: Mapping[str, npt.ArrayLike],
    masks: Mapping[str, npt.ArrayLike],
    extra_state: Mapping[str, npt.ArrayLike] | None = None,
) -> bytes:
    """Serialise a model to deterministic ``.npz`` bytes (``np.load`` reads them).

    Entries are ``weights/<name>``, ``masks/<name>``, ``extra/<name>`` in sorted order with a
    fixed timestamp, so equal inputs give equal bytes (and one stored file). Every mask must be
    boolean and name a weight of the same shape. Object arrays are refused (no pickles on disk).
    Raises ValueError naming the offending entry.
    """
    sections: dict[str, Mapping[str, npt.ArrayLike]] = {
        "weights": weights,
        "masks": masks,
        "extra": extra_state or {},
    }
    arrays: dict[str, npt.NDArray[Any]] = {}
    for section, entries in sections.items():
        for name, value in entries.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"checkpoint {section} key {name!r} must be a non-empty string")
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"checkpoint {section}[{name!r}] has object dtype; not storable")
            arrays[f"{section}/{name}"] = array
    for name in masks:
        mask_array = arrays[f"masks/{name}"]
        if mask_array.dtype != np.bool_:
            raise ValueError(f"checkpoint masks[{name!r}] has dtype {mask_array.dtype}, not bool")
        weight = arrays.get(f"weights/{name}")
        if weight is None:
            raise ValueError(f"checkpoint masks[{name!r}] has no weight of that name")
        if weight.shape != mask_array.shape:
            raise ValueError(
                f"checkpoint masks[{name!r}] has shape {mask_array.shape}, "
                f"weight has {weight.shape}"
            )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
        for key in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, arrays[key], allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            # Level 1: sparse weights are mostly zeros, so even fast deflate shrinks them a lot.
            zf.writestr(info, entry.getvalue(), zipfile.ZIP_DEFLATED, compresslevel=1)
    return out.getvalue()


def decode_checkpoint(
    data: bytes,
) -> tuple[
    dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[np.bool_]], dict[str, npt.NDArray[Any]]
]:
    """Inverse of ``encode_checkpoint``: (weights, masks, extra_state). DataError if malformed."""
    weights: dict[str, npt.NDArray[Any]] = {}
    masks: dict[str, npt.NDArray[np.bool_]] = {}
    extra: dict[str, npt.NDArray[Any]] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                section, _, name = key.partition("/")
                if section not in _CKPT_SECTIONS or not name:
                    raise DataError(f"checkpoint entry {key!r} is not weights/, masks/ or extra/")
                array = npz[key]
                if section == "weights":
                    weights[name] = array
                elif section == "masks":
                    masks[name] = array
                else:
                    extra[name] = array
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"checkpoint is not a readable .npz: {exc}") from exc
    return weights, masks, extra


class CheckpointRepository:
    """The ``checkpoints`` table and its files. ``clock`` gives Unix seconds (``created_at``)."""

    def __init__(
        self, db: Database, files: TensorFiles, runs: RunRepository, clock: Callable[[], float]
    ) -> None:
        self._db = db
        self._files = files
        self._runs = runs
        self._clock = clock

    def save(
        self,
        run_id: str,
        version: int,
        weights: Mapping[str, npt.ArrayLike],
        masks: Mapping[str, npt.ArrayLike],
        extra_state: Mapping[str, npt.ArrayLike] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        round: int | None = None,
    ) -> str:
        """Store model version ``version`` of a run; returns the file's SHA-256 hex digest.

        The file (deterministic .npz, see ``encode_checkpoint``) is durable before the row
        commits. Saving the same version again with the same content is a no-op; with different
        content it replaces the row only while no round has used that version (a runner that
        died between aggregating and closing the round re-aggregates); otherwise
        StoreConflictError, because a version that devices or a closed round saw is immutable.
        """
        if version < 0:
            raise ValueError(f"checkpoint version must be >= 0, got {version}")
        data = encode_checkpoint(weights, masks, extra_state)
        meta_json = dumps(meta or {}, f"meta of checkpoint {version}")
        digest = self._files.write(data)
        now = self._clock()
        with self._db.write() as conn:
            self._runs.fetch(conn, run_id)
            row = conn.execute(
                "SELECT digest FROM checkpoints WHERE run_id = ? AND version = ?",
                (run_id, version),
            ).fetchone()
            if row is not None and row["digest"] == digest:
                return digest
            if row is not None:
                used = conn.execute(
                    "SELECT round FROM rounds WHERE run_id = ? AND (model_version_in = ?"
                    " OR (status = 'closed' AND model_version_out = ?)) LIMIT 1",
                    (run_id, version, version),
                ).fetchone()
                if used is not None:
                    raise StoreConflictError(
                        f"checkpoint version {version} of run {run_id!r} is used by round "
                        f"{used['round']} and cannot change"
                    )
            conn.execute(
                "INSERT INTO checkpoints (run_id, version, round, digest, size_bytes, meta,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, version) DO UPDATE SET round = excluded.round,"
                " digest = excluded.digest, size_bytes = excluded.size_bytes,"
                " meta = excluded.meta, created_at = excluded.created_at",
                (run_id, version, round, digest, len(data), meta_json, now),
            )
        return digest

    def load(self, run_id: str, version: int | None = None) -> Checkpoint:
        """Load a checkpoint (``version`` None: the highest saved). The file is verified against
        its digest (DataError); NotFoundError if there is none."""
        record = self.record(run_id, version)
        weights, masks, extra = decode_checkpoint(self._files.read(record.digest))
        return Checkpoint(record=record, weights=weights, masks=masks, extra_state=extra)

    def record(self, run_id: str, version: int | None = None) -> CheckpointRecord:
        """The row of a checkpoint (``version`` None: the highest saved); NotFoundError if none."""
        conn = self._db.conn()
        if version is None:
            row = conn.execute(
                "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY version DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT * FROM checkpoints WHERE run_id = ? AND version = ?", (run_id, version)
            ).fetchone()
        if row is None:
            which = "checkpoint" if version is None else f"checkpoint version {version}"
            raise NotFoundError(f"run {run_id!r} has no {which}")
        return _checkpoint_from_row(row)

    def list_checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        """Every checkpoint row of the run in version order."""
        rows = (
            self._db.conn()
            .execute("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY version", (run_id,))
            .fetchall()
        )
        return [_checkpoint_from_row(r) for r in rows]

    @staticmethod
    def require(conn: sqlite3.Connection, run_id: str, version: int) -> str:
        """Inside the caller's transaction: the digest of model ``version``; NotFoundError if it
        was never saved (a round must always be able to reload its input model)."""
        row = conn.execute(
            "SELECT digest FROM checkpoints WHERE run_id = ? AND version = ?", (run_id, version)
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"run {run_id!r} has no checkpoint of model version {version}; save it first"
            )
        return str(row["digest"])


def _checkpoint_from_row(row: sqlite3.Row) -> CheckpointRecord:
    return CheckpointRecord(
        run_id=row["run_id"],
        version=row["version"],
        round=row["round"],
        digest=row["digest"],
        size_bytes=row["size_bytes"],
        meta=loads(row["meta"]),
        created_at=row["created_at"],
    )

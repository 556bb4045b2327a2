"""A device's deployed models on disk: the active version, the versions kept for a rollback,
and the switch between them.

Layout of the models directory (``deploy.models_dir`` in the device config)::

    state.json                    which version is active, the ones before it, the last
                                  deployment notice applied and the one being installed
    versions/<version>.sfm        artefact files, exactly as exported and verified
    versions/<version>.plan.json  the inference kernel plan measured for this device (a cache)
    usage/<pid>.json              predictions counted by each process that served a version

Invariants, whatever moment the process dies at:

- **Files first, then the switch.** An artefact is written to a temporary file, fsynced and
  renamed into ``versions/`` (then the directory fsynced) before ``state.json`` names it; the
  switch itself is the atomic rename of a new ``state.json``. A reader (the agent, or the
  user's application through ``device.inference.load``) sees the old version or the new one,
  never a mix; a crash leaves the previous version active.
- **The previous versions stay.** Activating keeps the ``keep`` most recent versions (the
  active one included) and deletes only older files that no state names.
- **A version label names one artefact.** Writing a different file under an existing label is
  refused (``ModelStoreError``): a rollback must get back exactly what ran before.

Times are Unix seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from device.errors import NotFoundError, SparseFleetError
from device.wire.artefact import version_label

__all__ = [
    "ActiveModel",
    "LastEvent",
    "ModelStore",
    "ModelStoreError",
    "Pending",
    "StoreState",
    "usage_key",
]

STATE_FILE = "state.json"
VERSIONS_DIR = "versions"
USAGE_DIR = "usage"
ARTEFACT_SUFFIX = ".sfm"
DEFAULT_KEEP = 3


class ModelStoreError(SparseFleetError):
    """The models directory cannot do what was asked (an unknown version, a label reused for
    another artefact, nothing to roll back to)."""


@dataclass(frozen=True)
class ActiveModel:
    """The version being served: its label, the SHA-256 (hex) of its artefact file, the
    deployment that installed it ("" when activated locally) and since when."""

    version: str
    sha256: str
    deployment_id: str = ""
    since_unix_s: float = 0.0


@dataclass(frozen=True)
class Pending:
    """A deployment accepted but not yet active (kept across restarts, so an interrupted
    download resumes): its id, notice sequence, version and artefact SHA-256 (hex)."""

    deployment_id: str
    sequence: int
    version: str
    sha256: str
    attempts: int = 0


@dataclass(frozen=True)
class LastEvent:
    """The newest deployment event this device reported (``state``: a ``DeployState`` value),
    kept so that its status tells the fleet even after a restart."""

    deployment_id: str
    state: str
    version: str
    reason: str = ""
    at_unix_s: float = 0.0


@dataclass(frozen=True)
class StoreState:
    """``state.json``: the active model, the versions before it (newest first, for a rollback),
    the highest deployment notice sequence applied, the pending deployment and the last event."""

    active: ActiveModel | None = None
    history: tuple[ActiveModel, ...] = ()
    last_sequence: int = 0
    pending: Pending | None = None
    last_event: LastEvent | None = None

    @property
    def previous(self) -> ActiveModel | None:
        return self.history[0] if self.history else None

    def to_json(self) -> dict[str, Any]:
        return {
            "active": None if self.active is None else asdict(self.active),
            "history": [asdict(h) for h in self.history],
            "last_sequence": self.last_sequence,
            "pending": None if self.pending is None else asdict(self.pending),
            "last_event": None if self.last_event is None else asdict(self.last_event),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreState:
        active = data.get("active")
        pending = data.get("pending")
        last = data.get("last_event")
        return cls(
            active=None if active is None else ActiveModel(**active),
            history=tuple(ActiveModel(**h) for h in data.get("history", ())),
            last_sequence=int(data.get("last_sequence", 0)),
            pending=None if pending is None else Pending(**pending),
            last_event=None if last is None else LastEvent(**last),
        )


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename over ``path``, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ModelStore:
    """The models directory at ``root`` (created on first write). ``keep`` >= 2 versions stay
    on disk (the active one and at least one to roll back to). One writer at a time (the
    agent); any number of readers."""

    def __init__(self, root: Path | str, *, keep: int = DEFAULT_KEEP) -> None:
        if keep < 2:
            raise ValueError(f"keep must be at least 2 (active and previous), got {keep}")
        self.root = Path(root)
        self.keep = keep

    # -- reading -------------------------------------------------------------------------------

    def state(self) -> StoreState:
        """The current state (empty when nothing was ever installed)."""
        path = self.root / STATE_FILE
        try:
            return StoreState.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError, TypeError) as exc:
            raise ModelStoreError(f"{path} is unreadable: {exc}") from None

    def artefact_path(self, version: str) -> Path:
        return self.root / VERSIONS_DIR / f"{version_label(version)}{ARTEFACT_SUFFIX}"

    def plan_path(self, version: str) -> Path:
        return self.root / VERSIONS_DIR / f"{version_label(version)}.plan.json"

    def has(self, version: str, sha256_hex: str) -> bool:
        """Whether ``version`` is on disk with exactly this artefact SHA-256."""
        path = self.artefact_path(version)
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == sha256_hex
        except OSError:
            return False

    def read(self, version: str) -> bytes:
        """The artefact file of ``version``; ``NotFoundError`` when it is not on disk."""
        try:
            return self.artefact_path(version).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"model version {version!r} is not in {self.root / VERSIONS_DIR}"
            ) from None

    def versions(self) -> list[str]:
        """Version labels on disk, sorted."""
        directory = self.root / VERSIONS_DIR
        if not directory.is_dir():
            return []
        return sorted(
            p.name[: -len(ARTEFACT_SUFFIX)]
            for p in directory.iterdir()
            if p.name.endswith(ARTEFACT_SUFFIX)
        )

    # -- writing -------------------------------------------------------------------------------

    def write(self, version: str, data: bytes) -> Path:
        """Store an artefact file under ``version`` durably (before anything names it).

        Writing the same bytes again is a no-op; other bytes under an existing label raise
        ``ModelStoreError``."""
        path = self.artefact_path(version)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if path.read_bytes() == data:
                return path
            raise ModelStoreError(
                f"model version {version!r} already exists with another artefact; "
                "export with a new version label"
            )
        _write_atomic(path, data)
        return path

    def write_plan(self, version: str, plan: Mapping[str, Any]) -> None:
        path = self.plan_path(version)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(dict(plan), sort_keys=True).encode())

    def read_plan(self, version: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.plan_path(version).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_state(self, state: StoreState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())

    def activate(
        self,
        version: str,
        sha256_hex: str,
        *,
        deployment_id: str = "",
        sequence: int | None = None,
        now: float | None = None,
    ) -> StoreState:
        """Switch to ``version`` (which must be on disk with this SHA-256) atomically.

        The version active before goes to the front of the history; the pending deployment is
        cleared when it is this one; ``sequence`` (a notice's) raises ``last_sequence``. Old
        files beyond ``keep`` versions are deleted after the switch."""
        if not self.has(version, sha256_hex):
            raise ModelStoreError(f"model version {version!r} is not on disk with that digest")
        state = self.state()
        active = ActiveModel(
            version, sha256_hex, deployment_id, time.time() if now is None else now
        )
        history = [h for h in (state.active, *state.history) if h is not None]
        history = [h for h in history if h.version != version][: self.keep - 1]
        pending = state.pending
        if pending is not None and pending.version == version:
            pending = None
        new = StoreState(
            active=active,
            history=tuple(history),
            last_sequence=max(state.last_sequence, sequence or 0),
            pending=pending,
            last_event=state.last_event,
        )
        self.save_state(new)
        self._prune(new)
        return new

    def rollback_target(self, to: str | None = None) -> ActiveModel:
        """The kept version a rollback switches to: ``to``, or the one active before.

        ``ModelStoreError`` when there is none (nothing was active before, or ``to`` is not
        kept)."""
        state = self.state()
        if to is None:
            if state.previous is None:
                active = state.active.version if state.active else "none"
                raise ModelStoreError(
                    f"no earlier model version to roll back to (active: {active})"
                )
            return state.previous
        for entry in (state.active, *state.history):
            if entry is not None and entry.version == to:
                return entry
        kept = ", ".join(h.version for h in state.history) or "none"
        raise ModelStoreError(f"model version {to!r} is not kept here (kept: {kept})")

    def update(self, **changes: Any) -> StoreState:
        """Replace fields of the state (``pending``, ``last_sequence``) durably."""
        state = replace(self.state(), **changes)
        self.save_state(state)
        return state

    def _prune(self, state: StoreState) -> None:
        named = {h.version for h in (state.active, *state.history) if h is not None}
        if state.pending is not None:
            named.add(state.pending.version)
        for version in self.versions():
            if version not in named:
                for path in (self.artefact_path(version), self.plan_path(version)):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    # -- usage counters --------------------------------------------------------------------------

    def record_usage(self, process: str, usage: Mapping[str, tuple[int, int]]) -> None:
        """Persist one process's counters (``process``: a name unique to it, e.g. pid and start
        time): activation key (``usage_key``) -> (predicted examples, errors)."""
        directory = self.root / USAGE_DIR
        directory.mkdir(parents=True, exist_ok=True)
        payload = {k: {"inferences": n, "errors": e} for k, (n, e) in usage.items()}
        _write_atomic(directory / f"{process}.json", json.dumps(payload, sort_keys=True).encode())

    def usage(self, active: ActiveModel) -> tuple[int, int]:
        """(predicted examples, errors) of this activation, summed over every process."""
        key = usage_key(active)
        inferences = errors = 0
        for data in self._usage_files():
            entry = data.get(key)
            if isinstance(entry, dict):
                inferences += int(entry.get("inferences", 0))
                errors += int(entry.get("errors", 0))
        return inferences, errors

    def _usage_files(self) -> Iterator[dict[str, Any]]:
        directory = self.root / USAGE_DIR
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                yield data


def usage_key(active: ActiveModel) -> str:
    """Counters are kept per activation (a version activated again counts anew)."""
    return f"{active.version}@{active.since_unix_s:.6f}"

"""The arm64 check's cache: one directory per stage, each trusted only with its completion marker.

A stage (the Debian root, the downloaded wheels, the device virtualenv, the test tools) is built
into its own directory under the cache root, and the marker file is written into that directory
*last*, holding the stage's key (what it was built from, as JSON). A directory without a marker
was interrupted half-way (a killed build, a full disk) and one with another key was built from
other inputs (a new pin); either is removed whole and built again, never patched.

The cache root is ``$SPARSEFLEET_ARM64_CACHE``, else ``~/.cache/sparsefleet-arm64``: outside the
repository, so that neither git nor the device machine's copy of the tree carries it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV", "MARKER", "Stage", "cache_root"]

CACHE_ENV = "SPARSEFLEET_ARM64_CACHE"
#: The completion marker's file name inside each stage directory.
MARKER = ".sparsefleet-complete"


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """``$SPARSEFLEET_ARM64_CACHE`` if set, else ``~/.cache/sparsefleet-arm64`` (absolute)."""
    configured = environ.get(CACHE_ENV, "").strip()
    root = Path(configured) if configured else Path.home() / ".cache" / "sparsefleet-arm64"
    return root.expanduser().resolve()


@dataclass(frozen=True)
class Stage:
    """One cached build product: ``path`` and its completion marker ``path / MARKER``.

    ``key`` is any JSON-serialisable description of the inputs; a stage is complete only when
    its marker holds exactly this key.
    """

    path: Path
    key: Mapping[str, Any]

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def _key_text(self) -> str:
        return json.dumps(self.key, sort_keys=True)

    def is_complete(self) -> bool:
        """True when the marker exists and holds this stage's key (the build finished)."""
        try:
            return self.marker.read_text(encoding="utf-8") == self._key_text()
        except (FileNotFoundError, NotADirectoryError):
            return False

    def state(self) -> str:
        """``"complete"``, ``"missing"`` (no directory), ``"half-built"`` (no marker: an
        interrupted build) or ``"stale"`` (a marker with another key)."""
        if self.is_complete():
            return "complete"
        if not self.path.exists():
            return "missing"
        return "stale" if self.marker.is_file() else "half-built"

    def reset(self) -> None:
        """Remove whatever is there and create the empty directory, ready to be built into."""
        if self.path.is_symlink() or self.path.is_file():
            self.path.unlink()
        elif self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def mark_complete(self) -> None:
        """Write the marker: call only after every file of the stage is in place."""
        tmp = self.marker.with_name(MARKER + ".tmp")
        tmp.write_text(self._key_text(), encoding="utf-8")
        os.replace(tmp, self.marker)

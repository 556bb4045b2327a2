"""A directory tree's file list, re-read cheaply: a directory is listed again only when its
modification time (or inode) changed since its last listing.

Adding, removing or renaming a file changes its directory's mtime, so re-scanning a tree of
50,000 files in which nothing was added costs one ``stat`` per directory. A file rewritten in
place does not change its directory; loaders decode files when they are used, so new content is
read anyway.

Racy mtimes: a listing made within :data:`RACY_NS` of the directory's mtime is not trusted, as
a file created in the same clock tick (coarse file system timestamps: 1 s on ext3, 2 s on FAT)
would leave the mtime unchanged; such a directory is listed again at the next scan (the rule
git uses for its index).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RACY_NS", "DirectoryCache", "Listing", "TreeScan"]

#: A directory whose mtime is this close to the moment it was listed is listed again next time.
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Listing:
    """One directory's matching files: ``rel_dir`` (POSIX, ``""`` for the root) and ``files``
    (paths relative to the root, POSIX, sorted by name)."""

    rel_dir: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class TreeScan:
    """What one scan found, in a fixed order (directories depth first, names sorted), and the
    work it took: ``listed`` directories read with ``scandir``, ``reused`` directories whose
    cached listing was kept (their mtime unchanged)."""

    listings: tuple[Listing, ...]
    listed: int
    reused: int

    @property
    def num_files(self) -> int:
        return sum(len(listing.files) for listing in self.listings)


@dataclass(frozen=True)
class _Entry:
    key: tuple[int, int, int]  # (st_dev, st_ino, st_mtime_ns)
    trusted: bool  # listed long enough after its mtime (see RACY_NS)
    files: tuple[str, ...]
    subdirs: tuple[str, ...]


class DirectoryCache:
    """The files under ``root`` whose names end in one of ``suffixes`` (case-insensitive),
    recursively; hidden files and directories (a leading ``.``) are skipped. Symbolic links
    to directories are not followed (a link cycle cannot make a scan endless).

    Not thread-safe: one scan at a time.
    """

    def __init__(self, root: Path, suffixes: tuple[str, ...]) -> None:
        self.root = root
        self._suffixes = tuple(s.lower() for s in suffixes)
        self._entries: dict[str, _Entry] = {}

    def scan(self) -> TreeScan:
        """List the tree, reusing every directory whose mtime is unchanged and trusted.

        A directory that vanished during the scan is treated as empty. Raises ``OSError`` when
        the root itself cannot be read (the caller names the setting).
        """
        started_ns = time.time_ns()
        entries: dict[str, _Entry] = {}
        listings: list[Listing] = []
        listed = reused = 0
        stack = [""]
        while stack:
            rel = stack.pop()
            full = os.path.join(self.root, rel) if rel else os.fspath(self.root)
            try:
                st = os.stat(full)
            except (FileNotFoundError, NotADirectoryError):
                if not rel:
                    raise
                continue
            key = (st.st_dev, st.st_ino, st.st_mtime_ns)
            entry = self._entries.get(rel)
            if entry is not None and entry.trusted and entry.key == key:
                reused += 1
            else:
                try:
                    entry = self._list(rel, full, key, started_ns)
                except (FileNotFoundError, NotADirectoryError):
                    if not rel:
                        raise
                    continue
                listed += 1
            entries[rel] = entry
            if entry.files:
                listings.append(Listing(rel, entry.files))
            # Reversed onto the stack so that directories come out in sorted order.
            stack.extend(reversed([f"{rel}/{d}" if rel else d for d in entry.subdirs]))
        self._entries = entries
        return TreeScan(tuple(listings), listed, reused)

    def _list(self, rel: str, full: str, key: tuple[int, int, int], started_ns: int) -> _Entry:
        files: list[str] = []
        subdirs: list[str] = []
        with os.scandir(full) as it:
            for item in it:
                name = item.name
                if name.startswith("."):
                    continue
                if item.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                elif name.lower().endswith(self._suffixes) and item.is_file():
                    files.append(name)
        prefix = f"{rel}/" if rel else ""
        return _Entry(
            key=key,
            trusted=started_ns - key[2] > RACY_NS,
            files=tuple(prefix + name for name in sorted(files)),
            subdirs=tuple(sorted(subdirs)),
        )

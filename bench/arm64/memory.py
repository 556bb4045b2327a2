"""Resident memory of a device process, and of an emulated one without its emulator.

Under qemu-user one host process holds both the emulated program (the *guest*: its heap, its
libraries, its tensors) and the emulator (translated code, qemu's own heap and threads). The
host's ``VmHWM`` (peak resident set) counts both. The split used here: qemu answers the guest's
``/proc/self/maps`` with the guest's mappings only, while the host's ``/proc/PID/smaps`` lists
every mapping of the process with its resident kB. So a mapping of the host process that overlaps
one of the guest's is guest memory; every other one is the emulator's.

The probed agent (``probed_agent.py``) writes its ``/proc/self/maps`` to a pipe a few times a
second; on each frame :class:`ProbeReader` reads the host's smaps of the process at once and
records a :class:`Sample` (total, guest and emulator kB). Natively the maps are the process's
own, so the emulator share is 0 and the method measures the same thing on both sides: that is
how it is checked (the same job natively on x86 and under qemu-x86_64).

Units: kB (1024 bytes) as the kernel reports them; :func:`mb` converts to MB (2**20 bytes).
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = [
    "MemorySummary",
    "ProbeReader",
    "Sample",
    "breakdown",
    "guest_ranges",
    "mb",
    "read_status_kb",
    "smaps_rows",
    "split_rss",
]

_RANGE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)


def mb(kb: float) -> float:
    """kB (1024 bytes) -> MB (2**20 bytes)."""
    return kb / 1024.0


def read_status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``: peak resident, ``VmRSS``: current)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field_name}")


def guest_ranges(maps: bytes) -> list[tuple[int, int]]:
    """``[(start, end)]`` of a ``/proc/*/maps`` text, sorted by start."""
    return sorted((int(m.group(1), 16), int(m.group(2), 16)) for m in _RANGE.finditer(maps))


def smaps_rows(smaps: bytes) -> list[tuple[int, int, int, int]]:
    """``[(start, end, rss_kb, anonymous_kb)]`` of a ``/proc/*/smaps`` text, one per mapping.

    ``anonymous_kb`` is the part no file backs (heap, tensors): what the kernel cannot drop
    under memory pressure without swap, unlike clean pages of mapped libraries."""
    rows: list[tuple[int, int, int, int]] = []
    current: tuple[int, int] | None = None
    rss = 0
    for line in smaps.splitlines():
        header = _RANGE.match(line + b" ")
        if header and b":" not in line.split(b" ", 1)[0]:
            current = (int(header.group(1), 16), int(header.group(2), 16))
        elif line.startswith(b"Rss:"):
            rss = int(line.split()[1])
        elif line.startswith(b"Anonymous:") and current is not None:
            rows.append((*current, rss, int(line.split()[1])))
            current = None
    return rows


def split_rss(
    rows: Sequence[tuple[int, int, int, int]], guest: Sequence[tuple[int, int]]
) -> tuple[int, int, int]:
    """``(guest_kb, emulator_kb, guest_anonymous_kb)``: resident kB of the host mappings that
    overlap a guest mapping, of all others, and the anonymous part of the first. ``guest`` must
    be sorted by start (:func:`guest_ranges`)."""
    guest_kb = emulator_kb = guest_anon_kb = 0
    starts = [start for start, _ in guest]
    for start, end, rss, anon in rows:
        # The guest range starting last before `end` is the only candidate: the ranges are
        # disjoint and sorted, so if it ends before `start`, every earlier one does too.
        i = bisect.bisect_left(starts, end) - 1
        if i >= 0 and guest[i][1] > start:
            guest_kb += rss
            guest_anon_kb += anon
        else:
            emulator_kb += rss
    return guest_kb, emulator_kb, guest_anon_kb


def _category(name: bytes, start: int) -> str:
    """Where a mapping's memory belongs, for the breakdown at the peak."""
    path = name.decode(errors="replace")
    if "/torch/lib/" in path or "/torch.libs/" in path:
        return "torch libraries"
    if "/numpy" in path:
        return "numpy libraries"
    if path == "[heap]" or (not path and start < 2**32):
        # Natively the heap is labelled; under qemu the guest's brk area is the unlabelled
        # anonymous mapping right after the (non-PIE) interpreter, low in the address space.
        return "heap (brk: Python objects, small allocations)"
    if not path:
        return "anonymous mmap (tensors, large buffers, thread stacks)"
    if path.startswith("["):
        return "other"
    return "other files (python, libc, extensions)"


def breakdown(smaps: bytes, guest: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Resident kB of the guest's mappings by :func:`_category`."""
    starts = [start for start, _ in guest]
    totals: dict[str, int] = {}
    start = end = 0
    name = b""
    for line in smaps.splitlines():
        header = _RANGE.match(line + b" ")
        if header and b":" not in line.split(b" ", 1)[0]:
            start, end = int(header.group(1), 16), int(header.group(2), 16)
            fields = line.split(None, 5)
            name = fields[5].strip() if len(fields) > 5 else b""
        elif line.startswith(b"Rss:"):
            i = bisect.bisect_left(starts, end) - 1
            if i >= 0 and guest[i][1] > start:
                category = _category(name, start)
                totals[category] = totals.get(category, 0) + int(line.split()[1])
    return totals


@dataclass(frozen=True)
class Sample:
    """One instant: seconds since the reader started, and resident kB in all / guest / emulator,
    and the guest's anonymous resident kB."""

    t_s: float
    total_kb: int
    guest_kb: int
    emulator_kb: int
    guest_anon_kb: int = 0


@dataclass(frozen=True)
class MemorySummary:
    """What a job's samples say, next to the process's own peak (``VmHWM``, kB).

    ``guest_peak_kb`` is the corrected peak: the larger of the highest sampled guest resident
    set and ``hwm_kb - emulator_end_kb`` (the emulator only grows, so at the moment of the true
    peak it held at most what it holds at the end). Both are lower bounds of the true guest
    peak; the second catches peaks between samples. Natively ``emulator_*`` are 0 and
    ``guest_peak_kb == hwm_kb``.
    """

    hwm_kb: int
    samples: int
    sampled_peak_kb: int
    guest_sampled_peak_kb: int
    emulator_start_kb: int
    emulator_end_kb: int
    guest_anon_sampled_peak_kb: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def guest_peak_kb(self) -> int:
        return max(self.guest_sampled_peak_kb, self.hwm_kb - self.emulator_end_kb)


@dataclass
class ProbeReader:
    """Reads maps frames of ``pid`` from ``fd`` in a thread and samples the host's smaps.

    A frame is ``b"MAPS <n>\\n"`` followed by ``n`` bytes of ``/proc/self/maps`` text.
    """

    pid: int
    fd: int
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _frozen: bool = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="probe-reader", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        """Keep no further samples: the job is over (what the process does while it shuts down
        is not the job's; the frames are still read, so the writer never blocks)."""
        self._frozen = True

    @staticmethod
    def _read_exact(stream: BinaryIO, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = stream.read(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _run(self) -> None:
        start = time.monotonic()
        with os.fdopen(self.fd, "rb", buffering=0) as stream:
            while True:
                try:
                    header = stream.readline()
                    if not header:
                        return
                    _, size = header.split()
                    maps = self._read_exact(stream, int(size))
                    if self._frozen:
                        continue
                    with open(f"/proc/{self.pid}/smaps", "rb") as smaps_file:
                        smaps = smaps_file.read()
                    rows = smaps_rows(smaps)
                except (EOFError, FileNotFoundError, ProcessLookupError):
                    return
                except (OSError, ValueError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                ranges = guest_ranges(maps)
                guest, emulator, anon = split_rss(rows, ranges)
                if not self.samples or guest > max(s.guest_kb for s in self.samples):
                    self.peak_breakdown = breakdown(smaps, ranges)
                total = sum(row[2] for row in rows)
                at = time.monotonic() - start
                self.samples.append(Sample(at, total, guest, emulator, anon))

    def join(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def summary(self, hwm_kb: int) -> MemorySummary:
        samples = self.samples or [Sample(0.0, 0, 0, 0)]
        return MemorySummary(
            hwm_kb=hwm_kb,
            samples=len(self.samples),
            sampled_peak_kb=max(s.total_kb for s in samples),
            guest_sampled_peak_kb=max(s.guest_kb for s in samples),
            emulator_start_kb=samples[0].emulator_kb,
            emulator_end_kb=samples[-1].emulator_kb,
            guest_anon_sampled_peak_kb=max(s.guest_anon_kb for s in samples),
            peak_breakdown=dict(self.peak_breakdown),
        )

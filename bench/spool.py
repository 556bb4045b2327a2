"""Decoding a device's data into memory vs into a spooled file (``data.in_memory_mb``).

An npz of ``--examples`` uint8 RGB images of ``--size`` pixels (default 20,000 x 3 x 64 x 64:
246 MB on disk, 983 MB of float32 once decoded) is read by
:class:`device.local_data.LocalData` twice, each in its own worker process: with the side held
in memory (``in_memory_mb`` above its size) and spooled to a file (``in_memory_mb: 64``). Each
worker decodes the training side, then reads one epoch of random minibatches of 32 (what the
trainer's ``x[indices]`` does), and reports the time of both and its memory from
/proc/self/status: ``VmHWM`` (peak resident, file pages included), and the anonymous resident
set after the decode and after the epoch (``RssAnon``: what the kernel cannot drop under
memory pressure; a spooled side's pages are file-backed and clean once written, so they can).

    python bench/spool.py [--examples 20000] [--size 64] [--json PATH]

Exits non-zero if a worker fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = tuple(f"c{i}" for i in range(10))
MODES = {"memory": 1e9, "spool": 64.0}


def status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(mode: str, data: Path, spool_dir: Path) -> dict[str, Any]:
    import torch

    from device.data import LocalDataSpec
    from device.local_data import LocalData

    torch.set_num_threads(1)
    spec = LocalDataSpec(
        format="npz",
        path=data,
        classes=CLASSES,
        eval_fraction=0.0,
        in_memory_mb=MODES[mode],
        spool_dir=spool_dir,
    )
    source = LocalData(spec)
    source.refresh()
    start = time.perf_counter()
    train = source.train()
    decoded = time.perf_counter()
    anon_after_decode = status_mb("RssAnon")
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))
    total = 0.0
    for first in range(0, len(order), 32):
        batch = order[first : first + 32]
        total += float(train.x[batch].sum())
    epoch = time.perf_counter()
    return {
        "mode": mode,
        "decoded_mb": train.x.numel() * 4 / 2**20,
        "decode_s": decoded - start,
        "epoch_s": epoch - decoded,
        "peak_mb": status_mb("VmHWM"),
        "anon_after_decode_mb": anon_after_decode,
        "anon_after_epoch_mb": status_mb("RssAnon"),
        "checksum": total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spool-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.spool_dir)))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=Path.cwd()) as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(args.examples, 3, args.size, args.size), dtype=np.uint8)
        np.savez(data / "images.npz", x=x, y=rng.integers(0, len(CLASSES), args.examples))
        del x
        for mode in MODES:
            command = [sys.executable, __file__, "--worker", mode, "--data", str(data)]
            done = subprocess.run(
                [*command, "--spool-dir", tmp],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(f"worker {mode} failed ({done.returncode}):\n{done.stderr}", file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if results[0]["checksum"] != results[1]["checksum"]:
        print("the two modes read different examples", file=sys.stderr)
        return 1
    memory, spool = results
    print(f"{args.examples} examples of 3x{args.size}x{args.size}: {memory['decoded_mb']:.0f} MiB")
    print(
        "| mode | decode s | epoch s | peak RSS MB | anon. after decode MB | anon. after epoch MB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['decode_s']:.2f} | {r['epoch_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['anon_after_decode_mb']:.0f} | {r['anon_after_epoch_mb']:.0f} |"
        )
    print(
        f"spool / memory: decode {spool['decode_s'] / memory['decode_s']:.2f}x, epoch "
        f"{spool['epoch_s'] / memory['epoch_s']:.2f}x, anonymous memory after the epoch "
        f"{spool['anon_after_epoch_mb'] / memory['anon_after_epoch_mb']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

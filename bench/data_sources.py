"""Device-local data benchmark: re-scan time of a large image folder, and loader throughput.

1. Re-scan: an image folder of ``--files`` files (default 50,000, in 10 class directories;
   empty files, since a scan lists and never decodes) whose directories were last changed a
   minute ago. Times :meth:`LocalSource.scan` (listing, labels, split, counts) for the first
   scan, for re-scans with nothing new (median), and for a re-scan after 10 new files landed
   in one class. Target (issue 17): a re-scan with nothing new <= 0.5 s.
2. Throughput: examples/s of each loader next to a plain numpy/PIL/csv baseline doing the
   same reading and decoding in the same worker, interleaved, median of ``--reps``. "first
   job": open the source, scan (listing or parsing, identities, the split's hashing) and
   ``train().to_dataset()`` (``eval_fraction: 0``, every example); "later job": re-scan of
   unchanged data and ``to_dataset()`` on a source scanned before (what every job after the
   first costs a device). Data: imagefolder (2,000 28x28 greyscale PNGs, normalised), csv rows
   and csv windows (100,000 rows of 6 features, windows of 50 rows, stride 25), npz (50,000
   uint8 1x28x28 images, memory-mapped, to float32), python (a user's TensorDataset of 20,000
   examples, stacked).

Each measurement runs in a worker process (``--worker NAME``); the script prints a table and
exits non-zero if any worker fails.

    python bench/data_sources.py [--files 50000] [--reps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device.data import LocalDataSpec, open_source

CLASSES = tuple(f"c{i}" for i in range(10))
RESCAN_TARGET_S = 0.5
IMAGES, CSV_ROWS, WINDOW, STRIDE, NPZ_ROWS, PY_ITEMS = 2000, 100_000, 50, 25, 50_000, 20_000
MEAN, STD = 0.1307, 0.3081


def _age(root: Path) -> None:
    past = time.time() - 60
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def _medians(fns: list[Callable[[], int]], reps: int) -> tuple[list[float], int]:
    """Median seconds of each function, run interleaved (a load change hits all alike), and
    the example count (all must return the same one)."""
    times: list[list[float]] = [[] for _ in fns]
    counts = set()
    for _ in range(reps):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            counts.add(fn())
            times[i].append(time.perf_counter() - started)
    if len(counts) != 1:
        raise RuntimeError(f"the loader and the baseline disagree on the example count: {counts}")
    return [statistics.median(t) for t in times], counts.pop()


# --- workers -----------------------------------------------------------------------------------


def worker_rescan(work: Path, files: int, reps: int) -> dict[str, Any]:
    root = work / "tree"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(c, files, len(CLASSES)):
            (root / name / f"{i:06d}.png").touch()
    _age(root)
    source = open_source(LocalDataSpec(format="imagefolder", path=root, classes=CLASSES))
    started = time.perf_counter()
    first = source.scan()
    first_s = time.perf_counter() - started
    rescans = []
    for _ in range(max(reps, 5)):
        started = time.perf_counter()
        same = source.scan()
        rescans.append(time.perf_counter() - started)
    for i in range(10):
        (root / CLASSES[3] / f"new{i}.png").touch()
    started = time.perf_counter()
    grown = source.scan()
    grown_s = time.perf_counter() - started
    return {
        "files": first.examples,
        "first_s": first_s,
        "rescan_s": statistics.median(rescans),
        "rescan_listed": same.listed,
        "grown_s": grown_s,
        "grown_added": grown.added,
        "grown_listed": grown.listed,
    }


def worker_imagefolder(work: Path, reps: int) -> dict[str, Any]:
    from PIL import Image

    root = work / "images"
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        path = root / CLASSES[i % 10] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    spec = LocalDataSpec(
        format="imagefolder",
        path=root,
        classes=CLASSES,
        channels=1,
        mean=(MEAN,),
        std=(STD,),
        eval_fraction=0.0,
    )

    def baseline() -> int:
        paths = sorted(root.glob("*/*.png"))
        x = np.empty((len(paths), 1, 28, 28), dtype=np.float32)
        for j, path in enumerate(paths):
            with Image.open(path) as image:
                x[j, 0] = np.asarray(image.convert("L"), dtype=np.float32)
        x /= 255
        x -= MEAN
        x /= STD
        y = np.array([CLASSES.index(p.parent.name) for p in paths])
        return len(torch.from_numpy(x)) + 0 * len(y)

    return _throughput(spec, baseline, reps)


def _write_csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((CSV_ROWS, 6)).round(4)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["t", "ax", "ay", "az", "gx", "gy", "gz", "activity"])
        for t in range(CSV_ROWS):
            out.writerow([t, *values[t].tolist(), CLASSES[(t // 1000) % 10]])


def _csv_baseline(path: Path, window: int) -> int:
    features: list[list[float]] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(CLASSES)}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            features.append([float(v) for v in row[1:7]])
            labels.append(index[row[7]])
    rows = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if not window:
        return len(torch.from_numpy(rows)) + 0 * len(y)
    starts = np.arange(0, len(rows) - window + 1, STRIDE)
    x = rows[starts[:, None] + np.arange(window)].transpose(0, 2, 1).copy()
    return len(torch.from_numpy(x)) + 0 * len(y[starts + window - 1])


def worker_csv(work: Path, reps: int, window: int) -> dict[str, Any]:
    path = work / "log.csv"
    _write_csv(path)
    options: dict[str, Any] = {"window": window, "stride": STRIDE} if window else {}
    spec = LocalDataSpec(
        format="csv",
        path=path,
        classes=CLASSES,
        label_column="activity",
        feature_columns=("ax", "ay", "az", "gx", "gy", "gz"),
        eval_fraction=0.0,
        **options,
    )
    return _throughput(spec, lambda: _csv_baseline(path, window), reps)


def worker_npz(work: Path, reps: int) -> dict[str, Any]:
    path = work / "data.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (NPZ_ROWS, 1, 28, 28), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 10, NPZ_ROWS))
    spec = LocalDataSpec(format="npz", path=path, classes=CLASSES, eval_fraction=0.0)

    def baseline() -> int:
        with np.load(path) as arrays:
            xs = torch.from_numpy(arrays["x"].astype(np.float32))
            ys = torch.from_numpy(arrays["y"].astype(np.int64))
        return len(xs) + 0 * len(ys)

    return _throughput(spec, baseline, reps)


def worker_python(work: Path, reps: int) -> dict[str, Any]:
    (work / "bench_user_data.py").write_text(
        textwrap.dedent(
            f"""
            import torch
            def build():
                g = torch.Generator().manual_seed(0)
                x = torch.rand({PY_ITEMS}, 1, 28, 28, generator=g)
                y = torch.randint(0, 10, ({PY_ITEMS},), generator=g)
                return torch.utils.data.TensorDataset(x, y)
            """
        )
    )
    sys.path.insert(0, str(work))
    import bench_user_data  # type: ignore[import-not-found]

    spec = LocalDataSpec(
        format="python", function="bench_user_data:build", classes=CLASSES, eval_fraction=0.0
    )

    def baseline() -> int:
        dataset = bench_user_data.build()
        items = [dataset[i] for i in range(len(dataset))]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([int(item[1]) for item in items])
        return len(x) + 0 * len(y)

    return _throughput(spec, baseline, reps)


def _throughput(spec: LocalDataSpec, baseline: Callable[[], int], reps: int) -> dict[str, Any]:
    """Examples/s of a first job (open, scan, decode the training side), of a later job (re-scan
    of unchanged data, decode) and of the baseline."""

    def first() -> int:
        return len(open_source(spec).train().to_dataset())

    warm = open_source(spec)
    warm.scan()

    def later() -> int:
        warm.scan()
        return len(warm.train().to_dataset())

    (first_s, later_s, baseline_s), n = _medians([first, later, baseline], reps)
    return {
        "examples": n,
        "first_per_s": n / first_s,
        "later_per_s": n / later_s,
        "baseline_per_s": n / baseline_s,
    }


def run_worker(name: str, files: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sf-bench-data-") as tmp:
        work = Path(tmp)
        if name == "rescan":
            return worker_rescan(work, files, reps)
        if name == "imagefolder":
            return worker_imagefolder(work, reps)
        if name == "csv rows":
            return worker_csv(work, reps, 0)
        if name == "csv windows":
            return worker_csv(work, reps, WINDOW)
        if name == "npz":
            return worker_npz(work, reps)
        if name == "python":
            return worker_python(work, reps)
    raise SystemExit(f"unknown worker {name!r}")


# --- the parent --------------------------------------------------------------------------------

WORKERS = ("rescan", "imagefolder", "csv rows", "csv windows", "npz", "python")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000, help="files in the re-scan tree")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        # One thread, as a device with torch_threads: 1 (and fair on a shared machine, where
        # torch's spinning worker threads can make a small tensor operation 20x slower).
        torch.set_num_threads(1)
        print(json.dumps(run_worker(args.worker, args.files, args.reps)))
        return 0
    results: dict[str, dict[str, Any]] = {}
    failed = []
    for name in WORKERS:
        command = [sys.executable, __file__, "--worker", name]
        command += ["--files", str(args.files), "--reps", str(args.reps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            failed.append(name)
            print(
                f"worker {name!r} failed (exit {done.returncode}):\n{done.stderr}", file=sys.stderr
            )
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    if "rescan" in results:
        r = results["rescan"]
        verdict = "PASS" if r["rescan_s"] <= RESCAN_TARGET_S else "MISS"
        print(f"re-scan of an image folder of {r['files']:,} files (10 class directories):")
        print(f"  first scan            {r['first_s'] * 1000:8.1f} ms")
        print(
            f"  re-scan, nothing new  {r['rescan_s'] * 1000:8.1f} ms  (median; "
            f"{r['rescan_listed']} directories listed)  target <= {RESCAN_TARGET_S} s: {verdict}"
        )
        print(
            f"  re-scan, 10 new files {r['grown_s'] * 1000:8.1f} ms  "
            f"({r['grown_added']} added, {r['grown_listed']} directory listed)"
        )
    print(
        f"\n{'loader':<12} {'examples':>9} {'first job':>10} {'later job':>10} "
        f"{'baseline':>10} {'first/baseline':>15}   (examples/s)"
    )
    for name in WORKERS[1:]:
        if name in results:
            r = results[name]
            print(
                f"{name:<12} {r['examples']:>9,} {r['first_per_s']:>10,.0f} "
                f"{r['later_per_s']:>10,.0f} {r['baseline_per_s']:>10,.0f} "
                f"{r['first_per_s'] / r['baseline_per_s']:>15.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if failed:
        print(f"failed workers: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

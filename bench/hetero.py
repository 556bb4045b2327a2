"""Heterogeneous fleet: synchronous vs buffered asynchronous FedDST, with and without budgets.

A simulated mixed fleet (``--devices``, default 100; fleet/sim/fleet_classes.py) of three classes:
pi-zero-2w (share 0.5, speed 0.15, 512 MB), pi4 (0.4, 0.6, 4096 MB), pi5 (0.1, 1.0, 8192 MB).
FedDST (density 0.2) on MNIST (IID shards) with a wide ``mlp`` (784 -> ``--hidden`` -> 10;
``--dataset digits``: the bundled digits with the default 64 -> 64 -> 10 ``mlp``, whose jobs
take milliseconds, so overheads hide the fleet's speeds), over the in-memory broker, four ways:

- ``sync``: rounds of 20 devices, each round waits for all 20 (up to ``--timeout`` seconds);
- ``sync+budgets``: the same with per-device density budgets (``--budgets``);
- ``async``: FedBuff with C=20 jobs in flight and an aggregation every B=10 updates;
- ``async+budgets``: both.

Time is wall clock (a class at speed s sleeps until ``compute_s / s`` has passed, compute_s
being the job thread's CPU time; docs/heterogeneity.md), measured as the sum of the rounds'
(steps') wall times, so the fleet's start-up is left out. The classes keep the ratios of their
speeds, scaled by ``--speed-scale`` (default 0.1: a Pi 5 computes at a tenth of one host core),
so that the 2-core host keeps up with the 20 jobs in flight and the simulated clocks, not the
host's CPU, set the pace. Every configuration aggregates the same number of updates
(``--rounds`` synchronous rounds of 20 = 2 x ``--rounds`` asynchronous steps of 10). Reported per
configuration: time to ``--target`` test accuracy, accuracy at the time the fastest
configuration finished (equal time), final accuracy (equal updates), MB uploaded, updates
dropped (rejected by reason, and stragglers' jobs cancelled by a closing round), and the share
of the slowest class's jobs that finished within ``--timeout``. Writes a JSON file and the plot
of accuracy against time.

    python bench/hetero.py --out docs/results/hetero-mnist
    python bench/hetero.py --quick --out /tmp/hetero
    python bench/hetero.py --dataset digits --out /tmp/hetero-digits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from device.model_ref import ModelRef  # noqa: E402
from fleet.runtime.async_options import AsyncOptions  # noqa: E402
from fleet.runtime.runner import RoundReport, RunSpec  # noqa: E402
from fleet.sim import SimSpec, simulate  # noqa: E402
from fleet.sim.core import device_ids  # noqa: E402
from fleet.sim.fleet_classes import DeviceClass, assign_classes  # noqa: E402
from fleet.state.store import Store  # noqa: E402

CLASSES = (
    DeviceClass("pi-zero-2w", 0.5, speed=0.15, memory_mb=512),
    DeviceClass("pi4", 0.4, speed=0.6, memory_mb=4096),
    DeviceClass("pi5", 0.1, speed=1.0, memory_mb=8192),
)


def scaled_classes(scale: float) -> tuple[DeviceClass, ...]:
    """The classes with every speed times ``scale`` (their ratios unchanged)."""
    return tuple(dataclasses.replace(c, speed=c.speed * scale) for c in CLASSES)


def model_ref(dataset: str, hidden: int) -> ModelRef:
    """The bench's model: the wide MLP on MNIST, the default ``mlp`` on digits."""
    if dataset == "digits":
        return ModelRef(name="mlp")
    return ModelRef(
        name="mlp",
        kwargs={"in_features": 784, "hidden": hidden},
        input_shape=(1, 28, 28),
        num_classes=10,
    )


DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
CONFIGS = ("sync", "sync+budgets", "async", "async+budgets")
PER_ROUND = 20
BUFFER = 10


def run_spec(
    name: str,
    rounds: int,
    budgets: Any,
    timeout_s: float,
    epochs: int,
    *,
    model: ModelRef,
    max_steps: int = 0,
    readjust_every: int = 10,
) -> RunSpec:
    is_async = name.startswith("async")
    aggregations = rounds * PER_ROUND // BUFFER if is_async else rounds
    return RunSpec(
        run_id=name.replace("+", "-"),
        model_name=model.text,
        model_ref=model,
        strategy="feddst",
        rounds=aggregations,
        clients_per_round=PER_ROUND,
        strategy_options={
            "clients_per_round": PER_ROUND,
            "training": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "max_steps": max_steps},
            "total_rounds": aggregations,
            "readjust_every": readjust_every * (aggregations // rounds),
            "density": 0.2,
        },
        round_timeout_s=timeout_s,
        budgets=budgets if name.endswith("budgets") else "none",
        mode="async" if is_async else "sync",
        async_options=AsyncOptions(
            concurrency=PER_ROUND, buffer=BUFFER, max_staleness=8, job_timeout_s=timeout_s
        )
        if is_async
        else None,
    )


def measure(
    name: str, spec: RunSpec, sim: SimSpec, store_dir: Path, timeout_s: float
) -> dict[str, Any]:
    reports: list[RoundReport] = simulate(spec, sim, store_dir)
    elapsed, curve = 0.0, []
    for report in reports:
        elapsed += report.wall_s
        if "accuracy" in report.metrics:
            curve.append((elapsed, report.metrics["accuracy"]))
    plan = assign_classes(device_ids(sim.devices), sim.classes, sim.seed)
    slowest = min(sim.classes, key=lambda c: c.speed).name
    with Store(store_dir, create=False) as store:
        rows = [
            u
            for r in store.rounds(spec.run_id)
            for u in store.updates_for_round(spec.run_id, r.round)
        ]
        rejected = store.rejection_counts(run_id=spec.run_id)
    slow_jobs = [float(u.meta["train_s"]) for u in rows if plan[u.device_id].name == slowest]
    is_sync = spec.mode == "sync"
    cancelled = sum(len(r.selected) - len(r.received) for r in reports) if is_sync else 0
    return {
        "name": name,
        "aggregations": len(reports),
        "updates_counted": sum(1 for u in rows if u.status == "counted"),
        "curve": curve,
        "time_s": elapsed,
        "final_accuracy": curve[-1][1] if curve else float("nan"),
        "upload_mb": sum(r.upload_bytes for r in reports) / 1e6,
        "rejected": rejected,
        "dropped_rows": sum(1 for u in rows if u.status == "dropped"),
        "stragglers_cancelled": cancelled,
        "slow_jobs": len(slow_jobs),
        "slow_jobs_within_deadline": sum(1 for t in slow_jobs if t <= timeout_s),
        "job_s_by_class": {
            c.name: _quantiles([float(u.meta["train_s"]) for u in rows if plan[u.device_id] is c])
            for c in sim.classes
        },
        "density_by_class": {
            c.name: sorted(
                {round(float(u.meta["density"]), 3) for u in rows if plan[u.device_id] is c}
            )
            for c in sim.classes
        },
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    """Median and 95th percentile of simulated job seconds (empty: NaN)."""
    if not values:
        return {"median": float("nan"), "p95": float("nan")}
    ordered = sorted(values)
    return {
        "median": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, a in curve if a >= target), None)


def accuracy_at(curve: list[tuple[float, float]], when: float) -> float:
    reached = [a for t, a in curve if t <= when]
    return reached[-1] if reached else float("nan")


def plot(results: list[dict[str, Any]], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker=".", label=r["name"])
    ax.set_xlabel("wall-clock seconds (sum of round / step times)")
    ax.set_ylabel(f"test accuracy ({dataset})")
    ax.set_title("FedDST on a simulated mixed fleet")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--hidden", type=int, default=1024, help="the MNIST mlp's hidden width")
    parser.add_argument("--max-steps", type=int, default=0, help="local SGD steps cap per job")
    parser.add_argument("--rounds", type=int, default=40, help="synchronous rounds of 20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--speed-scale", type=float, default=0.1, help="every class's speed times this"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="round deadline, seconds")
    parser.add_argument("--target", type=float, default=0.96)
    parser.add_argument(
        "--readjust-every", type=int, default=10, help="FedDST R_adj in synchronous rounds"
    )
    parser.add_argument(
        "--budgets",
        default='{"pi-zero-2w": 0.05}',
        help="the budgets option: auto, or JSON {tag: density} (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for JSON and PNG")
    parser.add_argument("--quick", action="store_true", help="30 devices, 4 rounds")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="which configurations to run, comma-separated (default: all four)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    devices, rounds = (30, 4) if args.quick else (args.devices, args.rounds)
    budgets = args.budgets if args.budgets in ("auto", "none") else json.loads(args.budgets)
    mnist = args.dataset == "mnist"
    sim = SimSpec(
        devices=devices,
        dataset=args.dataset,
        data_dir=args.data_dir if mnist else None,
        partition="iid",
        seed=args.seed,
        classes=scaled_classes(args.speed_scale),
    )
    model = model_ref(args.dataset, args.hidden)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    for name in names:
        spec = run_spec(
            name,
            rounds,
            budgets,
            args.timeout,
            args.epochs,
            model=model,
            max_steps=args.max_steps,
            readjust_every=args.readjust_every,
        )
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(name, spec, sim, Path(tmp), args.timeout)
        result["total_s_with_setup"] = time.monotonic() - started
        results.append(result)
        jobs = ", ".join(
            f"{k} {v['median']:.2f}/{v['p95']:.2f}" for k, v in result["job_s_by_class"].items()
        )
        print(
            f"{name}: {result['time_s']:.1f} s, final {result['final_accuracy']:.3f}; "
            f"job s median/p95: {jobs}",
            flush=True,
        )
    equal_time = min(r["time_s"] for r in results)
    print(
        f"\n{devices} devices, {rounds} x {PER_ROUND} updates each, target {args.target}, "
        f"equal time {equal_time:.1f} s"
    )
    header = (
        "| configuration | time to target s | accuracy at equal time | final accuracy "
        "| time s | MB up | rejected | stragglers cancelled | slowest class within deadline "
        "| density by class |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        reached = time_to(r["curve"], args.target)
        r["time_to_target_s"] = reached
        r["accuracy_at_equal_time"] = accuracy_at(r["curve"], equal_time)
        share = r["slow_jobs_within_deadline"] / r["slow_jobs"] if r["slow_jobs"] else float("nan")
        densities = "; ".join(f"{k} {v}" for k, v in r["density_by_class"].items())
        print(
            f"| {r['name']} | {'-' if reached is None else f'{reached:.1f}'} "
            f"| {r['accuracy_at_equal_time']:.3f} | {r['final_accuracy']:.3f} "
            f"| {r['time_s']:.1f} | {r['upload_mb']:.2f} | {sum(r['rejected'].values())} "
            f"| {r['stragglers_cancelled']} | {share:.2%} | {densities} |"
        )
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"command": " ".join(sys.argv), "options": options, "results": results}
    (args.out / "hetero.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    plot(results, args.out / "hetero.png", args.dataset)
    print(f"\nwrote {args.out / 'hetero.json'} and {args.out / 'hetero.png'}")


if __name__ == "__main__":
    main()

"""What MQTT costs a round, measured against the in-memory broker in the same run (figures only).

Part 1: the same experiment (``--devices`` simulated devices, 20 per round, ``mlp`` on the bundled
digits) runs once over the in-memory broker and once over a local mosquitto. Per round it reports
the wall time and the orchestration overhead: wall time minus the slowest selected device's
training time (what the fleet manager, the broker and the codec add).

Part 2 (scale): ``--scale-devices`` simulated devices stay connected to mosquitto (each with its
own MQTT connection, spread over worker processes), 100 are selected per round, and training is
trivial (one SGD step), so the round time is almost all overhead. Reports the round overhead and
the fleet manager's peak RSS.

    python bench/mqtt_overhead.py --json /tmp/mqtt_overhead.json
    python bench/mqtt_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.runtime.runner import RoundReport, RunSpec  # noqa: E402
from fleet.sim import SimSpec, simulate  # noqa: E402


def experiment(
    devices: int,
    per_round: int,
    rounds: int,
    epochs: int,
    max_steps: int = 0,
    run_id: str = "overhead",
) -> RunSpec:
    training = {"epochs": epochs, "batch_size": 32, "lr": 0.05, "max_steps": max_steps}
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="feddst",
        rounds=rounds,
        clients_per_round=per_round,
        strategy_options={
            "clients_per_round": per_round,
            "training": training,
            "total_rounds": rounds,
            "readjust_every": 2,
        },
        round_timeout_s=300.0,
        eval_every=10**6,  # evaluation is not orchestration: keep it out of the round time
    )


def overheads(reports: list[RoundReport]) -> list[float]:
    return [r.wall_s - r.max_train_s for r in reports]


def run(transport: str, spec: RunSpec, sim: SimSpec) -> tuple[list[RoundReport], float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{transport}-") as tmp:
        start = time.perf_counter()
        reports = simulate(
            spec,
            sim,
            Path(tmp),
            transport=transport,  # type: ignore[arg-type]
            evaluate_on_test=False,
        )
        return reports, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--scale-devices", type=int, default=1000)
    parser.add_argument("--scale-per-round", type=int, default=100)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="worker processes for devices")
    parser.add_argument("--quick", action="store_true", help="a reduced run in under a minute")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.rounds, args.epochs = 20, 3, 2
        args.scale_devices, args.scale_per_round, args.scale_rounds = 100, 50, 2
    logging.basicConfig(level=logging.WARNING)

    spec = experiment(args.devices, args.per_round, args.rounds, args.epochs)
    sim = SimSpec(devices=args.devices, dataset="digits", processes=args.processes)
    memory, _ = run("memory", spec, sim)
    mqtt, _ = run("mqtt", spec, sim)
    # Round 1 includes one-off costs (model build, first imports in worker processes).
    mem_wall = statistics.median(r.wall_s for r in memory[1:])
    mqtt_wall = statistics.median(r.wall_s for r in mqtt[1:])
    mqtt_over = statistics.median(overheads(mqtt[1:]))
    mem_over = statistics.median(overheads(memory[1:]))
    print(
        f"{args.devices} devices, {args.per_round} per round, {args.rounds} rounds, "
        f"mlp on digits, {args.epochs} local epochs; medians over rounds 2..{args.rounds}"
    )
    print(f"{'transport':<10}{'wall/round (s)':>16}{'overhead/round (s)':>20}")
    print(f"{'memory':<10}{mem_wall:>16.3f}{mem_over:>20.3f}")
    print(f"{'mqtt':<10}{mqtt_wall:>16.3f}{mqtt_over:>20.3f}")
    ratio = mqtt_wall / mem_wall
    print(
        f"mqtt vs memory wall time: {ratio:.2f} x (target <= 1.3); "
        f"overhead {mqtt_over:.3f} s/round (target <= 0.5)"
    )

    scale_spec = experiment(
        args.scale_devices,
        args.scale_per_round,
        args.scale_rounds,
        epochs=1,
        max_steps=1,
        run_id="scale",
    )
    scale_sim = SimSpec(devices=args.scale_devices, dataset="digits", processes=args.processes)
    scale, scale_total = run("mqtt", scale_spec, scale_sim)
    scale_over = statistics.median(overheads(scale[1:] or scale))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"scale: {args.scale_devices} connected devices, {args.scale_per_round} per round, "
        f"trivial training: round overhead {scale_over:.3f} s (target <= 2), fleet manager "
        f"peak RSS {rss_mb:.0f} MB (target <= 1024); whole run {scale_total:.1f} s"
    )
    figures: dict[str, Any] = {
        "mqtt_vs_memory": ratio,
        "overhead_s_per_round": mqtt_over,
        "scale_devices": args.scale_devices,
        "scale_round_overhead_s": scale_over,
        "scale_rss_mb": rss_mb,
        "cores": os.cpu_count(),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

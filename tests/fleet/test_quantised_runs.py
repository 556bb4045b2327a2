"""End to end over the in-memory broker: int8 runs train, at about a quarter of fp32's bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet.runtime.runner import RunSpec
from fleet.sim import SimSpec, simulate

TRAINING = {"epochs": 1, "batch_size": 16, "lr": 0.05}
SIM = SimSpec(devices=10, dataset="digits")


def run(tmp: Path, strategy: str, values: str, **options: Any) -> tuple[list[float], int, int]:
    spec = RunSpec(
        run_id="q",
        model_name="mlp",
        strategy=strategy,
        rounds=4,
        clients_per_round=5,
        strategy_options={
            "clients_per_round": 5,
            "training": TRAINING,
            "upload_values": values,
            "download_values": values,
            **options,
        },
        round_timeout_s=30.0,
    )
    reports = simulate(spec, SIM, tmp / f"{strategy}-{values}")
    assert all(len(r.received) == 5 for r in reports)
    accuracy = [r.metrics["accuracy"] for r in reports]
    return accuracy, sum(r.upload_bytes for r in reports), sum(r.download_bytes for r in reports)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("fedavg", {}),
        ("fedavgm", {}),
        # alpha 0: the mask never moves, so the bytes are values and framing only (a moving
        # mask adds the same position bytes to both runs). The mlp has 4,800 weights: about
        # 290 bytes of framing per update are 10% of an int8 update at density 0.5, hence 0.8.
        ("feddst", {"density": 0.8, "alpha": 0.0, "total_rounds": 4}),
    ],
)
def test_int8_trains_at_most_0_27_of_the_fp32_upload(
    strategy: str, options: dict[str, Any], tmp_path: Path
) -> None:
    fp32, up32, down32 = run(tmp_path, strategy, "fp32", **options)
    int8, up8, down8 = run(tmp_path, strategy, "int8", **options)
    assert int8[-1] > int8[0] and int8[-1] > 0.6, int8  # it learns
    assert int8[-1] >= fp32[-1] - 0.05, (int8, fp32)  # and nearly as well as fp32
    assert up8 <= 0.27 * up32, (up8, up32)
    assert down8 <= 0.30 * down32, (down8, down32)


def test_prunefl_int8_trains(tmp_path: Path) -> None:
    """PruneFL too (its importance reports stay fp32, so its byte ratio is not a quarter)."""
    int8, up8, _ = run(tmp_path, "prunefl", "int8", reconfig_every=2, max_reconfigs=3)
    fp32, up32, _ = run(tmp_path, "prunefl", "fp32", reconfig_every=2, max_reconfigs=3)
    assert int8[-1] > 0.6 and int8[-1] >= fp32[-1] - 0.05, (int8, fp32)
    assert up8 < up32

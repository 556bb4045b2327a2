"""Simulations run again in the same state directory and against the same broker see their devices.

Regression (issue 23, item 1): every simulated agent used session epoch 1, so the first run's
stored "epoch 1, offline" outranked the second run's "epoch 1, online" births forever and the
second `fleet simulate --transport mqtt` waited minutes for "no eligible device is online".
Simulated agents now derive their epoch from the clock, as real agents do across restarts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device.wire.broker import MosquittoBroker
from fleet.runtime.runner import RunSpec
from fleet.sim import SimSpec, simulate
from fleet.state.store import Store

TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.05}


def _run(run_id: str) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="fedavg",
        rounds=1,
        clients_per_round=3,
        strategy_options={"clients_per_round": 3, "training": TRAINING},
        round_timeout_s=20.0,
    )


def test_two_mqtt_simulations_back_to_back_in_one_state_dir_and_broker(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    sim = SimSpec(devices=3, dataset="digits", processes=1)
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    state = tmp_path / "state"

    first = simulate(_run("first"), sim, state, transport="mqtt", broker_url=url)
    second = simulate(_run("second"), sim, state, transport="mqtt", broker_url=url)

    assert [len(r.received) for r in first] == [3]
    assert [len(r.received) for r in second] == [3], "the second run must see all its devices"
    with Store(state, create=False) as store:
        epochs = {d.device_id: d.session_epoch for d in store.list_devices()}
    assert all(e is not None and e > 1 for e in epochs.values()), epochs


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)

"""What a device's process loads: a 1 GB Raspberry Pi has no memory for unused parts of torch.

Two torch conveniences import large parts of torch that a device never uses, each costing tens
of MB of resident memory on every device: any ``torch.optim`` optimiser imports ``torch._dynamo``
(about 800 modules, 70 MB here) and ``nn.Module.to_empty`` from the meta device imports sympy
(about 500 modules, 34 MB). The device code avoids both; these tests keep it that way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

ROUND_JOB = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from device.job import kernel_plan_for, run_round_job
    from device.profile import measure_profile
    from device.models import create_model
    from device.data import Dataset
    from device.wire.codec import model_digest
    from device.wire.messages import LocalTraining, ModelSnapshot, RoundCommand, Readjust

    model = create_model("mlp", seed=0)
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    masks = {"fc1.weight": np.random.default_rng(0).random((64, 64)) < 0.3}
    weights["fc1.weight"][~masks["fc1.weight"]] = 0.0
    snapshot = ModelSnapshot("mlp", 1, model_digest(weights, masks), 1, weights, masks)
    data = Dataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)), 10)
    command = RoundCommand(
        model_version=1,
        model_digest=snapshot.digest,
        training=LocalTraining(epochs=1, batch_size=8),
        readjust=Readjust(alpha=0.2),
        report_importance=True,
    )
    profile = measure_profile("mlp", repeats=1, warmup=0)  # as fleet-device run does at start
    kernel_plan_for(profile, snapshot)
    run_round_job(snapshot, command, data, seed=1, kernel_plan=frozenset({"fc1.weight"}))
    print(json.dumps({m: m in sys.modules for m in ("torch._dynamo", "sympy")}))
    """
)


@pytest.fixture(scope="module")
def loaded() -> dict[str, bool]:
    """Which of the heavy modules a fresh process had imported after measuring a device profile
    and one round job that builds a model, trains with kernels, a readjust and importance, and
    builds its update."""
    out = subprocess.run(
        [sys.executable, "-c", ROUND_JOB], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, bool] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("module", ["torch._dynamo", "sympy"])
def test_a_round_job_does_not_import(loaded: dict[str, bool], module: str) -> None:
    assert loaded[module] is False


def test_the_agent_loads_the_sparse_kernels_only_when_a_job_uses_them() -> None:
    """``fleet-device run`` imports the agent and its CLI; the kernels (and ``statistics``,
    which their planner uses) load with the first job or deployment that plans them."""
    code = (
        "import json, sys; import device.cli, device.agent; "
        "print(json.dumps([m for m in ('device.sparse.kernels', 'statistics') "
        "if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

"""`fleet demo`: the README's main job. A small in-memory version runs with the fast tests; the
README's exact command (`fleet demo`, default settings, over MQTT) is the slow test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device.errors import BrokerUnavailableError
from device.wire.broker import find_mosquitto
from fleet.cli.demo import find_mnist
from fleet.state.store import RunStatus, Store
from tests.cli.helpers import Fleet, error_line


@pytest.fixture
def fresh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no MNIST nearby, as on a fresh clone: the demo uses digits."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("SPARSEFLEET_MNIST_DIR", raising=False)
    monkeypatch.delenv("SPARSEFLEET_STATE", raising=False)
    monkeypatch.delenv("SPARSEFLEET_BROKER", raising=False)
    return work


def _summary(stdout: str) -> tuple[float, float, float]:
    """(FedDST accuracy %, upload ratio %, FedAvg accuracy %) from the demo's closing line."""
    match = re.search(
        r"FedDST reached ([\d.]+)% test accuracy uploading ([\d.]+)% of the bytes dense FedAvg "
        r"uploaded \(([\d.]+)%\)",
        stdout,
    )
    assert match, stdout
    return float(match[1]), float(match[2]), float(match[3])


def test_find_mnist_prefers_the_given_dir_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_dir: Path
) -> None:
    assert find_mnist(tmp_path / "given") == tmp_path / "given"
    assert find_mnist(None) is None  # nothing around: the bundled digits
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    monkeypatch.setenv("SPARSEFLEET_MNIST_DIR", str(mnist))
    assert find_mnist(None) is None  # a directory without the IDX files does not count
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (mnist / name).write_bytes(b"")
    assert find_mnist(None) == mnist


def test_small_demo_in_memory_compares_feddst_with_fedavg(fleet: Fleet, fresh_dir: Path) -> None:
    """The whole demo path (two runs, summary, report) with 4 devices and 1 round."""
    out = fresh_dir / "rep"
    result = fleet(
        "demo", "--transport", "memory", "--rounds", "1", "--devices", "4", "--per-round", "2",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert "FedDST (density 0.2) against dense FedAvg on the bundled 8x8 digits" in stdout
    assert re.search(r"FedDST\s+1\s+[\d.]+%", stdout) and re.search(r"FedAvg \(dense\)\s+1", stdout)
    feddst_acc, ratio, _ = _summary(stdout)
    assert 0 < ratio < 40  # a fifth of the weights, plus per-tensor overhead
    assert feddst_acc > 10.0
    assert {p.name for p in out.iterdir()} >= {"report.md", "accuracy_vs_upload.png"}
    with Store(fleet.state_dir) as store:
        runs = store.list_runs()
    assert sorted(r.strategy for r in runs) == ["fedavg", "feddst"]
    assert all(r.status is RunStatus.FINISHED for r in runs)


def test_demo_over_mqtt_without_mosquitto_says_what_to_do(
    fleet: Fleet, fresh_dir: Path, tmp_path: Path
) -> None:
    result = fleet(
        "demo", "--rounds", "1", env={"SPARSEFLEET_MOSQUITTO": str(tmp_path / "missing")}
    )
    assert result.exit_code == 4
    line = error_line(result)
    assert "needs mosquitto" in line and "--transport memory" in line


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)  # about 1 min on an idle 2-core machine, 3.5 min on a busy one
def test_readme_main_job_fleet_demo_end_to_end(fresh_dir: Path) -> None:
    """Exactly the README's `make demo` command, `fleet demo` with its defaults, on a fresh
    directory: FedDST over MQTT must clearly beat chance (10%) and upload far fewer bytes
    than dense FedAvg, and the report must be written to ./demo-report."""
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"the demo runs over MQTT: {exc}")
    from click.testing import CliRunner

    from fleet.cli import cli

    result = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    feddst_acc, ratio, fedavg_acc = _summary(result.stdout)
    assert feddst_acc > 80.0, result.stdout
    assert fedavg_acc > 80.0
    assert ratio < 35.0
    assert "over a throw-away mosquitto" in result.stdout
    report = fresh_dir / "demo-report"
    assert (report / "report.md").is_file()
    assert len(list(report.glob("*.png"))) == 3
    with Store(fresh_dir / ".sparsefleet") as store:
        rounds = {r.strategy: len(store.rounds(r.run_id)) for r in store.list_runs()}
    assert rounds == {"feddst": 30, "fedavg": 30}

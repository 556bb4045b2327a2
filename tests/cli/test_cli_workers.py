"""``fleet run start --workers K`` and ``fleet aggregator run`` through the CLI.

Sharded aggregation hands the fleet manager sums, so a run whose aggregation is not a sum
(robust aggregation) or that needs every late update (late policy "next") must be refused
before any process starts or any broker is dialled, with the ConfigError exit code and a message
that says what to change. The worker command must exist and document its options. And the
workers `run start` starts must never outlive it (one slow test against a real mosquitto).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from device.errors import BrokerUnavailableError, ConfigError
from device.wire.broker import MosquittoBroker, find_mosquitto
from tests.cli.helpers import Fleet, error_line

# A port nothing listens on: reaching the broker check would be a bug in these tests.
NO_BROKER = "mqtt://127.0.0.1:9"


def test_robust_aggregation_with_workers_is_a_config_error(fleet: Fleet, tmp_path: Path) -> None:
    """A trimmed mean cannot be computed from the workers' sums: refused with exit code 3,
    naming robust aggregation and what to do, before the broker is tried."""
    config = fleet.write_config(
        strategy="fedavg", options="options: {robust: {method: trimmed_mean, trim_fraction: 0.2}}"
    )
    result = fleet("--broker", NO_BROKER, "run", "start", config, "--workers", "2")
    assert result.exit_code == ConfigError.exit_code, result.output
    line = error_line(result)
    assert "robust aggregation" in line and "trimmed_mean" in line
    assert "--workers" in line


def test_clipping_with_workers_is_a_config_error(fleet: Fleet) -> None:
    """Clipping alone (method mean) is still robust aggregation the workers do not apply: a run
    would silently lose it, so it is refused too."""
    config = fleet.write_config(strategy="feddst", options="options: {robust: {clip_norm: 1.0}}")
    result = fleet("--broker", NO_BROKER, "run", "start", config, "--workers", "1")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "clip_norm 1.0" in error_line(result)


def test_late_policy_next_with_workers_is_a_config_error(fleet: Fleet) -> None:
    """Workers refuse updates of a closed round, so "next" (count them in the next round) would
    silently become "drop": refused."""
    config = fleet.write_config()
    text = config.read_text().replace(
        "round_timeout_s: 300", "round_timeout_s: 300\n  late_policy: next"
    )
    config.write_text(text)
    result = fleet("--broker", NO_BROKER, "run", "start", config, "--workers", "2")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "late_policy 'next'" in error_line(result)


def test_robust_without_workers_gets_past_the_check(fleet: Fleet) -> None:
    """Without workers the same robust run file is fine: it fails only later, at the missing
    broker (exit code 4), so the refusal above is about the workers and nothing else."""
    config = fleet.write_config(strategy="fedavg", options="options: {robust: {method: median}}")
    result = fleet("--broker", NO_BROKER, "run", "start", config)
    assert result.exit_code == 4, result.output
    assert "nothing accepts connections" in error_line(result)


def test_negative_worker_count_is_a_usage_error(fleet: Fleet) -> None:
    """--workers is a count: -1 is refused by the option itself (click's usage exit code 2)."""
    result = fleet("run", "start", fleet.write_config(), "--workers", "-1")
    assert result.exit_code == 2
    assert "--workers" in result.stderr


def test_aggregator_run_help_lists_its_options(fleet: Fleet) -> None:
    """`fleet aggregator run --help` works and documents the options that mirror
    `python -m fleet.runtime.aggregator run`."""
    result = fleet("aggregator", "run", "--help")
    assert result.exit_code == 0, result.output
    for option in (
        "--run",
        "--worker-id",
        "--broker",
        "--state",
        "--prefix",
        "--group",
        "--username",
        "--password-file",
        "--ca-file",
    ):
        assert option in result.stdout


def test_aggregator_run_without_state_is_not_found(fleet: Fleet) -> None:
    """A worker started where no fleet state exists says so with the NotFound exit code instead
    of creating an empty store that the fleet manager would never read."""
    result = fleet("--broker", NO_BROKER, "aggregator", "run", "--run", "r", "--worker-id", "w")
    assert result.exit_code == 5, result.output
    assert "fleet: error: " in result.stderr
    assert not (fleet.state_dir / "fleet.db").exists()


def _worker_processes(state_dir: Path) -> list[int]:
    """Pids of live aggregator worker processes started for ``state_dir`` (from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if b"fleet.runtime.aggregator" in args and str(state_dir.resolve()).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow  # two worker processes import torch: several seconds here
@pytest.mark.integration
def test_workers_are_started_and_reaped_when_the_run_ends(fleet: Fleet) -> None:
    """`run start --workers 2` starts two workers that join the broker, and when the run ends
    (here: no device comes online, exit code 5) no worker process is left behind."""
    try:
        find_mosquitto()
    except BrokerUnavailableError as exc:
        pytest.skip(f"needs a mosquitto broker: {exc}")
    broker = MosquittoBroker()
    broker.start()
    try:
        url = f"mqtt://{broker.host}:{broker.port}"
        config = fleet.write_config()
        result = fleet("--broker", url, "run", "start", config, "--workers", "2", "--wait-s", "1")
        assert result.exit_code == 5, result.output
        assert "2 aggregator worker(s) running: tiny-agg-0, tiny-agg-1" in result.stdout
        assert "no eligible device" in error_line(result)
        assert _worker_processes(fleet.state_dir) == []
    finally:
        broker.cleanup()

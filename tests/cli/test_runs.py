"""`fleet simulate` and `fleet run list|status|stop|resume|report` on in-memory simulations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fleet.runtime.run_control import RunFiles
from fleet.state.store import RunStatus, Store
from tests.cli.helpers import Fleet, error_line


def test_simulate_runs_every_round_and_prints_progress(fleet: Fleet) -> None:
    """One line per closed round (with accuracy and bytes), then where the report is."""
    result = fleet("simulate", fleet.write_config(rounds=2))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "simulating run tiny: feddst with mlp on 4 devices" in out
    assert "round 1/2  3/3 answered" in out and "round 2/2  3/3 answered" in out
    assert "run tiny finished: 2 rounds" in out
    with Store(fleet.state_dir) as store:
        assert store.get_run("tiny").status is RunStatus.FINISHED
        assert [r.round for r in store.rounds("tiny")] == [1, 2]


def test_simulate_devices_option_overrides_the_file(fleet: Fleet) -> None:
    result = fleet("simulate", fleet.write_config(rounds=1), "--devices", "3")
    assert result.exit_code == 0, result.output
    assert "on 3 devices" in result.stdout
    with Store(fleet.state_dir) as store:
        assert len(store.list_devices()) == 3


def test_simulated_devices_are_offline_once_the_simulation_ended(populated: Fleet) -> None:
    """Otherwise `fleet status` would show a fleet that no longer exists as online."""
    with Store(populated.state_dir) as store:
        devices = store.list_devices()
    assert devices and not any(d.online for d in devices)


def test_simulating_an_existing_run_id_is_refused(populated: Fleet) -> None:
    result = populated("simulate", populated.write_config())
    assert result.exit_code == 1
    line = error_line(result)
    assert "run 'tiny' already exists" in line and "fleet run resume tiny" in line


def test_run_list_shows_the_run(populated: Fleet) -> None:
    result = populated("run", "list")
    assert result.exit_code == 0
    row = next(line for line in result.stdout.splitlines() if "tiny" in line)
    assert "finished" in row and "feddst" in row and "2/2" in row


def test_run_list_json_has_accuracy_and_bytes(populated: Fleet) -> None:
    result = populated("run", "list", "--json")
    assert result.exit_code == 0
    (run,) = json.loads(result.stdout)
    assert run["run_id"] == "tiny" and run["status"] == "finished"
    assert run["rounds_closed"] == 2 and run["rounds"] == 2
    assert 0.1 < run["accuracy"] <= 1.0
    assert run["upload_bytes"] > 0 and run["download_bytes"] > 0
    assert abs(run["density"] - 0.3) < 0.01


def test_run_list_filters_by_status(populated: Fleet) -> None:
    result = populated("run", "list", "--status", "running", "--json")
    assert json.loads(result.stdout) == []


def test_run_list_on_an_empty_state_dir_says_how_to_start(fleet: Fleet) -> None:
    result = fleet("run", "list")
    assert result.exit_code == 5
    assert "fleet demo" in error_line(result)


def test_run_status_shows_rounds(populated: Fleet) -> None:
    result = populated("run", "status", "tiny")
    assert result.exit_code == 0
    assert "finished" in result.stdout and "2/2" in result.stdout
    assert "Last 10 rounds" in result.stdout


def test_run_status_json_matches_the_store(populated: Fleet) -> None:
    data = json.loads(populated("run", "status", "tiny", "--json").stdout)
    with Store(populated.state_dir) as store:
        rounds = store.rounds("tiny")
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert [r["upload_bytes"] for r in data["rounds"]] == [r.bytes_up for r in rounds]
    assert data["open_round"] is None
    assert data["config"]["strategy"] == "feddst"


def test_unknown_run_gives_one_line_and_exit_5(populated: Fleet) -> None:
    for command in (["status"], ["stop"], ["resume"], ["report", "--out", "x"]):
        result = populated("run", *command, "nope")
        assert result.exit_code == 5, command
        line = error_line(result)
        assert "no run 'nope'" in line and "fleet run list" in line


def test_run_report_writes_markdown_and_pngs(populated: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = populated("run", "report", "tiny", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file()
    assert {p.name for p in out.glob("*.png")} == {
        "accuracy_vs_round.png",
        "accuracy_vs_upload.png",
        "density_tiny.png",
    }
    assert f"wrote {out / 'report.md'}" in result.stdout


def _fake_running(fleet: Fleet, run_id: str = "live") -> None:
    """A run in status 'running', as if a `fleet run start` process were running it."""
    from fleet.runtime.runner import RunSpec

    spec = RunSpec(
        run_id=run_id, model_name="mlp", strategy="fedavg", rounds=3, clients_per_round=1
    )
    with Store(fleet.state_dir) as store:
        store.create_run(run_id, config=spec.to_json(), strategy="fedavg", model_name="mlp")
        store.set_run_status(run_id, RunStatus.RUNNING)


def test_run_stop_asks_the_running_process_through_a_stop_file(fleet: Fleet) -> None:
    _fake_running(fleet)
    files = RunFiles(fleet.state_dir, "live")
    files.directory.mkdir(parents=True)
    files.pidfile.write_text(f"{os.getpid()}\n")  # this (live) process "runs" it
    result = fleet("run", "stop", "live")
    assert result.exit_code == 0
    assert "stop requested: run live" in result.stdout
    assert files.stop.exists()
    with Store(fleet.state_dir) as store:  # the running process records the stop itself
        assert store.get_run("live").status is RunStatus.RUNNING


def test_run_stop_without_a_live_process_marks_the_run_stopped(fleet: Fleet) -> None:
    """A run whose process died must not stay 'running' forever."""
    _fake_running(fleet)
    result = fleet("run", "stop", "live")
    assert result.exit_code == 0
    assert "marked stopped" in result.stdout and "fleet run resume live" in result.stdout
    with Store(fleet.state_dir) as store:
        assert store.get_run("live").status is RunStatus.STOPPED


def test_run_stop_on_a_finished_run_changes_nothing(populated: Fleet) -> None:
    result = populated("run", "stop", "tiny")
    assert result.exit_code == 0
    assert "run tiny is finished; nothing to stop" in result.stdout


def test_a_stop_request_stops_after_the_round_and_resume_finishes(fleet: Fleet) -> None:
    """Stop, then resume: the run ends with every round exactly once and nothing counted
    twice; resume uses the launch record (here: the same simulation)."""
    path = fleet.write_config(run_id="halt", rounds=3)
    RunFiles(fleet.state_dir, "halt").request_stop()  # asked before it even started
    result = fleet("simulate", path)
    assert result.exit_code == 0, result.output
    assert "run halt stopped after round 1/3" in result.stdout
    with Store(fleet.state_dir) as store:
        assert store.get_run("halt").status is RunStatus.STOPPED
        assert [r.round for r in store.rounds("halt")] == [1]
    assert not RunFiles(fleet.state_dir, "halt").stop.exists()  # honoured, then removed

    result = fleet("run", "resume", "halt")
    assert result.exit_code == 0, result.output
    assert "resuming run halt after round 1" in result.stdout
    assert "round 2/3" in result.stdout and "round 3/3" in result.stdout
    with Store(fleet.state_dir) as store:
        assert store.get_run("halt").status is RunStatus.FINISHED
        rounds = store.rounds("halt")
        assert [r.round for r in rounds] == [1, 2, 3]
        counted = [u for r in rounds for u in store.updates_for_round("halt", r.round)]
        assert all(u.status == "counted" for u in counted)


def test_resuming_a_finished_run_is_refused(populated: Fleet) -> None:
    result = populated("run", "resume", "tiny")
    assert result.exit_code == 1
    assert "run 'tiny' is finished; there is nothing to resume" in error_line(result)


def test_run_report_defaults_to_reports_run(
    populated: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = populated("run", "report", "tiny")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports" / "tiny" / "report.md").is_file()

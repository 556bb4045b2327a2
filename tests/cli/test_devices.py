"""`fleet devices ...` and `fleet status`: the registry as an operator sees and changes it."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from rich.console import Console

from fleet.cli import render
from fleet.cli.status import job_states
from fleet.ops.registry import DeviceCounters, DeviceInfo, DeviceRegistry
from fleet.runtime.runner import RunSpec
from fleet.state.store import RunStatus, Store
from tests.cli.helpers import Fleet, add_device, error_line


@pytest.fixture
def three(fleet: Fleet) -> Fleet:
    """A store with three devices: two online (one tagged site=lab), one offline."""
    now = time.time()
    with Store(fleet.state_dir) as store:
        add_device(store, "pi-1", at=now - 5, tags=("site=lab",))
        add_device(store, "pi-2", at=now - 5, dataset_size=250)
        add_device(store, "pi-3", online=False, at=now - 3600)
    return fleet


def test_devices_list_shows_every_device(three: Fleet) -> None:
    result = three("devices", "list")
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("pi-")}
    assert set(rows) == {"pi-1", "pi-2", "pi-3"}
    assert "site=lab" in rows["pi-1"] and "online" in rows["pi-1"]
    assert "offline" in rows["pi-3"]


def test_devices_list_online_filter_and_json(three: Fleet) -> None:
    data = json.loads(three("devices", "list", "--online", "--json").stdout)
    assert [d["device_id"] for d in data] == ["pi-1", "pi-2"]
    assert data[1]["dataset_size"] == 250 and data[1]["schedulable"] is True
    offline = json.loads(three("devices", "list", "--offline", "--json").stdout)
    assert [d["device_id"] for d in offline] == ["pi-3"]


def test_devices_show_details(three: Fleet) -> None:
    result = three("devices", "show", "pi-2")
    assert result.exit_code == 0
    out = result.stdout
    assert "pi-2" in out and "250" in out and "aarch64, 4 CPUs" in out


def test_devices_show_json_includes_recent_rejections(three: Fleet) -> None:
    with Store(three.state_dir) as store:
        store.record_rejection("r", 3, "pi-2", "non_finite", "NaN in fc1.weight")
    data = json.loads(three("devices", "show", "pi-2", "--json").stdout)
    assert data["counters"]["rejections"] == {"non_finite": 1}
    assert data["recent_rejections"][0]["detail"] == "NaN in fc1.weight"


def test_cordon_drain_uncordon_change_schedulability(three: Fleet) -> None:
    """What the runner's next selection sees: cordoned and drained devices are not eligible."""
    assert three("devices", "cordon", "pi-1").exit_code == 0
    result = three("devices", "drain", "pi-2")
    assert result.exit_code == 0 and "pi-2: drained" in result.stdout
    with Store(three.state_dir) as store:
        assert DeviceRegistry(store).eligible() == []
    assert three("devices", "uncordon", "pi-1", "pi-2").exit_code == 0
    with Store(three.state_dir) as store:
        assert [d.device_id for d in DeviceRegistry(store).eligible()] == ["pi-1", "pi-2"]


def test_cordon_checks_every_device_before_changing_any(three: Fleet) -> None:
    """A typo in a list must not leave half of the devices cordoned."""
    result = three("devices", "cordon", "pi-1", "pi-9")
    assert result.exit_code == 5
    line = error_line(result)
    assert "no device 'pi-9'" in line and "fleet devices list" in line
    with Store(three.state_dir) as store:
        assert not DeviceRegistry(store).get("pi-1").cordoned


@pytest.mark.parametrize("command", ["show", "cordon", "uncordon", "drain", "tag"])
def test_unknown_device_gives_one_line_and_exit_5(three: Fleet, command: str) -> None:
    args = ["devices", command, "ghost"] + (["x=1"] if command == "tag" else [])
    result = three(*args)
    assert result.exit_code == 5
    assert "no device 'ghost'" in error_line(result)


def test_tag_sets_and_removes_operator_tags(three: Fleet) -> None:
    result = three("devices", "tag", "pi-2", "site=field", "arm64")
    assert result.exit_code == 0
    assert "pi-2: tags arm64,site=field" in result.stdout
    result = three("devices", "tag", "pi-2", "--remove", "arm64")
    assert "pi-2: tags site=field" in result.stdout
    with Store(three.state_dir) as store:
        assert [d.device_id for d in DeviceRegistry(store).eligible(tags="site=field")] == ["pi-2"]


def test_tag_without_tags_is_a_usage_error(three: Fleet) -> None:
    result = three("devices", "tag", "pi-2")
    assert result.exit_code == 2
    assert "give tags to set" in result.stderr


def test_devices_list_without_state_says_how_to_get_one(fleet: Fleet) -> None:
    result = fleet("devices", "list")
    assert result.exit_code == 5
    assert "no fleet state in" in error_line(result)


def test_devices_enroll_writes_a_private_secret_and_the_password_file(fleet: Fleet) -> None:
    fleet.state_dir.mkdir()
    result = fleet("devices", "enroll", "pi-7")
    assert result.exit_code == 0, result.output
    secret = fleet.state_dir / "secrets" / "pi-7.password"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    entry = (fleet.state_dir / "broker" / "passwd").read_text()
    assert entry.startswith("pi-7:$7$") and password not in entry
    assert (fleet.state_dir / "broker" / "acl").is_file()
    assert password not in result.output  # never printed


def test_devices_enroll_refuses_a_reserved_name(fleet: Fleet) -> None:
    result = fleet("devices", "enroll", "fleet-manager")
    assert result.exit_code == 3
    assert "reserved" in error_line(result)


def test_certs_init_ca_issue_and_server(fleet: Fleet, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert fleet("certs", "init-ca", "--pki", pki).exit_code == 0
    result = fleet("certs", "issue", "pi-1", "--pki", pki)
    assert result.exit_code == 0
    assert stat.S_IMODE((pki / "devices" / "pi-1.key").stat().st_mode) == 0o600
    assert fleet("certs", "server", "localhost", "127.0.0.1", "--pki", pki).exit_code == 0
    assert (pki / "server.crt").is_file()
    from fleet.ops.certs import load_certificate

    cert = load_certificate(pki / "devices" / "pi-1.crt")
    assert cert.subject.rfc4514_string() == "CN=pi-1"


def test_certs_init_ca_twice_needs_force(fleet: Fleet, tmp_path: Path) -> None:
    """A second CA would silently invalidate every certificate the first one issued."""
    pki = tmp_path / "pki"
    assert fleet("certs", "init-ca", "--pki", pki).exit_code == 0
    result = fleet("certs", "init-ca", "--pki", pki)
    assert result.exit_code == 3
    assert "already exists" in error_line(result)
    assert fleet("certs", "init-ca", "--pki", pki, "--force").exit_code == 0


def test_certs_issue_without_a_ca_is_not_found(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet("certs", "issue", "pi-1", "--pki", tmp_path / "empty")
    assert result.exit_code == 5


# -- fleet status -----------------------------------------------------------------------------


def _open_round(store: Store, run_id: str, selected: list[str]) -> None:
    """A running run with round 1 open for ``selected`` (as the runner leaves it mid-round)."""
    spec = RunSpec(
        run_id=run_id, model_name="mlp", strategy="fedavg", rounds=5, clients_per_round=2
    )
    store.create_run(run_id, config=spec.to_json(), strategy="fedavg", model_name="mlp")
    store.set_run_status(run_id, RunStatus.RUNNING)
    store.save_checkpoint(run_id, 0, {"w": [1.0]}, {})
    store.open_round(run_id, 1, selected=selected, deadline=2e9, model_version_in=0)


def test_job_states_come_from_the_open_round(three: Fleet) -> None:
    """Selected devices train until their update is stored; the rest are idle."""
    with Store(three.state_dir) as store:
        _open_round(store, "live", ["pi-1", "pi-2"])
        store.record_update("live", 1, "pi-2", b"payload", 10)
        assert job_states(store) == {"pi-1": "training r1", "pi-2": "uploaded r1"}


def test_status_shows_runs_and_the_fleet(three: Fleet) -> None:
    with Store(three.state_dir) as store:
        _open_round(store, "live", ["pi-1", "pi-2"])
    result = three("status")
    assert result.exit_code == 0
    out = result.stdout
    assert "run live: round 1/5, 0/2 answered" in out
    assert "2 online, 1 offline" in out
    pi1 = next(line for line in out.splitlines() if line.startswith("pi-1"))
    assert "training r1" in pi1


def test_status_json(three: Fleet) -> None:
    data = json.loads(three("status", "--json").stdout)
    assert data["runs"] == []
    assert [(d["device_id"], d["online"], d["job"]) for d in data["devices"]] == [
        ("pi-1", True, "idle"),
        ("pi-2", True, "idle"),
        ("pi-3", False, "idle"),
    ]


def test_status_watch_refreshes_until_ctrl_c(three: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("fleet.cli.render.time.sleep", fake_sleep)
    result = three("status", "--watch", "--interval", "0.5")
    assert result.exit_code == 0
    assert calls == [0.5, 0.5]
    assert "pi-3" in result.stdout


def test_status_table_snapshot() -> None:
    """The status table at a fixed width without colour, byte for byte: what an operator reads
    (column order, units, relative times, cordon/drain markers) changes only on purpose."""
    devices = [
        DeviceInfo(
            device_id="pi-kitchen",
            online=True,
            last_seen=990.0,
            session_epoch=1,
            agent_version="0.1.0",
            dataset_size=600,
            profile=None,
            tags={},
            cordoned=False,
            drained=False,
            counters=DeviceCounters(
                rounds_joined=12,
                updates_accepted=11,
                failures=1,
                rejections={"non_finite": 2},
                bytes_up=1_234_567,
                bytes_down=9_876_543,
            ),
        ),
        DeviceInfo(
            device_id="pi-garage",
            online=False,
            last_seen=1000.0 - 7200,
            session_epoch=1,
            agent_version="0.0.9",
            dataset_size=600,
            profile=None,
            tags={},
            cordoned=True,
            drained=False,
            counters=DeviceCounters(),
        ),
        DeviceInfo(
            device_id="pi-attic",
            online=True,
            last_seen=None,
            session_epoch=None,
            agent_version="",
            dataset_size=0,
            profile=None,
            tags={},
            cordoned=False,
            drained=True,
            counters=DeviceCounters(rounds_joined=3, bytes_up=999),
        ),
    ]
    console = Console(width=100, color_system=None, record=True)
    console.print(render.status_table(devices, {"pi-kitchen": "training r13"}, now=1000.0))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    header = "device     state               seen version job          rounds fails rejects"
    assert lines == [
        "Fleet",
        header + "      up    down",
        "─" * 93,
        "pi-kitchen online           10s ago 0.1.0   training r13     12     1       2"
        " 1.23 MB 9.88 MB",
        "pi-garage  offline/cordoned  2h ago 0.0.9   idle              0     0       0"
        "     0 B     0 B",
        "pi-attic   online/drained     never -       idle              3     0       0"
        "   999 B     0 B",
        "2 online, 1 offline",
    ]

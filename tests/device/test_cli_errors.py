"""``fleet-device run`` with broken configurations, as a careless user or an attacker writes them.

Every one must end the process with exactly one line on stderr (``fleet-device: error: ...``),
the exit code documented for its kind of error (docs/cli.md, "fleet-device") and no Python
traceback: on a device the operator reads ``journalctl``, and a traceback hides the one line that
says what to fix. The cases run the real entry point (``python -m device``) in a subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from device.errors import BrokerUnavailableError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
USAGE = 2  # argparse's usage error, documented with the others


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FAST = "connect_timeout_s: 0.5"  # a broker that is never there fails the test in 0.5 s


def config(body: str, *, broker: str | None = None) -> str:
    """A device config: ``body`` plus a broker section (by default one that fails fast if it is
    ever reached)."""
    return body + (broker or f"broker: {{url: '{{url}}', {FAST}}}\n")


@dataclass(frozen=True)
class Case:
    """``text`` is the device config, where ``{dir}`` stands for the test's directory and
    ``{url}``/``{port}`` for a loopback port nothing listens on; ``files`` maps names in that
    directory to their text (``None``: a directory)."""

    text: str
    exit_code: int
    says: str  # a fragment the error line must contain
    files: tuple[tuple[str, str | None], ...] = ()
    setup: Callable[[Path], None] | None = None


def _broken_link(directory: Path) -> None:
    (directory / "dangling").symlink_to(directory / "nowhere")


GOOD = "data: {dataset: digits}\ntorch_threads: 1\n"

CASES: dict[str, Case] = {
    # -- the device id: the same rule the fleet manager enrols with -------------------------------
    "reserved id": Case(
        config("device_id: fleet-manager\n" + GOOD), ConfigError.exit_code, "is reserved"
    ),
    "fleet manager's role id": Case(
        config("device_id: fleet-manager-coordinator\n" + GOOD), ConfigError.exit_code, "reserved"
    ),
    "id with a space": Case(
        config("device_id: 'dev 9'\n" + GOOD), ConfigError.exit_code, "device_id: 'dev 9'"
    ),
    "id with a slash": Case(
        config("device_id: a/b\n" + GOOD), ConfigError.exit_code, "device.yaml:1: device_id"
    ),
    "id with a plus": Case(config("device_id: 'dev+'\n" + GOOD), ConfigError.exit_code, "dev+"),
    "id with a hash": Case(config("device_id: 'dev#1'\n" + GOOD), ConfigError.exit_code, "dev#1"),
    "empty id": Case(config("device_id: ''\n" + GOOD), ConfigError.exit_code, "device_id: ''"),
    "no id": Case(config(GOOD), ConfigError.exit_code, "device_id: required setting"),
    "id without a value": Case(
        config("device_id:\n" + GOOD), ConfigError.exit_code, "expected a string, got None"
    ),
    "numeric id": Case(config("device_id: 12\n" + GOOD), ConfigError.exit_code, "got 12"),
    # -- types and unknown keys ---------------------------------------------------------------
    "wrong type": Case(
        config("device_id: d1\ntorch_threads: many\ndata: {dataset: digits}\n"),
        ConfigError.exit_code,
        "torch_threads: expected an integer",
    ),
    "negative threads": Case(
        config("device_id: d1\ndata: {dataset: digits}\ntorch_threads: -2\n"),
        ConfigError.exit_code,
        "torch_threads: must be 0",
    ),
    "oneDNN as a YAML boolean": Case(
        config("device_id: d1\ntorch_onednn: false\n" + GOOD),
        ConfigError.exit_code,
        "torch_onednn: expected one of 'auto', 'enabled', 'disabled', got False",
    ),
    "unknown key": Case(
        config("device_id: d1\nbrokr: {}\n" + GOOD), ConfigError.exit_code, "brokr"
    ),
    "unknown dataset": Case(
        config("device_id: d1\ndata: {dataset: cifar}\n"), ConfigError.exit_code, "data.dataset"
    ),
    "key given twice": Case(
        config("device_id: d1\n" + GOOD + "device_id: d2\n"), ConfigError.exit_code, "twice"
    ),
    "bad topic prefix": Case(
        config("device_id: d1\ntopics_prefix: 'fl/#'\n" + GOOD), ConfigError.exit_code, "wildcard"
    ),
    "tag without a key": Case(
        config("device_id: d1\ntags: ['=x']\n" + GOOD), ConfigError.exit_code, "tags"
    ),
    "not a mapping": Case("- device_id: d1\n", ConfigError.exit_code, "expected a mapping"),
    "not YAML": Case("device_id: [d1\n", ConfigError.exit_code, "not valid YAML"),
    "unsafe YAML tag": Case(
        config("device_id: !!python/object:os.system d1\n" + GOOD),
        ConfigError.exit_code,
        "not valid YAML",
    ),
    # -- broker URL and settings --------------------------------------------------------------
    "http URL": Case(
        config("device_id: d1\n" + GOOD, broker="broker: {url: 'http://127.0.0.1:1883'}\n"),
        ConfigError.exit_code,
        "broker.url: broker URL 'http://127.0.0.1:1883': scheme",
    ),
    "URL without a host": Case(
        config("device_id: d1\n" + GOOD, broker="broker: {url: 'mqtt://:1883'}\n"),
        ConfigError.exit_code,
        "has no host",
    ),
    "URL with a bad port": Case(
        config("device_id: d1\n" + GOOD, broker="broker: {url: 'mqtt://127.0.0.1:99999'}\n"),
        ConfigError.exit_code,
        "broker.url",
    ),
    "zero keepalive": Case(
        config("device_id: d1\n" + GOOD, broker="broker: {keepalive_s: 0}\n"),
        ConfigError.exit_code,
        "broker.keepalive_s",
    ),
    # -- files ---------------------------------------------------------------------------------
    "missing TLS CA file": Case(
        config(
            "device_id: d1\n" + GOOD,
            broker=(
                "broker: {url: 'mqtts://127.0.0.1:{port}', " + FAST + ", "
                "tls: {ca_file: '{dir}/no-ca.crt'}}\n"
            ),
        ),
        ConfigError.exit_code,
        "no-ca.crt",
    ),
    "password file is a directory": Case(
        config(
            "device_id: d1\n" + GOOD,
            broker="broker: {url: '{url}', " + FAST + ", password_file: '{dir}/secrets'}\n",
        ),
        ConfigError.exit_code,
        "cannot be read",
        files=(("secrets", None),),
    ),
    "password file is a broken link": Case(
        config(
            "device_id: d1\n" + GOOD,
            broker="broker: {url: '{url}', " + FAST + ", password_file: '{dir}/dangling'}\n",
        ),
        ConfigError.exit_code,
        "does not exist",
        setup=_broken_link,
    ),
    "missing data directory": Case(
        config("device_id: d1\ndata: {dataset: mnist, data_dir: '{dir}/no-data'}\n"),
        DataError.exit_code,
        "no-data",
    ),
    "no data directory given": Case(
        config("device_id: d1\ndata: {dataset: mnist}\n"), DataError.exit_code, "data_dir"
    ),
    # -- the broker ----------------------------------------------------------------------------
    "unreachable broker": Case(
        config("device_id: d1\n" + GOOD), BrokerUnavailableError.exit_code, "not reachable"
    ),
}


def run_device(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device", *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    err = result.stderr
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fleet-device: error: ") or lines[0].startswith("fleet-device "), err
    assert says in lines[0], err
    assert result.returncode == code, err


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_broken_config_is_one_line_and_its_exit_code(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    for file_name, text in case.files:
        if text is None:
            (tmp_path / file_name).mkdir()
        else:
            (tmp_path / file_name).write_text(text)
    if case.setup is not None:
        case.setup(tmp_path)
    port = closed_port()
    text = case.text.replace("{dir}", str(tmp_path)).replace("{port}", str(port))
    path = tmp_path / "device.yaml"
    path.write_text(text.replace("{url}", f"mqtt://127.0.0.1:{port}"))
    assert_one_line_error(run_device("run", "--config", str(path)), case.exit_code, case.says)


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_device("run", "--config", str(tmp_path / "absent.yaml"))
    assert_one_line_error(result, ConfigError.exit_code, "absent.yaml: no such file")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "device.yaml"
    path.write_bytes(b"device_id: d\xff1\n")
    assert_one_line_error(run_device("run", "--config", str(path)), ConfigError.exit_code, "UTF-8")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("run",), "--config"),
        (("launch",), "invalid choice"),
        (("profile", "--repeats", "0"), "--repeats: must be at least 1"),
        (("profile", "--model", "nope"), "unknown model 'nope'"),
    ],
)
def test_a_usage_error_is_one_line_with_code_2(args: tuple[str, ...], says: str) -> None:
    """argparse's own usage errors print the whole usage first; here they stay one line."""
    assert_one_line_error(run_device(*args), USAGE, says)

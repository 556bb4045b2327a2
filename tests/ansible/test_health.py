"""``fleet.ops.health``: the rollout's health check, against a real mosquitto.

A rolling upgrade is only as safe as this check: it must pass only when the device is back
online with the new version, wait through the restart (old retained status first, new birth
later), and fail with a message that says what the device last reported.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from ansible_harness import BrokerFactory
from paho.mqtt.enums import CallbackAPIVersion

from device.wire import envelope
from device.wire.broker import MosquittoBroker, free_port
from device.wire.messages import DeployedModel, DeviceStatus, Envelope, JobEvent, JobState
from device.wire.topics import Topics
from fleet.ops.health import main, wait_for_version, wait_for_version_result

pytestmark = pytest.mark.integration

PUBLISHER = {"publisher": "pub-secret"}


def publish_status(
    broker: MosquittoBroker,
    device_id: str,
    *,
    online: bool = True,
    version: str = "1.0.0",
    payload: bytes | None = None,
    prefix: str = "fl/v1",
    username: str = "publisher",
    password: str = "pub-secret",
) -> None:
    """Publish a retained status for ``device_id`` (QoS 1) and wait for the broker's PUBACK."""
    if payload is None:
        status = DeviceStatus(online=online, session_epoch=1, agent_version=version)
        payload = envelope.encode(Envelope(body=status, device_id=device_id))
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.username_pw_set(username, password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(Topics(prefix).dev_status(device_id), payload, qos=1, retain=True)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_retained_status_with_the_new_version_passes_at_once(
    broker_factory: BrokerFactory,
) -> None:
    """A device that is already back shows it in its retained status: no waiting needed."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-1", version="1.2.0")
    result = wait_for_version_result(
        broker.host, broker.port, "pi-1", "1.2.0", 10, username="watcher", password="w"
    )
    assert result.ok, result.describe()
    assert result.waited_s < 5
    assert result.last_status is not None and result.last_status.agent_version == "1.2.0"


def test_waits_through_the_restart_for_the_new_birth(broker_factory: BrokerFactory) -> None:
    """During an upgrade the retained status still shows the old version, then offline, then
    the new birth: the check must keep listening, not judge the first message."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-2", version="1.0.0")

    def restart() -> None:
        time.sleep(0.5)
        publish_status(broker, "pi-2", online=False, version="1.0.0")
        time.sleep(0.3)
        publish_status(broker, "pi-2", version="1.1.0")

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        result = wait_for_version_result(
            broker.host, broker.port, "pi-2", "1.1.0", 15, username="watcher", password="w"
        )
    finally:
        thread.join()
    assert result.ok, result.describe()
    assert result.waited_s >= 0.5


def test_old_version_times_out_and_says_what_the_device_reported(
    broker_factory: BrokerFactory,
) -> None:
    """A device that never comes back with the new version fails the check, and the message
    names the version it is stuck on, which is what the operator needs to see."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-3", version="1.0.0")
    result = wait_for_version_result(
        broker.host, broker.port, "pi-3", "2.0.0", 1.0, username="watcher", password="w"
    )
    assert not result.ok
    assert result.waited_s >= 1.0
    text = result.describe()
    assert "'pi-3'" in text and "2.0.0" in text and "online with agent version '1.0.0'" in text


def test_a_pinned_model_version_must_be_served_too(broker_factory: BrokerFactory) -> None:
    """A rollout that pins the deployed model waits for the device to serve it: the right agent
    version alone is not enough, and the message names the model version it serves."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    status = DeviceStatus(
        online=True, session_epoch=1, agent_version="1.0.0", deployed=DeployedModel(version="m2")
    )
    payload = envelope.encode(Envelope(body=status, device_id="pi-m"))
    publish_status(broker, "pi-m", payload=payload)
    kwargs = {"username": "watcher", "password": "w"}
    result = wait_for_version_result(
        broker.host, broker.port, "pi-m", "1.0.0", 1.0, model_version="m1", **kwargs
    )
    assert not result.ok
    assert "model version m1" in result.describe()
    assert "serving model version 'm2'" in result.describe()
    result = wait_for_version_result(
        broker.host, broker.port, "pi-m", "1.0.0", 5.0, model_version="m2", **kwargs
    )
    assert result.ok, result.describe()


def test_offline_with_the_new_version_is_not_healthy(broker_factory: BrokerFactory) -> None:
    """The last will of a new agent that crashed carries the new version but online=false: a
    crashed agent is not an upgraded device."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-4", online=False, version="2.0.0")
    result = wait_for_version_result(
        broker.host, broker.port, "pi-4", "2.0.0", 1.0, username="watcher", password="w"
    )
    assert not result.ok
    assert "offline with agent version '2.0.0'" in result.describe()


def test_another_devices_status_does_not_count(broker_factory: BrokerFactory) -> None:
    """Only the named device's topic is read; a payload claiming another device id on it is
    rejected, so one healthy device cannot vouch for another."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-6", version="2.0.0")
    foreign = envelope.encode(
        Envelope(
            body=DeviceStatus(online=True, session_epoch=1, agent_version="2.0.0"),
            device_id="pi-6",
        )
    )
    publish_status(broker, "pi-5", payload=foreign)
    result = wait_for_version_result(
        broker.host, broker.port, "pi-5", "2.0.0", 1.0, username="watcher", password="w"
    )
    assert not result.ok
    assert "device id 'pi-6'" in result.problem


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"\xff\x00not protobuf", "undecodable status payload"),
        (
            envelope.encode(Envelope(body=JobEvent(state=JobState.TRAINING), device_id="pi-7")),
            "JobEvent, not a DeviceStatus",
        ),
    ],
)
def test_a_bad_status_payload_is_reported_not_raised(
    broker_factory: BrokerFactory, payload: bytes, problem: str
) -> None:
    """Garbage on a status topic must not crash the rollout's check; it fails with the reason."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-7", payload=payload)
    result = wait_for_version_result(
        broker.host, broker.port, "pi-7", "1.0.0", 1.0, username="watcher", password="w"
    )
    assert not result.ok
    assert problem in result.problem


def test_wrong_password_fails_with_the_brokers_refusal(broker_factory: BrokerFactory) -> None:
    """Bad credentials are a failed check with the broker's reason, not a hang or a crash."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-8", version="1.0.0")
    result = wait_for_version_result(
        broker.host, broker.port, "pi-8", "1.0.0", 1.5, username="watcher", password="nope"
    )
    assert not result.ok
    assert "refused" in result.problem
    assert result.last_status is None


def test_unreachable_broker_fails_after_the_timeout() -> None:
    """No broker at all (it may be restarting): keep trying until the timeout, then fail."""
    start = time.monotonic()
    ok = wait_for_version("127.0.0.1", free_port(), "pi-9", "1.0.0", 1.0)
    assert not ok
    assert time.monotonic() - start < 10


def test_topic_prefix_is_honoured(broker_factory: BrokerFactory) -> None:
    """Fleets with another prefix (a second fleet on the same broker) are checked on theirs."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-10", version="3.0.0", prefix="lab/fl")
    assert wait_for_version(
        broker.host, broker.port, "pi-10", "3.0.0", 5, "watcher", "w", topics_prefix="lab/fl"
    )
    assert not wait_for_version(broker.host, broker.port, "pi-10", "3.0.0", 0.5, "watcher", "w")


def test_bad_arguments_raise_value_error() -> None:
    """A device id that cannot be a topic level is a usage error, raised before connecting."""
    with pytest.raises(ValueError, match="device id"):
        wait_for_version("127.0.0.1", 1, "a/b", "1.0.0", 1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        wait_for_version("127.0.0.1", 1, "pi", "1.0.0", -1.0)


def test_cli_exit_codes_and_password_file(
    broker_factory: BrokerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m fleet.ops.health`` is what rollout.yml runs: 0 healthy, 1 not, 2 usage error;
    the password comes from a file, never from the command line."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-11", version="1.5.0")
    secret = tmp_path / "password"
    secret.write_text("w\n")
    common = ["--host", broker.host, "--port", str(broker.port), "--device", "pi-11"]
    auth = ["--username", "watcher", "--password-file", str(secret)]
    assert main([*common, *auth, "--version", "1.5.0", "--timeout", "10"]) == 0
    assert "is online with agent version 1.5.0" in capsys.readouterr().out
    assert main([*common, *auth, "--version", "9.9.9", "--timeout", "0.5"]) == 1
    assert "did not come back with agent version 9.9.9" in capsys.readouterr().err
    missing = ["--password-file", str(tmp_path / "absent")]
    assert main([*common, "--username", "watcher", *missing, "--version", "1.5.0"]) == 2
    assert "cannot read password file" in capsys.readouterr().err


def test_module_entry_point_runs(broker_factory: BrokerFactory) -> None:
    """The exact form the playbook uses: a subprocess ``python -m fleet.ops.health``."""
    broker = broker_factory({**PUBLISHER, "watcher": "w"})
    publish_status(broker, "pi-12", version="1.0.0")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "fleet.ops.health", "--host", broker.host),
            *("--port", str(broker.port), "--device", "pi-12", "--version", "2.0.0"),
            *("--timeout", "0.5", "--username", "watcher", "--password-file", "/dev/null"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # /dev/null holds no password: the broker refuses, the check fails with exit code 1.
    assert proc.returncode == 1, proc.stderr
    assert "pi-12" in proc.stderr

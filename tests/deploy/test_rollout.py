"""Deployments over the in-memory broker: devices install and switch, canaries gate the rollout,
offline devices catch up, rollbacks return to the kept version, and every bad artefact leaves
the device serving its previous model with the reason reported."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.errors import NotFoundError
from device.wire import envelope
from device.wire.artefact import Manifest, build_artefact, read_artefact
from device.wire.messages import DeployArtefact, DeployNotice, Envelope, InferenceReply
from device.wire.topics import Topics
from fleet.deploy.rollout import CanaryFailedError, Rollout, RolloutOptions, RolloutResult
from fleet.deploy.targets import Targets, resolve_targets
from fleet.ops.registry import DeviceRegistry
from tests.deploy.helpers import Fleet, digits_sample, make_fleet, wait_for

T = Topics()
FAST = RolloutOptions(canary_timeout_s=10.0, wait_s=10.0)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, versions=3)
    yield fleet
    fleet.stop()


def _rollout(fleet: Fleet) -> Rollout:
    rollout = Rollout(fleet.store, fleet.fleet_transport(), T)
    rollout.listen()
    rollout.pump(0.3)
    return rollout


def _deploy(fleet: Fleet, data: bytes, to: str = "all", **options: object) -> RolloutResult:
    rollout = _rollout(fleet)
    targets = resolve_targets(to, DeviceRegistry(fleet.store).devices())
    return rollout.deploy(data, targets, dataclasses.replace(FAST, **options))  # type: ignore[arg-type]


def _serving(fleet: Fleet, device_id: str) -> str:
    deployed = fleet.agents[device_id].deployer.deployed()  # type: ignore[union-attr]
    return deployed.version if deployed is not None else ""


def test_every_device_installs_switches_and_reports(fleet: Fleet) -> None:
    for d in ("a", "b", "c"):
        fleet.device(d, sample=digits_sample())
    result = _deploy(fleet, fleet.export(round_=1).data)
    assert result.record.status.value == "completed"
    assert [(d.device_id, d.state) for d in result.devices] == [
        ("a", "active"),
        ("b", "active"),
        ("c", "active"),
    ]
    assert {_serving(fleet, d) for d in "abc"} == {"lab-r1-int8"}
    metrics = result.devices[0].metrics
    assert metrics["selftest_examples"] == 32 and 0.0 <= metrics["selftest_accuracy"] <= 1.0
    # The retained status carries the model: the store learns it (fleet model status).
    _rollout(fleet).pump(0.5)
    models = fleet.store.deployments.device_models()
    assert {m.version for m in models.values()} == {"lab-r1-int8"}


def test_the_fleet_publishes_the_artefact_once_for_every_device(fleet: Fleet) -> None:
    """One retained artefact for the whole fleet: the broker fans it out."""
    for d in ("a", "b", "c", "d"):
        fleet.device(d)
    data = fleet.export(round_=1).data
    rollout = _rollout(fleet)
    sent_before = rollout.transport.bytes_sent  # type: ignore[attr-defined]
    rollout.deploy(data, resolve_targets("all", DeviceRegistry(fleet.store).devices()), FAST)
    sent = rollout.transport.bytes_sent - sent_before  # type: ignore[attr-defined]
    assert len(data) < sent < 2 * len(data)


def test_a_failing_canary_stops_the_rollout(fleet: Fleet) -> None:
    """The canary's data has other classes: it refuses, the rollout stops, the notice is
    withdrawn and the other devices never install the version."""
    fleet.device("a", sample=digits_sample(), classes=tuple(f"c{i}" for i in range(10)))
    fleet.device("b", sample=digits_sample())
    fleet.device("c", sample=digits_sample())
    with pytest.raises(CanaryFailedError, match=r"canary a failed: .*classes"):
        _deploy(fleet, fleet.export(round_=1).data, canary_percent=30.0)
    record = fleet.store.deployments.list_deployments()[0]
    assert record.status.value == "stopped" and "canary a failed" in record.reason
    assert fleet.broker.retained(T.deploy_notice(record.deployment_id)) is None
    assert fleet.broker.retained(T.deploy_artefact(record.deployment_id)) is None
    states = {d.device_id: d.state for d in fleet.store.deployments.devices(record.deployment_id)}
    assert states == {"a": "failed", "b": "pending", "c": "pending"}
    assert _serving(fleet, "b") == "" and _serving(fleet, "c") == ""


def test_a_silent_canary_stops_the_rollout(fleet: Fleet) -> None:
    """A canary that never reports (it cannot get the artefact) is a failed canary."""
    fleet.device("a")
    fleet.device("b")
    fleet.broker.kick("a")  # cut off: it never hears of the deployment
    with pytest.raises(CanaryFailedError, match="did not report active"):
        _rollout(fleet).deploy(
            fleet.export(round_=1).data,
            Targets(("a",), False, "a"),
            dataclasses.replace(FAST, canary_percent=100.0, canary_timeout_s=1.0),
        )


def test_a_device_offline_at_publish_time_installs_when_it_returns(fleet: Fleet) -> None:
    fleet.device("a")
    late = fleet.device("late")  # known to the registry ...
    _rollout(fleet).pump(0.3)
    late.stop()  # ... then offline
    result = _deploy(fleet, fleet.export(round_=1).data, wait_s=1.0)
    states = {d.device_id: d.state for d in result.devices}
    assert states == {"a": "active", "late": "pending"}
    fleet.device("late")  # comes back: a new agent on the same models directory
    wait_for(lambda: _serving(fleet, "late") == "lab-r1-int8", what="late device to switch")
    rollout = _rollout(fleet)
    rollout.pump(0.5)
    rows = {
        d.device_id: d.state for d in fleet.store.deployments.devices(result.record.deployment_id)
    }
    assert rows["late"] == "active"


def test_a_device_never_seen_before_gets_a_deployment_to_all(fleet: Fleet) -> None:
    fleet.device("a")
    _deploy(fleet, fleet.export(round_=1).data)
    fleet.device("newcomer")
    wait_for(lambda: _serving(fleet, "newcomer") == "lab-r1-int8", what="newcomer to switch")


def test_rollback_returns_to_the_kept_version(fleet: Fleet) -> None:
    fleet.device("a")
    fleet.device("b")
    _deploy(fleet, fleet.export(round_=1).data)
    _deploy(fleet, fleet.export(round_=2).data)
    assert {_serving(fleet, d) for d in "ab"} == {"lab-r2-int8"}
    result = _rollout(fleet).rollback(options=FAST)
    assert result.record.kind == "rollback" and result.record.version == "lab-r1-int8"
    assert {d.state for d in result.devices} == {"active"}
    assert {_serving(fleet, d) for d in "ab"} == {"lab-r1-int8"}
    deployed = fleet.agents["a"].deployer.deployed()  # type: ignore[union-attr]
    assert deployed is not None and deployed.previous_version == "lab-r2-int8"


def test_rollback_to_a_named_version_and_with_nothing_earlier(fleet: Fleet) -> None:
    fleet.device("a")
    rollout = _rollout(fleet)
    with pytest.raises(NotFoundError, match="nothing was ever deployed"):
        rollout.rollback(options=FAST)
    _deploy(fleet, fleet.export(round_=1).data)
    with pytest.raises(NotFoundError, match="no earlier version to roll back to"):
        _rollout(fleet).rollback(options=FAST)
    with pytest.raises(NotFoundError, match="never deployed"):
        _rollout(fleet).rollback("lab-r9-int8", options=FAST)


def test_a_restarted_device_resumes_an_interrupted_download(fleet: Fleet) -> None:
    """The notice arrives, the device restarts before the artefact does: the new agent reads
    its pending deployment from disk and fetches the artefact afresh."""
    agent = fleet.device("a")
    data = fleet.export(round_=1).data
    rollout = _rollout(fleet)
    record = rollout._record(
        "deploy",
        read_artefact(data),
        data,
        Targets(("a",), False, "a"),
        {"a": "target"},
        0.0,
    )
    rollout._publish(record, None, ("a",), False)  # the notice only
    store = agent.deployer.store  # type: ignore[union-attr]
    wait_for(lambda: store.state().pending is not None, what="pending deployment")
    agent.stop()
    payload = envelope.encode(Envelope(body=DeployArtefact(data)))
    rollout.transport.publish(T.deploy_artefact(record.deployment_id), payload, retain=True)
    fleet.device("a")
    wait_for(lambda: _serving(fleet, "a") == "lab-r1-int8", what="resumed install")
    assert store.state().pending is None


def test_a_download_that_never_comes_fails_after_its_retries(fleet: Fleet) -> None:
    agent = fleet.device("a", download_timeout_s=0.3, retries=1)
    fleet.device("b")
    _deploy(fleet, fleet.export(round_=1).data)
    data = fleet.export(round_=2).data
    rollout = _rollout(fleet)
    record = rollout._record(
        "deploy", read_artefact(data), data, Targets(("a",), False, "a"), {"a": "target"}, 0.0
    )
    rollout._publish(record, None, ("a",), False)  # no artefact ever
    rows = rollout.wait(record.deployment_id, ["a"], 10.0)
    assert rows["a"].state == "failed" and "not received in 2 attempts" in rows["a"].reason
    assert _serving(fleet, "a") == "lab-r1-int8"
    assert agent.deployer.store.state().pending is None  # type: ignore[union-attr]


def _publish_raw(fleet: Fleet, notice_data: bytes, artefact_data: bytes, dep: str) -> Rollout:
    """A deployment of ``artefact_data`` whose notice announces ``notice_data``'s digest."""
    rollout = _rollout(fleet)
    notice = DeployNotice(
        sequence=99,
        version="lab-r2-int8",
        artefact_sha256=hashlib.sha256(notice_data).digest(),
        artefact_bytes=len(notice_data),
        devices=("a",),
    )
    fleet.store.deployments.create(
        dep,
        kind="deploy",
        version=notice.version,
        artefact_sha256=fleet.store.write_blob(notice_data),
        artefact_bytes=len(notice_data),
        manifest={},
        target="a",
        all_devices=False,
        devices={"a": "target"},
        status="rolling_out",
    )
    t = rollout.transport
    t.publish(
        T.deploy_artefact(dep),
        envelope.encode(Envelope(body=DeployArtefact(artefact_data))),
        retain=True,
    )
    t.publish(T.deploy_notice(dep), envelope.encode(Envelope(body=notice)), retain=True)
    return rollout


def _failure(fleet: Fleet, notice_data: bytes, artefact_data: bytes) -> str:
    fleet.device("a", sample=digits_sample())
    _deploy(fleet, fleet.export(round_=1).data)
    rollout = _publish_raw(fleet, notice_data, artefact_data, "dbad")
    rows = rollout.wait("dbad", ["a"], 10.0)
    assert rows["a"].state == "failed"
    assert _serving(fleet, "a") == "lab-r1-int8"  # the previous version keeps serving
    return rows["a"].reason


def test_an_artefact_that_differs_from_its_notice_is_refused(fleet: Fleet) -> None:
    good = fleet.export(round_=2).data
    other = fleet.export(round_=2, values="fp16", version="lab-r2-int8").data
    assert "does not match the notice" in _failure(fleet, good, other)


def test_a_truncated_artefact_is_refused(fleet: Fleet) -> None:
    data = fleet.export(round_=2).data
    reason = _failure(fleet, data[:-10], data[:-10])
    assert "truncated or not a zip" in reason


def test_an_untrusted_signature_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    from fleet.deploy.signing import generate_key

    stranger = generate_key(tmp_path / "stranger")
    artefact = read_artefact(fleet.export(round_=2).data)
    forged = build_artefact(
        dataclasses.replace(artefact.manifest, signer_key_id=stranger.key_id),
        artefact.content,
        stranger.sign,
    )
    assert "does not trust" in _failure(fleet, forged, forged)


def test_an_unknown_architecture_is_refused(fleet: Fleet) -> None:
    artefact = read_artefact(fleet.export(round_=2).data)
    manifest = dataclasses.replace(artefact.manifest, model="no_such_model")
    data = build_artefact(manifest, artefact.content, fleet.key.sign)
    assert "unknown architecture" in _failure(fleet, data, data)


def test_classes_that_disagree_with_the_data_are_refused(fleet: Fleet) -> None:
    artefact = read_artefact(fleet.export(round_=2).data)
    manifest = Manifest.from_json({**artefact.manifest.to_json(), "classes": ["x", "y", "z"]})
    data = build_artefact(manifest, artefact.content, fleet.key.sign)
    assert "classes" in _failure(fleet, data, data)


def test_the_failure_reason_reaches_the_store_through_the_retained_status(fleet: Fleet) -> None:
    """Nobody listened while the device failed: its retained status still tells why."""
    artefact = read_artefact(fleet.export(round_=2).data)
    manifest = dataclasses.replace(artefact.manifest, model="no_such_model")
    data = build_artefact(manifest, artefact.content, fleet.key.sign)
    _failure(fleet, data, data)
    fleet.store.deployments.record_event("dbad", "a", "pending", reported_at=0.0)  # stale: kept
    rows = {d.device_id: d for d in fleet.store.deployments.devices("dbad")}
    assert rows["a"].state == "failed"
    deployed = fleet.agents["a"].deployer.deployed()  # type: ignore[union-attr]
    assert deployed is not None and deployed.last_deployment_id == "dbad"
    assert "unknown architecture" in deployed.last_reason


def test_remote_inference_answers_on_the_reply_topic(fleet: Fleet) -> None:
    import numpy as np

    from device.wire.memory import MemoryTransport
    from device.wire.messages import InferenceRequest

    fleet.device("a", remote_inference=True)
    fleet.device("b")  # remote inference off: never answers
    _deploy(fleet, fleet.export(round_=1).data)
    client = MemoryTransport(fleet.broker, "app")
    client.connect()
    client.subscribe(T.all_infer_replies())
    request = InferenceRequest(inputs=np.zeros((2, 1, 8, 8), dtype=np.float32))
    for device in ("a", "b"):
        client.publish(
            T.dev_infer_request(device),
            envelope.encode(Envelope(body=request, correlation_id=f"q-{device}")),
        )
    message = client.get(timeout_s=5.0)
    assert message is not None and message.topic == T.dev_infer_reply("a")
    env = envelope.decode(message.payload)
    assert env.correlation_id == "q-a" and isinstance(env.body, InferenceReply)
    assert env.body.logits is not None and env.body.logits.shape == (2, 10)
    assert env.body.version == "lab-r1-int8"
    assert client.get(timeout_s=0.5) is None

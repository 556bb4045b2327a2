"""The ACL lets a device follow deployments and, when it enables it, answer inference requests,
and nothing of another device's inference topics."""

from __future__ import annotations

from device.wire.topics import Topics, chunk_topic, topic_matches
from fleet.ops.enroll import acl_rules

T = Topics()


def _allowed(device_id: str, access: str, topic: str) -> bool:
    return any(
        a in (access, "readwrite") and topic_matches(p.replace("%u", device_id), topic)
        for a, p in acl_rules().device_patterns
    )


def test_a_device_reads_every_deployment_and_its_chunks() -> None:
    for topic in (
        T.deploy_notice("d1"),
        T.deploy_artefact("d1"),
        chunk_topic(T.deploy_artefact("d1"), 3),
        chunk_topic(T.deploy_notice("d1"), 0),
    ):
        assert _allowed("dev-a", "read", topic), topic
        assert not _allowed("dev-a", "write", topic), topic


def test_a_device_answers_only_its_own_inference_requests() -> None:
    me, other = "dev-a", "dev-b"
    assert _allowed(me, "read", T.dev_infer_request(me))
    assert _allowed(me, "write", T.dev_infer_reply(me))
    assert _allowed(me, "write", chunk_topic(T.dev_infer_reply(me), 1))
    assert not _allowed(me, "write", T.dev_infer_request(me))
    assert not _allowed(me, "read", T.dev_infer_reply(me))
    for topic in (T.dev_infer_request(other), T.dev_infer_reply(other)):
        assert not _allowed(me, "read", topic) and not _allowed(me, "write", topic), topic


def test_the_deployment_filters_a_device_subscribes_are_its_topics() -> None:
    """The notice filter (with its chunk filter) never matches an artefact: a device does not
    receive every artefact just by following notices."""
    assert topic_matches(T.all_deploy_notices(), T.deploy_notice("d1"))
    assert not topic_matches(T.all_deploy_notices(), T.deploy_artefact("d1"))
    assert not topic_matches(f"{T.all_deploy_notices()}/+", T.deploy_artefact("d1"))
    parsed = T.parse(chunk_topic(T.deploy_artefact("d-7"), 2))
    assert (parsed.kind, parsed.deployment_id, parsed.chunk) == ("deploy_artefact", "d-7", 2)
    assert T.parse(T.dev_infer_reply("x")).device_id == "x"

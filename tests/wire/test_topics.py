"""Topic strings: the DESIGN section 4 table, parsing, id validation and filter matching."""

from __future__ import annotations

import pytest

from device.errors import DecodeError
from device.wire.topics import (
    ParsedTopic,
    TopicKind,
    Topics,
    chunk_filter,
    chunk_topic,
    split_chunk_topic,
    split_shared,
    topic_matches,
    validate_filter,
)

T = Topics()


def test_topics_follow_the_design_table() -> None:
    """Devices, fleet manager, ACL templates and docs all assume exactly these strings."""
    assert T.dev_status("pi-7") == "fl/v1/dev/pi-7/status"
    assert T.dev_cmd("pi-7") == "fl/v1/dev/pi-7/cmd"
    assert T.dev_events("pi-7") == "fl/v1/dev/pi-7/events"
    assert T.dev_update("pi-7", "run-a", 12) == "fl/v1/dev/pi-7/up/run-a/12"
    assert T.run_model("run-a") == "fl/v1/runs/run-a/model"
    assert T.fleet_status() == "fl/v1/fleet/status"


def test_prefix_is_configurable() -> None:
    """Two deployments (or test runs) on one broker are kept apart by the prefix."""
    topics = Topics("lab/fl/v2")
    assert topics.dev_cmd("d") == "lab/fl/v2/dev/d/cmd"
    assert topics.parse("lab/fl/v2/dev/d/cmd") == ParsedTopic(TopicKind.DEV_CMD, device_id="d")
    with pytest.raises(DecodeError):
        topics.parse("fl/v1/dev/d/cmd")


@pytest.mark.parametrize("prefix", ["", "/fl", "fl/", "fl//v1", "fl/+", "fl/#", "$SYS/x"])
def test_bad_prefixes_are_rejected(prefix: str) -> None:
    """A prefix with wildcards or empty levels would make every topic wrong."""
    with pytest.raises(ValueError):
        Topics(prefix)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("fl/v1/dev/pi-7/status", ParsedTopic(TopicKind.DEV_STATUS, device_id="pi-7")),
        ("fl/v1/dev/pi-7/cmd", ParsedTopic(TopicKind.DEV_CMD, device_id="pi-7")),
        ("fl/v1/dev/pi-7/events", ParsedTopic(TopicKind.DEV_EVENTS, device_id="pi-7")),
        (
            "fl/v1/dev/pi-7/up/run-a/12",
            ParsedTopic(TopicKind.DEV_UPDATE, device_id="pi-7", run_id="run-a", round=12),
        ),
        (
            "fl/v1/dev/pi-7/up/run-a/12/3",
            ParsedTopic(TopicKind.DEV_UPDATE, device_id="pi-7", run_id="run-a", round=12, chunk=3),
        ),
        ("fl/v1/runs/run-a/model", ParsedTopic(TopicKind.RUN_MODEL, run_id="run-a")),
        ("fl/v1/runs/run-a/model/0", ParsedTopic(TopicKind.RUN_MODEL, run_id="run-a", chunk=0)),
        ("fl/v1/fleet/status", ParsedTopic(TopicKind.FLEET_STATUS)),
    ],
)
def test_parse_recovers_the_parts(topic: str, expected: ParsedTopic) -> None:
    """The fleet manager routes every message by what ``parse`` says about its topic."""
    assert T.parse(topic) == expected


def test_parse_inverts_the_builders() -> None:
    """Whatever is built can be parsed back to the same ids (round trip)."""
    built = T.dev_update("dev.01:a", "2024-05-run_x", 2**40)
    assert T.parse(built) == ParsedTopic(
        TopicKind.DEV_UPDATE, device_id="dev.01:a", run_id="2024-05-run_x", round=2**40
    )
    assert T.parse(chunk_topic(built, 7)).chunk == 7


def test_kind_compares_equal_to_its_name() -> None:
    """Callers dispatch on ``parsed.kind == "dev_update"``; the enum must support that."""
    assert T.parse("fl/v1/dev/d/up/r/1").kind == "dev_update"


@pytest.mark.parametrize(
    "topic",
    [
        "fl/v1/dev/d/unknown",
        "fl/v1/dev/d",
        "fl/v1/dev//status",
        "fl/v1/dev/d/up/r",
        "fl/v1/dev/d/up/r/x",
        "fl/v1/dev/d/up/r/01",
        "fl/v1/dev/d/up/r/-1",
        "fl/v1/dev/d/up/r/1/x",
        "fl/v1/dev/d/up/r/1/2/3",
        "fl/v1/runs/r/model/extra",
        "fl/v1/fleet/status/x",
        "fl/v2/dev/d/cmd",
        "other/dev/d/cmd",
        "",
    ],
)
def test_malformed_topics_are_rejected_with_bad_topic(topic: str) -> None:
    """A device must not be able to smuggle a message past routing with an odd topic; the
    error is a DecodeError (a ValueError) naming the topic."""
    with pytest.raises(DecodeError, match="topic") as info:
        T.parse(topic)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "tab\there", "x" * 129, "nul\x00"])
def test_building_with_a_bad_id_raises(bad: str) -> None:
    """An id with a separator or wildcard would address other devices' topics (or all of
    them): refuse to build such a topic."""
    with pytest.raises(ValueError):
        T.dev_cmd(bad)
    with pytest.raises(ValueError):
        T.dev_update("d", bad, 1)


def test_negative_or_non_int_rounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        T.dev_update("d", "r", -1)
    with pytest.raises(ValueError):
        T.dev_update("d", "r", True)


def test_filters_match_exactly_their_topics() -> None:
    """The fleet manager's subscriptions must get every device's messages of one kind (with
    update chunks) and nothing else."""
    update = T.dev_update("d1", "r1", 3)
    assert topic_matches(T.all_updates(), update)
    assert topic_matches(T.all_updates(), chunk_topic(update, 0))
    assert topic_matches(T.all_updates("r1"), update)
    assert not topic_matches(T.all_updates("r2"), update)
    assert topic_matches(T.all_status(), T.dev_status("d1"))
    assert not topic_matches(T.all_status(), T.dev_events("d1"))
    assert topic_matches(T.all_events(), T.dev_events("d1"))
    assert not topic_matches(T.all_events(), T.dev_cmd("d1"))
    assert topic_matches(T.round_updates("r1", 3), update)
    assert topic_matches(T.round_updates("r1", 3), chunk_topic(update, 0))
    assert not topic_matches(T.round_updates("r1", 0), update)
    assert not topic_matches(T.round_updates("r1", 3), T.dev_update("d1", "r1", 30))
    with pytest.raises(ValueError):
        T.round_updates("r1", -1)
    assert T.shared_updates("agg") == "$share/agg/fl/v1/dev/+/up/#"
    assert topic_matches(T.shared_updates("agg"), update)


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # '+' matches an empty level
        ("a/#", "a", True),  # '#' includes the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/broker", False),
        ("+/x", "$SYS/x", False),
        ("$share/g/a/+", "a/b", True),
    ],
)
def test_topic_matching_follows_mqtt(pattern: str, topic: str, matches: bool) -> None:
    """The in-memory broker and the chunk receiver route by this; it must agree with MQTT."""
    assert topic_matches(pattern, topic) is matches


@pytest.mark.parametrize("pattern", ["a/#/b", "a/b#", "a+/b", "", "$share/g", "$share//a"])
def test_malformed_filters_are_rejected(pattern: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(pattern)


def test_chunk_topic_helpers_agree() -> None:
    """The sender puts chunk i on ``{topic}/{i}``; the receiver must find base and index, and
    a subscriber to ``topic`` needs ``topic/+`` (but ``.../#`` already covers chunks)."""
    assert split_chunk_topic(chunk_topic("x/y", 12)) == ("x/y", 12)
    assert split_chunk_topic("x/y") is None
    assert split_chunk_topic("x/012") is None
    assert chunk_filter("fl/v1/runs/r/model") == "fl/v1/runs/r/model/+"
    assert chunk_filter(T.all_updates()) is None
    assert split_shared("$share/agg/a/#") == ("agg", "a/#")
    assert split_shared("a/#") == (None, "a/#")

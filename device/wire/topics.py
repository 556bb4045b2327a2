"""Every MQTT topic string of SparseFleet, built and parsed in one place (DESIGN section 4).

| method                         | topic                                  | QoS / retain          |
|--------------------------------|----------------------------------------|-----------------------|
| ``dev_status(d)``              | ``{prefix}/dev/{d}/status``            | 1, retained; will     |
| ``dev_cmd(d)``                 | ``{prefix}/dev/{d}/cmd``               | 1                     |
| ``dev_events(d)``              | ``{prefix}/dev/{d}/events``            | 1                     |
| ``dev_update(d, run, round)``  | ``{prefix}/dev/{d}/up/{run}/{round}``  | 1, never retained     |
| ``run_model(run)``             | ``{prefix}/runs/{run}/model``          | 1, retained           |
| ``run_patch(run)``             | ``{prefix}/runs/{run}/patch``          | 1, retained           |
| ``fleet_status()``             | ``{prefix}/fleet/status``              | 1, retained; will     |
| ``agg_close(run)``             | ``{prefix}/agg/{run}/close``           | 1, never retained     |
| ``agg_partial(run, worker)``   | ``{prefix}/agg/{run}/partial/{worker}``| 1, never retained     |
| ``deploy_notice(dep)``         | ``{prefix}/deploy/{dep}/notice``       | 1, retained           |
| ``deploy_artefact(dep)``       | ``{prefix}/deploy/{dep}/artefact``     | 1, retained           |
| ``dev_infer_request(d)``       | ``{prefix}/dev/{d}/infer/req``         | 1, never retained     |
| ``dev_infer_reply(d)``         | ``{prefix}/dev/{d}/infer/res``         | 1, never retained     |

The two ``agg`` topics are the sharded-aggregation handover (``fleet.runtime.aggregator``): the
coordinator asks every worker for its partial sums of a round on ``agg_close``; each worker
answers on its own ``agg_partial`` topic. Never retained: a retained request would be replayed
to every worker that subscribes later.

The ``deploy`` topics carry model deployments (docs/deployment.md): per deployment, a small
retained notice (which devices, which version) and the retained artefact, published once for the
whole fleet; notice and artefact are separate levels so that a subscription to every notice
(``all_deploy_notices``, with its chunk filter) never receives an artefact. ``infer`` is a
device's optional remote-inference request/response pair.

A payload too large for the broker travels as a manifest on the topic above and chunk ``i`` on
``{topic}/{i}`` (``chunk_topic``); ``parse`` reports the chunk index of such a topic.

Identifiers (device, run, shared-subscription group) are validated when a topic is built: they are
one topic level, so they must be non-empty, at most ``MAX_ID_BYTES`` UTF-8 bytes, and contain no
``/``, ``+``, ``#`` or control characters. Building with a bad identifier raises ``ValueError``;
parsing a malformed topic from the network raises ``DecodeError`` (a ``ValueError``) with reason
``"bad_topic"``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from device.errors import DecodeError

MAX_ID_BYTES = 128
"""Longest device, run or group id in UTF-8 bytes (mosquitto accepts client ids up to 65535)."""

MAX_ROUND = 2**63 - 1
MAX_CHUNK_INDEX = 2**32 - 1  # ``Chunk.index`` is a uint32 on the wire

_FORBIDDEN = re.compile(r"[/+#\x00-\x1f\x7f]")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class TopicKind(enum.StrEnum):
    """What a topic carries; the values double as the names used in logs and metrics."""

    DEV_STATUS = "dev_status"
    DEV_CMD = "dev_cmd"
    DEV_EVENTS = "dev_events"
    DEV_UPDATE = "dev_update"
    RUN_MODEL = "run_model"
    RUN_PATCH = "run_patch"
    FLEET_STATUS = "fleet_status"
    DEPLOY_NOTICE = "deploy_notice"
    DEPLOY_ARTEFACT = "deploy_artefact"
    DEV_INFER_REQUEST = "dev_infer_request"
    DEV_INFER_REPLY = "dev_infer_reply"


@dataclass(frozen=True)
class ParsedTopic:
    """The parts of a topic. ``round`` is 0 and ids are empty where the kind has none;
    ``chunk`` is the chunk index for ``{topic}/{i}`` chunk topics, else ``None``."""

    kind: TopicKind
    device_id: str = ""
    run_id: str = ""
    round: int = 0
    chunk: int | None = None
    deployment_id: str = ""

    @property
    def is_chunk(self) -> bool:
        return self.chunk is not None


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it can be one topic level; raise ``ValueError`` saying why not."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    size = len(value.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise ValueError(f"{what} {value[:40]!r}... is {size} bytes; at most {MAX_ID_BYTES}")
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        raise ValueError(
            f"{what} {value!r} contains {bad.group()!r}; ids cannot contain '/', '+', '#' "
            "or control characters"
        )
    return value


def validate_prefix(prefix: str) -> str:
    """A topic prefix: one or more non-empty levels, no wildcards, not a ``$`` system topic."""
    if not prefix:
        raise ValueError("topic prefix must not be empty")
    if prefix.startswith("$"):
        raise ValueError(f"topic prefix {prefix!r} must not start with '$' (reserved by brokers)")
    for level in prefix.split("/"):
        if not level:
            raise ValueError(f"topic prefix {prefix!r} has an empty level")
        if "+" in level or "#" in level:
            raise ValueError(f"topic prefix {prefix!r} contains a wildcard")
    return prefix


def _validate_round(round_: int) -> int:
    if isinstance(round_, bool) or not isinstance(round_, int):
        raise ValueError(f"round must be an int, got {type(round_).__name__}")
    if not 0 <= round_ <= MAX_ROUND:
        raise ValueError(f"round must be in 0..{MAX_ROUND}, got {round_}")
    return round_


def chunk_topic(topic: str, index: int) -> str:
    """The topic of chunk ``index`` (0-based) of a payload published on ``topic``."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_CHUNK_INDEX:
        raise ValueError(f"chunk index must be an int in 0..{MAX_CHUNK_INDEX}, got {index!r}")
    return f"{topic}/{index}"


def split_chunk_topic(topic: str) -> tuple[str, int] | None:
    """``(base topic, index)`` when the last level of ``topic`` is a chunk index, else ``None``."""
    base, sep, last = topic.rpartition("/")
    if not sep or not base or not _DECIMAL.fullmatch(last):
        return None
    index = int(last)
    if index > MAX_CHUNK_INDEX:
        return None
    return base, index


def chunk_filter(pattern: str) -> str | None:
    """The extra filter a subscriber needs to receive the chunks of messages matching
    ``pattern``, or ``None`` when ``pattern`` already covers them (it ends in ``#``)."""
    if pattern == "#" or pattern.endswith("/#"):
        return None
    return f"{pattern}/+"


def split_shared(pattern: str) -> tuple[str | None, str]:
    """``("group", "filter")`` for ``$share/group/filter``; ``(None, pattern)`` otherwise."""
    if not pattern.startswith("$share/"):
        return None, pattern
    parts = pattern.split("/", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"malformed shared subscription {pattern!r}; expected $share/group/filter")
    group = parts[1]
    if "+" in group or "#" in group:
        raise ValueError(f"shared subscription group {group!r} must not contain wildcards")
    return group, parts[2]


def validate_filter(pattern: str) -> str:
    """Check an MQTT topic filter (``+`` a whole level, ``#`` only as the whole last level)."""
    _, filt = split_shared(pattern)
    if not filt:
        raise ValueError("topic filter must not be empty")
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {pattern!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {pattern!r}: '+' must be a whole level")
    return pattern


def validate_topic_name(topic: str) -> str:
    """Check a topic to publish on: non-empty, no wildcards, no NUL."""
    if not topic:
        raise ValueError("topic must not be empty")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"cannot publish on {topic!r}: topic names contain no wildcards or NUL")
    return topic


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter ``pattern`` (``$share/g/`` is ignored).

    As in MQTT, wildcards at the first level do not match topics starting with ``$``.
    """
    _, filt = split_shared(pattern)
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f_levels = filt.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # "a/#" also matches "a" itself
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass(frozen=True)
class Topics:
    """Topic builder and parser for one prefix (default ``fl/v1``)."""

    prefix: str = "fl/v1"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # -- topics -------------------------------------------------------------------------------

    def dev_status(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{validate_id(device_id, 'device id')}/status"

    def dev_cmd(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{validate_id(device_id, 'device id')}/cmd"

    def dev_events(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{validate_id(device_id, 'device id')}/events"

    def dev_update(self, device_id: str, run_id: str, round_: int) -> str:
        d = validate_id(device_id, "device id")
        r = validate_id(run_id, "run id")
        return f"{self.prefix}/dev/{d}/up/{r}/{_validate_round(round_)}"

    def run_model(self, run_id: str) -> str:
        """Fleet -> devices, retained: the run's current model, self-contained."""
        return f"{self.prefix}/runs/{validate_id(run_id, 'run id')}/model"

    def run_patch(self, run_id: str) -> str:
        """Fleet -> devices, retained: the same version as ``run_model``, its positions against
        the previous version's masks where that is smaller (docs/protocol.md, "Models")."""
        return f"{self.prefix}/runs/{validate_id(run_id, 'run id')}/patch"

    def fleet_status(self) -> str:
        return f"{self.prefix}/fleet/status"

    def agg_close(self, run_id: str) -> str:
        """Coordinator -> every aggregator worker: hand over your partial sums of a round."""
        return f"{self.prefix}/agg/{validate_id(run_id, 'run id')}/close"

    def agg_partial(self, run_id: str, worker_id: str) -> str:
        """Aggregator worker -> coordinator: where its partial sums of a round are."""
        r = validate_id(run_id, "run id")
        return f"{self.prefix}/agg/{r}/partial/{validate_id(worker_id, 'worker id')}"

    def deploy_notice(self, deployment_id: str) -> str:
        """Fleet -> devices, retained: which devices should serve this deployment's artefact."""
        return f"{self.prefix}/deploy/{validate_id(deployment_id, 'deployment id')}/notice"

    def deploy_artefact(self, deployment_id: str) -> str:
        """Fleet -> devices, retained: the deployment's artefact file (chunked when large)."""
        return f"{self.prefix}/deploy/{validate_id(deployment_id, 'deployment id')}/artefact"

    def dev_infer_request(self, device_id: str) -> str:
        """Remote inference requests to one device (only when it enables remote inference)."""
        return f"{self.prefix}/dev/{validate_id(device_id, 'device id')}/infer/req"

    def dev_infer_reply(self, device_id: str) -> str:
        """A device's replies to remote inference requests."""
        return f"{self.prefix}/dev/{validate_id(device_id, 'device id')}/infer/res"

    # -- filters ------------------------------------------------------------------------------

    def all_status(self) -> str:
        return f"{self.prefix}/dev/+/status"

    def all_events(self) -> str:
        return f"{self.prefix}/dev/+/events"

    def all_updates(self, run_id: str | None = None) -> str:
        """Every device's updates (and their chunks), of one run or of all runs."""
        if run_id is None:
            return f"{self.prefix}/dev/+/up/#"
        return f"{self.prefix}/dev/+/up/{validate_id(run_id, 'run id')}/#"

    def round_updates(self, run_id: str, round_: int) -> str:
        """Every device's updates (and their chunks) of one round of one run; the sharded fleet
        manager takes round 0 (PruneFL's initial job) itself and leaves the others to workers."""
        return f"{self.prefix}/dev/+/up/{validate_id(run_id, 'run id')}/{_validate_round(round_)}/#"

    def shared_updates(self, group: str, run_id: str | None = None) -> str:
        """``all_updates`` as a shared subscription: each update goes to one member of ``group``.

        The broker spreads the chunks of one payload over the members, so no member can
        reassemble a chunked update alone: subscribers reassemble through a shared store
        (``fleet.runtime.aggregator``, ``ReassemblyLimits.deliver_shared_chunks``;
        docs/protocol.md).
        """
        return f"$share/{validate_id(group, 'group')}/{self.all_updates(run_id)}"

    def all_deploy_notices(self) -> str:
        """Every deployment's notice (a device's filter; artefacts are a separate level)."""
        return f"{self.prefix}/deploy/+/notice"

    def all_infer_replies(self) -> str:
        """Every device's remote-inference replies (and their chunks)."""
        return f"{self.prefix}/dev/+/infer/res/#"

    def all_agg_partials(self, run_id: str) -> str:
        """Every aggregator worker's handover notices of one run (the coordinator's filter)."""
        return f"{self.prefix}/agg/{validate_id(run_id, 'run id')}/partial/+"

    # -- parsing ------------------------------------------------------------------------------

    def parse(self, topic: str) -> ParsedTopic:
        """Split a topic built by this class (or one of its chunk topics) into its parts.

        Raises ``DecodeError(reason="bad_topic")`` for anything else, naming the topic.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise _bad(topic, f"does not start with {head!r}")
        levels = topic[len(head) :].split("/")
        parsed = _parse_levels(topic, levels)
        if parsed is not None:
            return parsed
        # Not a plain topic: maybe a chunk topic "{topic}/{i}".
        if len(levels) > 1 and _DECIMAL.fullmatch(levels[-1]):
            base = _parse_levels(topic, levels[:-1])
            index = int(levels[-1])
            if base is not None and index <= MAX_CHUNK_INDEX:
                return ParsedTopic(
                    base.kind, base.device_id, base.run_id, base.round, index, base.deployment_id
                )
        raise _bad(topic, "matches no SparseFleet topic")


def _bad(topic: str, why: str) -> DecodeError:
    return DecodeError(f"topic {topic!r} {why}", reason="bad_topic")


def _id_level(topic: str, value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except ValueError as exc:
        raise _bad(topic, f"has a bad {what}: {exc}") from None


def _parse_levels(topic: str, levels: list[str]) -> ParsedTopic | None:
    n = len(levels)
    if n == 3 and levels[0] == "dev" and levels[2] in ("status", "cmd", "events"):
        kind = {
            "status": TopicKind.DEV_STATUS,
            "cmd": TopicKind.DEV_CMD,
            "events": TopicKind.DEV_EVENTS,
        }[levels[2]]
        return ParsedTopic(kind, device_id=_id_level(topic, levels[1], "device id"))
    if n == 5 and levels[0] == "dev" and levels[2] == "up":
        if not _DECIMAL.fullmatch(levels[4]) or int(levels[4]) > MAX_ROUND:
            raise _bad(topic, f"has round {levels[4]!r}; expected a decimal integer")
        return ParsedTopic(
            TopicKind.DEV_UPDATE,
            device_id=_id_level(topic, levels[1], "device id"),
            run_id=_id_level(topic, levels[3], "run id"),
            round=int(levels[4]),
        )
    if n == 3 and levels[0] == "runs" and levels[2] in ("model", "patch"):
        kind = TopicKind.RUN_MODEL if levels[2] == "model" else TopicKind.RUN_PATCH
        return ParsedTopic(kind, run_id=_id_level(topic, levels[1], "run id"))
    if levels == ["fleet", "status"]:
        return ParsedTopic(TopicKind.FLEET_STATUS)
    if n == 3 and levels[0] == "deploy" and levels[2] in ("notice", "artefact"):
        kind = TopicKind.DEPLOY_NOTICE if levels[2] == "notice" else TopicKind.DEPLOY_ARTEFACT
        return ParsedTopic(kind, deployment_id=_id_level(topic, levels[1], "deployment id"))
    if n == 4 and levels[0] == "dev" and levels[2] == "infer" and levels[3] in ("req", "res"):
        kind = TopicKind.DEV_INFER_REQUEST if levels[3] == "req" else TopicKind.DEV_INFER_REPLY
        return ParsedTopic(kind, device_id=_id_level(topic, levels[1], "device id"))
    return None

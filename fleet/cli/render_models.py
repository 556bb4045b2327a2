"""The models devices can build, as ``fleet status`` and ``fleet devices`` show them.

A device announces the models it can build with their architecture digests
(``DeviceInfo.models``); one that announces nothing is an older agent, taken to offer the
built-ins (``fleet.runtime.selection.can_build``).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from fleet.ops.registry import DeviceInfo


def models_cell(info: DeviceInfo, limit: int = 3) -> str:
    """The models a device can build, for a table cell: up to ``limit`` names (``+N more``);
    ``(built-ins)`` for a device that announces none (an older agent)."""
    if not info.models:
        return "(built-ins)"
    names = [offer.model.text for offer in info.models]
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")


def models_detail(info: DeviceInfo) -> str:
    """Every model a device can build with its architecture digest (16 hex digits), one a line."""
    if not info.models:
        return "not announced (an older agent: the built-in models)"
    return "\n".join(
        f"{offer.model.text}  {offer.architecture_digest.hex()[:16] or '-'}"
        for offer in info.models
    )


def model_lines(devices: Sequence[DeviceInfo], limit: int = 8) -> list[Text]:
    """Which devices can build which models, one line per distinct set of offered models
    (``models mlp, mnist_cnn: pi-1, pi-2``), the largest group first; at most ``limit`` device
    ids a line (``+N more``)."""
    groups: dict[str, list[str]] = {}
    for d in devices:
        groups.setdefault(models_cell(d, limit=1000), []).append(d.device_id)
    out = []
    for models, ids in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        shown = ", ".join(ids[:limit]) + (f" +{len(ids) - limit} more" if len(ids) > limit else "")
        out.append(Text(f"models {models}: {shown}"))
    return out

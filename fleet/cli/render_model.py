"""Tables of ``fleet model``: an artefact's manifest, a deployment's devices, the fleet's models.

Kept beside ``fleet.cli.render`` (same compact table style, same helpers) so that module stays
small; like it, the only other place here that knows rich.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from device.wire.artefact import Manifest
from fleet.cli.render import ago, human_bytes
from fleet.ops.registry import DeviceInfo
from fleet.state.deployments import DeploymentDevice, DeploymentRecord, DeviceModel

__all__ = ["deployments_table", "manifest_table", "rollout_table", "status_table"]

_STATE_STYLE = {
    "active": "green",
    "failed": "red",
    "pending": "yellow",
    "downloading": "cyan",
    "verified": "cyan",
}


def _table(title: str, columns: Sequence[tuple[str, str]]) -> Table:
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1)
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def manifest_table(manifest: Manifest, size: int, sha256: str) -> Table:
    """What ``fleet model export`` wrote (and ``fleet model inspect`` reads)."""
    table = _table(f"artefact {manifest.version}", [("", "left"), ("", "left")])
    sizes = manifest.sizes
    dense = float(sizes.get("dense_fp32_bytes", 0) or 0)
    ratio = f" (1/{dense / size:.1f} of dense fp32)" if dense and size else ""
    metrics = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} n/a"
        for k, v in sorted(manifest.metrics.items())
    )
    source = manifest.source
    rows = [
        ("model", manifest.model),
        ("architecture", manifest.architecture_digest[:16] or "-"),
        (
            "classes",
            ", ".join(manifest.classes[:12]) + (" ..." if len(manifest.classes) > 12 else ""),
        ),
        ("input shape", " x ".join(map(str, manifest.input_shape))),
        ("values", manifest.values),
        (
            "from",
            f"run {source.get('run')}, round {source.get('round')}, "
            f"model version {source.get('model_version')}",
        ),
        ("metrics", metrics or "-"),
        ("density", f"{float(sizes.get('density', 1.0)):.3f}"),
        ("size", f"{human_bytes(size)}{ratio}"),
        ("sha256", sha256),
        ("signed by", manifest.signer_key_id),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def rollout_table(record: DeploymentRecord, devices: Sequence[DeploymentDevice]) -> Table:
    """One deployment's devices and where each is."""
    table = _table(
        f"deployment {record.deployment_id}: version {record.version} ({record.status.value})",
        [("device", "left"), ("role", "left"), ("state", "left"), ("reason", "left")],
    )
    for d in devices:
        table.add_row(d.device_id, d.role, _state(d.state), d.reason or "")
    return table


def status_table(
    infos: Sequence[DeviceInfo],
    models: Mapping[str, DeviceModel],
    latest: Mapping[str, tuple[DeploymentRecord, DeploymentDevice]],
    now: float,
) -> Table:
    """Per device: the version it serves, since when, predictions and errors, and its state in
    the newest deployment addressed to it."""
    table = _table(
        "deployed models",
        [
            ("device", "left"),
            ("online", "left"),
            ("version", "left"),
            ("since", "right"),
            ("inferences", "right"),
            ("errors", "right"),
            ("last deployment", "left"),
        ],
    )
    ids = sorted({i.device_id for i in infos} | set(models) | set(latest))
    online = {i.device_id: i.online for i in infos}
    for device_id in ids:
        model = models.get(device_id)
        last = latest.get(device_id)
        cell = Text("-")
        if last is not None:
            record, row = last
            cell = Text(f"{record.deployment_id} {record.version} ")
            cell.append_text(_state(row.state))
            if row.reason:
                cell.append(f": {row.reason}")
        table.add_row(
            device_id,
            "yes" if online.get(device_id) else "no",
            model.version if model else "-",
            ago(model.since, now) if model else "-",
            str(model.inferences) if model else "-",
            str(model.errors) if model else "-",
            cell,
        )
    return table


def deployments_table(records: Sequence[DeploymentRecord]) -> Table:
    """The deployment history, newest first."""
    table = _table(
        "deployments",
        [
            ("#", "right"),
            ("id", "left"),
            ("kind", "left"),
            ("version", "left"),
            ("to", "left"),
            ("status", "left"),
            ("size", "right"),
        ],
    )
    for r in records:
        table.add_row(
            str(r.sequence),
            r.deployment_id,
            r.kind,
            r.version,
            r.target,
            r.status.value + (f": {r.reason}" if r.reason else ""),
            human_bytes(r.artefact_bytes),
        )
    return table

"""The density each device trained at, from its stored updates (per-device budgets).

Every accepted update's row records the density the device trained at (``meta["density"]``:
its kept fraction of the pruned tensors, written by ``fleet.runtime.handler``). With density
budgets (docs/heterogeneity.md) these differ by device; the run report lists them, one row per
device, so an operator sees who trained how much of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.state.store import Store

__all__ = ["device_densities", "device_density_lines"]


def device_densities(store: Store, run_id: str) -> dict[str, list[float]]:
    """``{device_id: [density of each of its stored updates, in round order]}`` (updates from
    before densities were recorded are left out)."""
    out: dict[str, list[float]] = {}
    for record in store.rounds(run_id):
        for row in store.updates_for_round(run_id, record.round):
            value = row.meta.get("density")
            if isinstance(value, int | float):
                out.setdefault(row.device_id, []).append(float(value))
    return out


def device_density_lines(store: Store, run_ids: Sequence[str]) -> list[str]:
    """Markdown: per run, a table of each device's updates and min / mean / max density."""
    lines: list[str] = []
    for run_id in run_ids:
        densities = device_densities(store, run_id)
        if not densities:
            continue
        lines += [
            f"## Density each device trained at: `{run_id}`",
            "",
            "| device | updates | min density | mean density | max density |",
            "|---|---:|---:|---:|---:|",
        ]
        for device_id in sorted(densities):
            values = densities[device_id]
            lines.append(
                f"| {device_id} | {len(values)} | {min(values):.4f} "
                f"| {sum(values) / len(values):.4f} | {max(values):.4f} |"
            )
        lines.append("")
    return lines

"""The footprint bench's tables (Markdown), from its results file (``footprint.py``).

Figures in MB (2**20 bytes). "idle-corr." subtracts the emulator's idle baseline (an idle Python
under qemu minus the same Python natively, on x86); "corrected" is the split method's guest
peak (``memory.MemorySummary.guest_peak_kb``), the figure the targets and docs/hardware.md use;
"anon." is the highest sampled anonymous part of it (heap and tensors: what cannot be dropped
under memory pressure, unlike clean pages of the mapped libraries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.arm64.job import JobSpec
from bench.arm64.memory import mb

Entry = Mapping[str, Any]
WHERE = ("x86 native", "x86 under qemu", "arm64 under qemu")


def _baseline(entries: Sequence[Entry]) -> tuple[str, float]:
    rows = {(e["what"], e["where"]): e["hwm_kb"] for e in entries if e["part"] == "baseline"}
    if not rows:
        return "", 0.0
    lines = ["| process | x86 native | x86 under qemu | arm64 under qemu |", "|---|---|---|---|"]
    for what in ("idle", "import torch", "idle, corrected", "import torch, corrected"):
        if not any((what, where) in rows for where in WHERE):
            continue
        cells = [f"{mb(rows.get((what, where), 0)):.0f}" for where in WHERE]
        lines.append(f"| {what} | {' | '.join(cells)} |")
    idle_kb = rows.get(("idle", "x86 under qemu"), 0) - rows.get(("idle", "x86 native"), 0)
    lines.append("")
    lines.append(f"Emulator baseline (idle Python under qemu minus native): {mb(idle_kb):.1f} MB")
    return "\n".join(lines), idle_kb


def _site(entries: Sequence[Entry]) -> str:
    site = next((e for e in entries if e["part"] == "site"), None)
    if site is None:
        return ""
    dists = sorted(site["distributions"].items(), key=lambda kv: -kv[1])
    torch_mb = sum(size for name, size in dists if name == "torch") / 2**20
    lines = [
        f"Device virtualenv: {site['venv_bytes'] / 2**20:.0f} MB (site-packages "
        f"{site['site_bytes'] / 2**20:.0f} MB); torch's aarch64 wheel "
        f"{site['torch_wheel_bytes'] / 2**20:.0f} MB, installed {torch_mb:.0f} MB; everything "
        f"but torch {site['site_bytes'] / 2**20 - torch_mb:.0f} MB.",
        "",
        "| distribution | installed MB |",
        "|---|---|",
    ]
    lines += [f"| {name} | {size / 2**20:.1f} |" for name, size in dists if size >= 2**19]
    return "\n".join(lines)


def _setting(spec: Mapping[str, Any]) -> str:
    """The job's departures from the defaults, in words."""
    return " ".join(
        part
        for part in (
            f"threads {spec['torch_threads']}" if spec["torch_threads"] != 2 else "",
            f"MALLOC_ARENA_MAX={spec['malloc_arena_max']}" if spec["malloc_arena_max"] else "",
            _mmap_threshold(spec.get("malloc_mmap_threshold_kb", 0)),
            f"oneDNN {spec['onednn']}" if spec.get("onednn", "auto") != "auto" else "",
            f"chunks {spec['chunk_bytes'] // 1024} KiB" if spec["chunk_bytes"] else "",
            " ".join(a for a in spec["launcher_args"] if a == "--no-meta-init"),
        )
        if part
    )


def _mmap_threshold(kb: int) -> str:
    if kb == JobSpec.malloc_mmap_threshold_kb:
        return ""
    return f"MALLOC_MMAP_THRESHOLD_ {kb} KiB" if kb else "no MALLOC_MMAP_THRESHOLD_"


def _job_row(e: Entry, idle_kb: float) -> str:
    spec = e["spec"]
    rounds = e["rounds"][0] if e["rounds"] else {}
    memory = e["memory"] or {}
    extra = _setting(spec)
    loaded = e.get("loaded", {})
    sympy = "yes" if loaded.get("sympy") else ("no" if loaded else "?")
    return (
        f"| {e['where']} | {spec['model']} | {spec['density']:g} | "
        f"{'kernels' if spec['kernels'] else 'dense'} | {extra} | {mb(e['hwm_kb']):.0f} | "
        f"{mb(e['hwm_kb'] - idle_kb):.0f} | **{mb(e['guest_peak_kb']):.0f}** | "
        f"{mb(memory.get('guest_anon_sampled_peak_kb', 0)):.0f} | "
        f"{mb(memory.get('emulator_end_kb', 0)):.0f} | {rounds.get('max_train_s', '?')} | "
        f"{rounds.get('upload_bytes', 0) / 1e6:.2f} | {sympy} | "
        f"{'ok' if e['passed'] else 'FAILED'} |"
    )


JOB_HEADER = (
    "| where | model | density | compute | setting | raw MB | idle-corr. MB | corrected MB | "
    "anon. MB | emulator MB | train s | upload MB | sympy | round |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _breakdown(entries: Sequence[Entry]) -> str:
    """What held the guest's memory at its highest sample, per job (MB)."""
    rows = [e for e in entries if e["memory"] and e["memory"].get("peak_breakdown")]
    if not rows:
        return ""
    categories = sorted({c for e in rows for c in e["memory"]["peak_breakdown"]})
    header = "| job | " + " | ".join(categories) + " |"
    lines = [header, "|---" * (len(categories) + 1) + "|"]
    for e in rows:
        spec, parts = e["spec"], e["memory"]["peak_breakdown"]
        label = f"{e['where']}: {spec['model']} d={spec['density']:g} " + (
            "kernels" if spec["kernels"] else "dense"
        )
        label = f"{label} {_setting(spec)}".strip()
        cells = [f"{mb(parts.get(c, 0)):.0f}" for c in categories]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(entries: Sequence[Entry]) -> str:
    baseline, idle_kb = _baseline(entries)
    jobs = [e for e in entries if e["part"] == "job"]
    plain = [e for e in jobs if e["where"] == "arm64 qemu" and _is_plain(e)]
    settings = [e for e in jobs if e["where"] == "arm64 qemu" and not _is_plain(e)]
    validate = [e for e in jobs if e["where"].startswith("x86")]
    sections = [
        ("Emulator baseline (peak RSS, MB)", baseline),
        ("Installed size", _site(entries)),
        ("Round jobs on arm64 (torch 2.7.1, qemu-user, Cortex-A72)", _table(plain, idle_kb)),
        ("Settings (arm64)", _table(settings, idle_kb)),
        (
            "Check of the correction: x86 natively and under qemu-x86_64 (torch 2.13)",
            _table(validate, idle_kb),
        ),
        ("Where the memory is at the highest sample (MB)", _breakdown(jobs)),
    ]
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in sections if body)


def _is_plain(e: Entry) -> bool:
    spec = e["spec"]
    return (
        spec["torch_threads"] == 2
        and not spec["malloc_arena_max"]
        and spec.get("malloc_mmap_threshold_kb", 0) == JobSpec.malloc_mmap_threshold_kb
        and not spec["chunk_bytes"]
        and "--no-meta-init" not in spec["launcher_args"]
    )


def _table(entries: Sequence[Entry], idle_kb: float) -> str:
    if not entries:
        return ""
    return "\n".join([JOB_HEADER, *(_job_row(e, idle_kb) for e in entries)])

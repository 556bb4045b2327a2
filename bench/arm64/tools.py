"""Host tools of the arm64 check, and the one way it ends early: :class:`CheckAbort`.

Every failure the user can fix on the host (a missing package, no access to the package
sources, a failed download) becomes a ``CheckAbort`` carrying one sentence that says what to do;
the entry points print that sentence alone and exit with :data:`EXIT_SETUP`, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EXIT_SETUP",
    "REQUIRED_TOOLS",
    "CheckAbort",
    "Tool",
    "missing_tools_message",
    "require_tools",
    "run_logged",
]

#: Exit status of a check that could not set itself up (distinct from a failed check, 1).
EXIT_SETUP = 2


class CheckAbort(Exception):
    """The check cannot go on; ``str(exc)`` is the one message for the user."""


@dataclass(frozen=True)
class Tool:
    """An executable the check runs, and the Debian package that ships it."""

    command: str
    package: str
    purpose: str


REQUIRED_TOOLS: tuple[Tool, ...] = (
    Tool("qemu-aarch64-static", "qemu-user-static", "runs arm64 programs on this machine"),
    Tool("debootstrap", "debootstrap", "fetches the arm64 Debian userland"),
    Tool("dpkg-deb", "dpkg", "unpacks the fetched packages"),
    Tool("mosquitto", "mosquitto", "the broker of the device job"),
)

#: Where a tool may live outside PATH (mosquitto is in /usr/sbin, not on a user's PATH).
_EXTRA_DIRS = ("/usr/sbin", "/sbin")


def find_tool(
    command: str,
    which: Callable[[str], str | None] = shutil.which,
    search_dirs: Sequence[str] = _EXTRA_DIRS,
) -> str | None:
    """The path of ``command`` on PATH or in ``search_dirs``; None when absent."""
    found = which(command)
    if found:
        return found
    for directory in search_dirs:
        candidate = Path(directory) / command
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_tools_message(missing: Sequence[Tool]) -> str:
    """One sentence naming the missing commands and the apt command that installs them."""
    commands = ", ".join(f"{t.command} ({t.purpose})" for t in missing)
    packages = " ".join(dict.fromkeys(t.package for t in missing))
    return (
        f"make arm64-check needs {commands}, which {'is' if len(missing) == 1 else 'are'} not "
        f"installed: run 'apt-get update && apt-get install {packages}' as root, then run it "
        f"again."
    )


def require_tools(
    tools: Sequence[Tool] = REQUIRED_TOOLS,
    which: Callable[[str], str | None] = shutil.which,
    search_dirs: Sequence[str] = _EXTRA_DIRS,
) -> dict[str, str]:
    """Command -> path of every tool; ``CheckAbort`` naming all missing ones at once."""
    found = {t.command: find_tool(t.command, which, search_dirs) for t in tools}
    missing = [t for t in tools if found[t.command] is None]
    if missing:
        raise CheckAbort(missing_tools_message(missing))
    return {command: path for command, path in found.items() if path is not None}


def _last_error_line(text: str) -> str:
    """The most telling line of a failed command's output: the last one mentioning an error,
    else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "failed", "couldn't", "could not")):
            return line
    return lines[-1] if lines else "(no output)"


def run_logged(
    argv: Sequence[str],
    log: Path,
    *,
    what: str,
    hint: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 3600.0,
) -> str:
    """Run ``argv`` with its output in ``log`` (appended); return the output.

    A non-zero exit, a timeout or a command that cannot start raises ``CheckAbort``:
    "``what`` failed (...): <its last error line>. ``hint`` (full output: ``log``)".
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CheckAbort(f"{what} did not finish within {timeout_s:.0f} s. {hint}") from None
    except OSError as exc:
        raise CheckAbort(f"{what} could not start ({exc.strerror}). {hint}") from None
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(argv)}\n{proc.stdout}\n[exit {proc.returncode}]\n")
    if proc.returncode != 0:
        raise CheckAbort(
            f"{what} failed (exit {proc.returncode}): {_last_error_line(proc.stdout)}. {hint} "
            f"(full output: {log})"
        )
    return proc.stdout

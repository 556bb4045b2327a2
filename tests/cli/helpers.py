"""Helpers shared by the ``fleet`` CLI tests (fixtures are in conftest.py).

``Fleet`` invokes the command through ``click.testing.CliRunner`` in this process with
``--state-dir`` set, so tests see the exit code, stdout and stderr exactly as a user would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result

from device.wire.messages import DeviceStatus, Hardware
from fleet.cli import cli
from fleet.ops.registry import DeviceRegistry
from fleet.state.store import Store

TINY_RUN = """\
run:
  id: {run_id}
  model: mlp
  strategy: {strategy}
  rounds: {rounds}
  clients_per_round: 3
  round_timeout_s: 300  # rounds close when k answered; generous for loaded CI machines
  training: {{epochs: 1, lr: 0.05}}
  {options}
data:
  dataset: digits
simulation:
  devices: 4
"""


@dataclass
class Fleet:
    """Invokes ``fleet`` with ``--state-dir`` set to this test's directory."""

    state_dir: Path
    tmp: Path

    def __call__(self, *args: str | Path, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        return runner.invoke(
            cli,
            ["--state-dir", str(self.state_dir), *map(str, args)],
            env=env,
            catch_exceptions=False,
        )

    def write_config(
        self,
        name: str = "tiny.yaml",
        *,
        run_id: str = "tiny",
        strategy: str = "feddst",
        rounds: int = 2,
        options: str = "options: {density: 0.3}",
    ) -> Path:
        path = self.tmp / name
        path.write_text(
            TINY_RUN.format(run_id=run_id, strategy=strategy, rounds=rounds, options=options)
        )
        return path


def error_line(result: Result) -> str:
    """The one error line a failing command prints (and check it is one line)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("fleet: error: "), lines[0]
    return lines[0]


def add_device(
    store: Store,
    device_id: str,
    *,
    online: bool = True,
    version: str = "0.1.0",
    dataset_size: int = 100,
    at: float = 1_000.0,
    tags: tuple[str, ...] = (),
) -> None:
    """Put a device in the registry as its birth (or will) would."""
    DeviceRegistry(store).apply_status(
        device_id,
        DeviceStatus(
            online=online,
            session_epoch=1,
            agent_version=version,
            hardware=Hardware(machine="aarch64", cpu_count=4, memory_bytes=4_000_000_000),
            dataset_size=dataset_size,
            tags=tags,
        ),
        received_at=at,
    )

"""Fixtures for the ``fleet`` CLI tests: a runner bound to a temporary state directory and one
finished simulated run shared by the read-only tests.

Simulations use the in-memory transport, the bundled digits and four devices, so each takes
about a second.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cli.helpers import Fleet


@pytest.fixture(autouse=True)
def _one_thread_and_clean_logging() -> Iterator[None]:
    """Keep torch to one thread, and undo the CLI's logging setup (it configures the root
    logger, which other tests in the same process must not inherit)."""
    torch.set_num_threads(1)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(state_dir=tmp_path / "state", tmp=tmp_path)


@pytest.fixture(scope="session")
def simulated_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding one finished FedDST run 'tiny' (2 rounds, 4 simulated
    devices), made once; tests get copies (``populated``)."""
    tmp = tmp_path_factory.mktemp("simulated")
    fleet = Fleet(state_dir=tmp / "state", tmp=tmp)
    result = fleet("simulate", fleet.write_config())
    assert result.exit_code == 0, result.output
    return fleet.state_dir


@pytest.fixture
def populated(fleet: Fleet, simulated_state: Path) -> Fleet:
    """``fleet`` with a private copy of ``simulated_state``."""
    shutil.copytree(simulated_state, fleet.state_dir)
    return fleet

"""The committed protobuf code must be what the schema generates (DESIGN section 5)."""

from __future__ import annotations

from pathlib import Path

from device.wire import gen


def test_committed_generated_code_matches_the_schema(tmp_path: Path) -> None:
    """Editing the .proto without `make proto` (or hand-editing *_pb2.py) fails here."""
    generated = gen.generate(tmp_path)
    names = sorted(p.name for p in generated)
    assert names == ["sparsefleet_pb2.py", "sparsefleet_pb2.pyi"]
    for path in generated:
        committed = gen.DEFAULT_OUT / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `make proto` (python -m device.wire.gen)"
        )

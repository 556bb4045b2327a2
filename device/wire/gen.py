"""Regenerate the protobuf Python code from ``proto/`` (``python -m device.wire.gen [OUT_DIR]``).

Uses the protoc bundled with the pinned ``grpcio-tools`` so that the output is reproducible; a
test regenerates into a temporary directory and compares with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto" / "sparsefleet" / "v1"
DEFAULT_OUT = Path(__file__).resolve().parent / "pb"
PROTO_FILES = ("sparsefleet.proto",)


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Write ``*_pb2.py`` and ``*_pb2.pyi`` for every schema file into ``out_dir``; return them."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(PROTO_ROOT / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / name}")
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi")))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path)

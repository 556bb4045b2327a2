"""An independent decoder reads our bytes: Debian's `protoc --decode` (libprotoc 3.x, C++)
must see exactly the fields the schema defines. Our encoder splices large byte fields by hand
(see codec.length_delimited), so this is the check that the hand-built framing is protobuf."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from device.wire import envelope
from device.wire import messages as m
from device.wire.codec import KnownMask, SparseTensor

REPO = Path(__file__).resolve().parents[2]
PROTOC = shutil.which("protoc") or "/usr/bin/protoc"

pytestmark = pytest.mark.skipif(
    not Path(PROTOC).exists(), reason="protoc not installed (apt-get install protobuf-compiler)"
)


def _protoc_decode(data: bytes) -> str:
    result = subprocess.run(
        [
            PROTOC,
            "--decode=sparsefleet.v1.Envelope",
            "-I",
            str(REPO / "proto" / "sparsefleet" / "v1"),
            "sparsefleet.proto",
        ],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return result.stdout.decode()


def test_protoc_decodes_a_device_update_as_the_schema_says() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.1
    nnz = int(mask.sum())
    update = m.DeviceUpdate(
        model_version=3,
        model_digest=b"\x11" * 32,
        deltas={
            "conv1.weight": SparseTensor(
                mask.shape, mask, rng.standard_normal(nnz).astype(np.float32)
            ),
            "conv1.bias": SparseTensor.from_dense(np.array([0.5, -1.0, 2.0])),
        },
        num_examples=120,
        local_steps=7,
        train_s=2.5,
        metrics={"train_loss": 0.25, "train_accuracy": 0.75},
    )
    book = {"conv1.weight": KnownMask(2, mask.copy())}
    env = m.Envelope(update, run_id="run-1", round=5, device_id="pi-07", correlation_id="c1")
    text = _protoc_decode(envelope.encode(env, book=book, dtype=m.ValueDType.INT8))

    assert re.search(r"^schema_version: 1$", text, re.M)
    assert re.search(r'^device_id: "pi-07"$', text, re.M)
    assert re.search(r"^round: 5$", text, re.M)
    assert re.search(r'^run_id: "run-1"$', text, re.M)
    assert re.search(r"^  model_version: 3$", text, re.M)
    assert re.search(r"^  num_examples: 120$", text, re.M)
    assert re.search(r"^  local_steps: 7$", text, re.M)
    assert re.search(r"^  train_s: 2.5$", text, re.M)
    assert re.findall(r'^    name: "([^"]+)"$', text, re.M) == ["conv1.weight", "conv1.bias"]
    assert re.findall(r"^      shape: (\d+)$", text, re.M) == ["40", "50", "3"]
    assert re.findall(r"^      dtype: (\w+)$", text, re.M) == ["VALUE_DTYPE_INT8"] * 2
    assert re.findall(r"^      mode: (\w+)$", text, re.M) == [
        "POSITION_MODE_IMPLIED",
        "POSITION_MODE_DENSE",
    ]
    assert re.findall(r"^      nnz: (\d+)$", text, re.M) == [str(nnz), "3"]
    assert re.search(r"^        version: 2$", text, re.M)  # mask_ref of the implied tensor
    metrics = dict(re.findall(r'key: "(\w+)"\n\s+value: ([\d.]+)', text))
    assert metrics == {"train_loss": "0.25", "train_accuracy": "0.75"}

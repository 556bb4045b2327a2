"""Import smoke test of the device side, run by the arm64 virtualenv's Python (under qemu).

    <arm64 venv>/bin/python bench/arm64/smoke.py TORCH_VERSION

Imports what a device runs (the agent, the trainer, the sparse kernels, the wire codec) from the
installed wheel, and checks that this is arm64, that torch is the pinned version (the local
label, e.g. "+cpu", aside) and a CPU-only build, and that the device code came from the
virtualenv rather than a source tree. Prints one JSON line; exits 1 on a failed check.
Runs without this repository on sys.path (a script's own directory is sys.path[0]), and imports
nothing of the fleet manager.
"""

from __future__ import annotations

import json
import platform
import sys
import sysconfig
import time


def main(expected_torch: str) -> int:
    start = time.perf_counter()
    import torch

    torch_s = time.perf_counter() - start
    import device.agent
    import device.sparse.kernels
    import device.trainer
    import device.wire.codec

    total_s = time.perf_counter() - start
    site = sysconfig.get_paths()["purelib"]
    facts: dict[str, object] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device_from": device.agent.__file__,
        "import_torch_s": round(torch_s, 1),
        "import_device_s": round(total_s, 1),
        "modules": len(sys.modules),
    }
    # Touch what was imported, so the imports are not just names.
    facts["kernels"] = sorted(device.sparse.kernels.__all__)[:3]
    facts["trainer"] = device.trainer.train_round.__name__
    facts["codec"] = device.wire.codec.SparseTensor.__name__
    failures: list[str] = []
    if facts["machine"] != "aarch64":
        failures.append(f"machine is {facts['machine']}, not aarch64")
    if torch.__version__.split("+")[0] != expected_torch:
        failures.append(f"torch is {torch.__version__}, the pin is {expected_torch}")
    if torch.version.cuda is not None:
        failures.append(f"torch is a CUDA {torch.version.cuda} build")
    if not str(facts["device_from"]).startswith(site):
        failures.append(f"device was imported from {facts['device_from']}, not from {site}")
    facts["failures"] = failures
    print(json.dumps(facts))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

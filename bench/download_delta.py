"""Download bytes per round: the self-contained model snapshot against a delta to version v-1.

For the versions of a finished (or running) ``bench/mnist_repro.py`` store, each global model is
encoded two ways in the chosen precision, tensor by tensor with the real codec:

* **full**: what the runner publishes today: every tensor self-contained (pruned ones with
  ABSOLUTE positions, dense ones DENSE), values ``Q(W_v)``;
* **delta**: for a device that holds the previous model: positions IMPLIED or DIFF against
  the mask of version v-1 (the smaller, as the codec chooses), values ``Q(W_v - P_{v-1})``, where
  ``P`` is what delta-following devices hold; the server keeps ``P_v = P_{v-1} + sent`` (error
  feedback on the server), so their error stays one quantisation step of the *change*, never
  accumulating.

Printed per sampled version: both sizes (bytes, tensors' encoded protobuf including name and
framing, not the envelope header, which is the same for both), their ratio, and the largest
error against the fp32 global model of each path (full: ``|Q(W_v) - W_v|``; delta: ``|P_v -
W_v|``). Totals over all versions at the end. Figures, not a test.

    python bench/download_delta.py --store docs/results/mnist_quant/work/feddst_int8-int8 \\
        --run mnist-feddst_int8-int8 --values int8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from device.feedback import sent_values
from device.wire.codec import KnownMask, SparseTensor, encode_tensor

FRAMING = 6  # NamedTensor tag + length varints, roughly; the same for both encodings


def encoded_bytes(name: str, tensor: SparseTensor, values: str, base: KnownMask | None) -> int:
    return encode_tensor(tensor, values, base=base).ByteSize() + len(name) + FRAMING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a mnist_repro store folder")
    parser.add_argument("--run", required=True, help="the run id in that store")
    parser.add_argument("--values", default="int8", help="the download precision")
    parser.add_argument("--every", type=int, default=25, help="print every N-th version")
    args = parser.parse_args(argv)
    from fleet.state.store import Store

    full_total = delta_total = 0
    held: dict[str, np.ndarray] = {}  # P: what delta-following devices hold
    prev_masks: dict[str, np.ndarray] = {}
    print(
        "| version | full (bytes) | delta (bytes) | delta / full | full max err | delta max err |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    with Store(args.store, create=False) as store:
        versions = [r.version for r in store.checkpoints(args.run)]
        for version in versions:
            ck = store.load_checkpoint(args.run, version)
            full = delta = 0
            full_err = delta_err = 0.0
            for name, w in ck.weights.items():
                mask = ck.masks.get(name, np.ones(w.shape, dtype=np.bool_))
                t = SparseTensor.from_dense(w, mask)
                full += encoded_bytes(name, t, args.values, None)
                q = sent_values(t.values, args.values)
                full_err = max(full_err, float(np.abs(q - t.values).max(initial=0.0)))
                if not held:
                    continue
                base = KnownMask(version - 1, prev_masks.get(name, np.ones(w.shape, np.bool_)))
                change = (w - held[name])[mask].astype(np.float32)
                d = SparseTensor(w.shape, mask, change)
                delta += encoded_bytes(name, d, args.values, base)
                sent = sent_values(change, args.values)
                new = np.zeros(w.shape, dtype=np.float32)
                new[mask] = held[name][mask] + sent
                held[name] = new
                delta_err = max(delta_err, float(np.abs(new - w).max(initial=0.0)))
            if not held:  # version 0: every device needs the full model
                held = {
                    n: np.where(ck.masks.get(n, True), w, 0).astype(np.float32)
                    for n, w in ck.weights.items()
                }
                for n, w in ck.weights.items():
                    m = ck.masks.get(n, np.ones(w.shape, np.bool_))
                    held[n][m] = sent_values(w[m].astype(np.float32), args.values)
                delta = full
                delta_err = full_err
            prev_masks = {n: m.copy() for n, m in ck.masks.items()}
            full_total += full
            delta_total += delta
            if version % args.every == 0 or version == versions[-1]:
                print(
                    f"| {version} | {full} | {delta} | {delta / full:.3f} | {full_err:.2e} |"
                    f" {delta_err:.2e} |"
                )
    print(
        f"\ntotal over {len(versions)} versions: full {full_total} bytes, delta {delta_total} "
        f"bytes, delta / full {delta_total / max(full_total, 1):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

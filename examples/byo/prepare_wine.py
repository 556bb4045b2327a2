"""Write scikit-learn's bundled wine table as the CSV a SparseFleet device reads.

The data set is the UCI wine recognition table (178 wines from three cultivars, 13 chemical
measurements each) that scikit-learn ships inside its package (``sklearn/datasets/data/``):
nothing is downloaded. The output is one CSV with a header row: the 13 feature columns,
standardised to zero mean and unit variance (the device loader does not scale CSV features,
and the raw columns range from about 0.1 to 1700), and a ``cultivar`` label column holding
the class names ``class_0``, ``class_1``, ``class_2`` of the run file's ``data.classes``.

    .venv/bin/python examples/byo/prepare_wine.py                 # -> examples/byo/data/wine.csv
    .venv/bin/python examples/byo/prepare_wine.py --out DIR       # -> DIR/wine.csv

`fleet simulate` then splits this one file into one directory per simulated device; on a real
device you would put that device's own rows (same header) under its ``data.path``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_wine

LABEL_COLUMN = "cultivar"


def prepare(out_dir: Path) -> Path:
    """Write ``out_dir/wine.csv`` (creating ``out_dir``) and return its path."""
    wine = load_wine()
    x = np.asarray(wine.data, dtype=np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    names = [str(n) for n in wine.target_names]  # class_0, class_1, class_2
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "wine.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*wine.feature_names, LABEL_COLUMN])
        for row, target in zip(x, wine.target, strict=True):
            writer.writerow([f"{v:.6f}" for v in row] + [names[int(target)]])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent / "data"
    parser.add_argument("--out", type=Path, default=default, help=f"directory (default {default})")
    path = prepare(parser.parse_args().out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

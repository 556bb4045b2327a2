"""A user's data and model made at test time: 8x8 greyscale image folders, sensor CSVs,
broken data of every kind a device must report, and a throw-away model package.

Images: class ``c`` of ``classes`` is a bright vertical bar at columns ``2c .. 2c+2`` on a dim
noisy background, so a small model separates the classes in a few rounds. CSV: rows
``t, ax, ay, az, activity`` in blocks of one activity, ``walk`` quiet and ``run`` strong.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from device.data import LocalDataSpec

IMAGE_CLASSES = ("left", "middle", "right")
SENSOR_CLASSES = ("walk", "run")


def bar_images(
    root: Path, per_class: int = 12, *, classes: tuple[str, ...] = IMAGE_CLASSES, seed: int = 0
) -> Path:
    """``root/CLASS/NNN.png``: ``per_class`` 8x8 greyscale images of each class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (8, 8)).astype(np.uint8)
            pixels[:, 2 * c : 2 * c + 3] = 220
            Image.fromarray(pixels, "L").save(folder / f"{i:03d}.png")
    return root


def image_spec(root: Path, **options: object) -> LocalDataSpec:
    """The imagefolder spec a device with ``bar_images`` uses (8x8 greyscale)."""
    settings: dict[str, object] = {
        "format": "imagefolder",
        "path": root,
        "classes": IMAGE_CLASSES,
        "channels": 1,
        "resize": (8, 8),
    }
    return LocalDataSpec(**{**settings, **options})  # type: ignore[arg-type]


def sensor_csvs(root: Path, files: int = 2, blocks: int = 8, rows: int = 16, seed: int = 1) -> Path:
    """``root/dayN.csv``: ``blocks`` blocks of ``rows`` rows each, activities alternating."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"day{f}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["t", "ax", "ay", "az", "activity"])
            t = 1000.0
            for block in range(blocks):
                activity = SENSOR_CLASSES[block % 2]
                level = 0.2 if activity == "walk" else 1.5
                for _ in range(rows):
                    writer.writerow([f"{t:.1f}", *rng.normal(level, 0.3, 3).round(4), activity])
                    t += 0.1
    return root


def bad_data(kind: str, root: Path) -> LocalDataSpec:
    """A device's data that is broken in the way ``kind`` names (see ``BAD_DATA``), and the
    text the device's error must contain."""
    if kind == "missing directory":
        return image_spec(root / "nowhere")
    if kind == "empty directory":
        (root / "empty").mkdir(parents=True)
        return image_spec(root / "empty")
    if kind == "corrupt image":
        images = bar_images(root / "images", per_class=2)
        (images / "left" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        return image_spec(images, eval_fraction=0.0)
    if kind == "label outside classes":
        images = bar_images(root / "images", per_class=2)
        bar_images(root / "images", per_class=1, classes=("upside-down",))
        return image_spec(images)
    if kind == "csv without label column":
        sensor_csvs(root / "csv", files=1)
        return LocalDataSpec(
            format="csv", path=root / "csv", classes=SENSOR_CLASSES, label_column="label"
        )
    if kind == "csv non-numeric feature":
        folder = sensor_csvs(root / "csv", files=1)
        text = (folder / "day0.csv").read_text().splitlines()
        fields = text[3].split(",")
        text[3] = ",".join([fields[0], "fast", *fields[2:]])
        (folder / "day0.csv").write_text("\n".join(text) + "\n")
        return LocalDataSpec(
            format="csv", path=folder, classes=SENSOR_CLASSES, label_column="activity"
        )
    if kind == "npz lengths differ":
        (root / "npz").mkdir(parents=True)
        np.savez(root / "npz" / "a.npz", x=np.zeros((5, 1, 8, 8), np.float32), y=np.zeros(4))
        return LocalDataSpec(format="npz", path=root / "npz", classes=IMAGE_CLASSES)
    raise ValueError(kind)


#: kind -> text the device's failure reason must contain (the file or setting it names).
BAD_DATA = {
    "missing directory": "nowhere",
    "empty directory": "empty",
    "corrupt image": "000.png",
    "label outside classes": "upside-down",
    "csv without label column": "label",
    "csv non-numeric feature": "fast",
    "npz lengths differ": "a.npz",
}


def model_package(root: Path, name: str) -> Path:
    """A throw-away package ``name`` under ``root`` (put ``root`` on the path) as a user would
    write it: ``build(hidden, classes)`` for 8x8 images, ``build_sensor(features, window,
    classes)`` for windows of sensor rows. Returns ``root``."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """\
            from torch import nn


            def build(hidden: int = 16, classes: int = 3) -> nn.Module:
                return nn.Sequential(
                    nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes)
                )


            def build_sensor(features: int = 3, window: int = 8, classes: int = 2) -> nn.Module:
                return nn.Sequential(
                    nn.Conv1d(features, 8, 3), nn.ReLU(), nn.Flatten(),
                    nn.Linear(8 * (window - 2), classes),
                )
            """
        )
    )
    return root

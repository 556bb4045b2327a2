"""Device-local data: the spec, the split, image folders, the re-scan cache and the registry.

Images are small PNGs written with Pillow into ``tmp_path`` at test time. Directory mtimes are
set into the past with ``os.utime`` where a test counts the work a re-scan does, since a
directory listed within two seconds of its mtime is (rightly) listed again.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data
from PIL import Image

import device.data.imagefolder as imagefolder
from device.config import SettingError
from device.data import (
    Dataset,
    LocalDataSpec,
    check_dataset,
    dataset_names,
    load_dataset,
    local_format_names,
    open_source,
    split_point,
)
from device.errors import ConfigError, DataError

CLASSES = ("cat", "dog")


def png(path: Path, value: int | tuple[int, int, int], size: tuple[int, int] = (5, 4)) -> Path:
    """A ``size`` = (height, width) PNG of one colour (grey ``value`` or an RGB triple)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, int):
        pixels = np.full(size, value, dtype=np.uint8)
    else:
        pixels = np.broadcast_to(np.array(value, dtype=np.uint8), (*size, 3)).copy()
    Image.fromarray(pixels).save(path)
    return path


def image_tree(root: Path, per_class: int = 3, **sizes: tuple[int, int]) -> Path:
    """``root/cat/i.png`` (grey 10*i) and ``root/dog/i.png`` (grey 100 + 10*i)."""
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            png(root / name / f"{i:03d}.png", (100 * c + 10 * i) % 256, sizes.get(name, (5, 4)))
    return root


def age(root: Path, seconds: float = 60.0) -> None:
    """Set every directory's mtime ``seconds`` into the past (settled, trusted by the cache)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def spec(root: Path, **options: object) -> LocalDataSpec:
    settings: dict[str, object] = {"format": "imagefolder", "path": root, "classes": CLASSES}
    return LocalDataSpec(**{**settings, **options})  # type: ignore[arg-type]


# --- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "setting", "reason"),
    [
        ({"format": "imagefolder", "path": "d", "window": 8}, "window", "format csv"),
        ({"format": "csv", "path": "d"}, "label_column", "required"),
        ({"format": "csv", "path": "d", "label_column": "y", "stride": 2}, "stride", "window"),
        ({"format": "npz"}, "path", "required"),
        ({"format": "npz", "path": "d", "eval_fraction": 1.0}, "eval_fraction", r"\[0, 1\)"),
        ({"format": "npz", "path": "d", "classes": ("a", "a")}, "classes", "more than once"),
        ({"format": "npz", "path": "d", "classes": ("a",)}, "classes", "at least 2"),
        ({"format": "imagefolder", "path": "d", "mean": (0.5,)}, "std", "needed with mean"),
        ({"format": "imagefolder", "path": "d", "channels": 2}, "channels", "1 .* or 3"),
        ({"format": "imagefolder", "path": "d", "resize": (0, 4)}, "resize", "height, width"),
        ({"format": "python", "function": "no colon"}, "function", "module:function"),
        ({"format": "parquet", "path": "d"}, "format", "known: imagefolder, csv, npz"),
    ],
)
def test_spec_rejects_each_bad_setting_by_name(
    options: dict[str, object], setting: str, reason: str
) -> None:
    """A bad setting must be refused when the config loads, naming that setting, not at the
    first job (and never silently ignored, like a csv option on an image folder)."""
    with pytest.raises(SettingError, match=reason) as caught:
        LocalDataSpec(**options)  # type: ignore[arg-type]
    assert caught.value.setting == setting


def test_spec_from_a_mapping_is_a_config_error_naming_the_setting() -> None:
    """Through the config loader, the error is a ConfigError with the dotted setting name."""
    with pytest.raises(ConfigError, match=r"data: window: must be at least 1 row"):
        LocalDataSpec.from_mapping(
            {"format": "csv", "path": "x.csv", "label_column": "y", "window": 0}
        )
    with pytest.raises(ConfigError, match=r"data: resiz: unknown setting"):
        LocalDataSpec.from_mapping({"format": "imagefolder", "path": "d", "resiz": [2, 2]})
    built = LocalDataSpec.from_mapping(
        {"format": "imagefolder", "path": "d", "resize": [8, 6], "classes": ["a", "b"]}
    )
    assert built.resize == (8, 6) and built.classes == ("a", "b")


def test_open_source_without_classes_says_the_label_space_is_needed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.classes is not set"):
        open_source(LocalDataSpec(format="imagefolder", path=tmp_path))


# --- the split ---------------------------------------------------------------------------------


def test_split_point_is_blake2b_of_the_identity_keyed_by_the_seed() -> None:
    """The split must be the same on every machine and in every process: it is defined by
    blake2b, never by Python's salted hash(); checked against hashlib directly."""
    digest = hashlib.blake2b(
        b"cat/001.png", digest_size=8, key=(7).to_bytes(8, "big"), person=b"sf-split"
    ).digest()
    assert split_point("cat/001.png", 7) == int.from_bytes(digest, "big") / 2**64
    assert split_point("cat/001.png", 7) != split_point("cat/001.png", 8)


def test_split_is_stable_as_data_grows_and_near_the_fraction(tmp_path: Path) -> None:
    """An example must never move between training and evaluation when new data arrives (the
    evaluation would then measure examples the model trained on)."""
    root = tmp_path / "img"
    for i in range(300):
        png(root / CLASSES[i % 2] / f"{i:04d}.png", i % 256, (2, 2))
    source = open_source(spec(root, eval_fraction=0.25, seed=3))
    first = source.scan()
    before = set(source.evaluation().identities())
    for i in range(300, 600):
        png(root / CLASSES[i % 2] / f"{i:04d}.png", i % 256, (2, 2))
    second = source.scan()
    after = set(source.evaluation().identities())
    assert (first.examples, second.examples, second.added, second.removed) == (300, 600, 300, 0)
    assert before <= after
    assert not before & set(source.train().identities())
    assert 0.20 < second.evaluation / second.examples < 0.30
    again = open_source(spec(root, eval_fraction=0.25, seed=3))
    again.scan()
    assert set(again.evaluation().identities()) == after  # a restarted device agrees


def test_eval_fraction_zero_puts_everything_in_training(tmp_path: Path) -> None:
    source = open_source(spec(image_tree(tmp_path / "img"), eval_fraction=0.0))
    result = source.scan()
    assert (result.train, result.evaluation, len(source.evaluation())) == (6, 0, 0)
    with pytest.raises(DataError, match="evaluation split holds no examples"):
        source.evaluation().to_dataset()


# --- image folders -----------------------------------------------------------------------------


def test_imagefolder_reads_greyscale_resized_and_normalised(tmp_path: Path) -> None:
    """Labels come from the class directory, pixels are scaled to [0, 1] then normalised."""
    root = image_tree(tmp_path / "img")
    source = open_source(
        spec(root, channels=1, resize=(3, 2), mean=(0.5,), std=(0.25,), eval_fraction=0.0)
    )
    data = source.train().to_dataset()
    assert data.x.shape == (6, 1, 3, 2) and data.x.dtype == torch.float32
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    grey = np.array([0, 10, 20, 100, 110, 120], dtype=np.float32)
    expected = (grey / 255 - 0.5) / 0.25
    assert torch.allclose(data.x.mean(dim=(1, 2, 3)), torch.from_numpy(expected), atol=1e-6)


def test_imagefolder_rgb_keeps_channel_order_and_per_channel_statistics(tmp_path: Path) -> None:
    root = tmp_path / "img"
    png(root / "cat" / "red.png", (255, 0, 51))
    png(root / "dog" / "green.png", (0, 255, 0))
    source = open_source(spec(root, mean=(0.0, 0.5, 0.0), std=(1.0, 0.5, 0.2), eval_fraction=0))
    x, y = source.train().batch([0, 1])
    assert x.shape == (2, 3, 5, 4) and y.tolist() == [0, 1]
    assert x[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 1.0])
    assert x[1, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_imagefolder_without_resize_refuses_an_image_of_another_size(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "img", dog=(7, 7))
    source = open_source(spec(root, eval_fraction=0.0))
    with pytest.raises(DataError, match=r"dog/000\.png: image is 7x7 pixels, the others 4x5"):
        source.train().to_dataset()


def test_imagefolder_decodes_only_the_examples_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanning must not decode (a re-scan of 50,000 images before every job would take
    minutes on a Pi); a batch decodes exactly its own images."""
    decoded: list[str] = []
    real = imagefolder.decode_image

    def counting(path: str, mode: str, size: tuple[int, int] | None) -> np.ndarray:
        decoded.append(path)
        return real(path, mode, size)

    monkeypatch.setattr(imagefolder, "decode_image", counting)
    source = open_source(spec(image_tree(tmp_path / "img"), eval_fraction=0.0))
    source.scan()
    assert decoded == []
    examples = source.train()
    x, label = examples[4]
    assert x.shape == (3, 5, 4)
    assert decoded == [str(tmp_path / "img" / "dog" / "001.png")] and label == 1
    loader = torch.utils.data.DataLoader(examples, batch_size=4)
    batches = [yb.tolist() for _, yb in loader]  # a torch map-style dataset as it stands
    assert batches == [[0, 0, 0, 1], [1, 1]] and len(decoded) == 7


def test_imagefolder_corrupt_image_fails_at_that_example_naming_it(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "img")
    bad = root / "dog" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    source = open_source(spec(root, eval_fraction=0.0))
    assert source.scan().examples == 6
    examples = source.train()
    assert examples[0][1] == 0  # the good ones still decode
    with pytest.raises(DataError, match=rf"{bad}: not a readable image"):
        examples[5]
    (root / "cat" / "003.png").write_bytes(b"not an image at all")
    source.scan()
    with pytest.raises(DataError, match=r"cat/003\.png: not a readable image"):
        source.train().to_dataset()


def test_imagefolder_missing_and_empty_directories_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data.path {tmp_path / 'nope'} does not exist"):
        open_source(spec(tmp_path / "nope")).scan()
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    png(tmp_path / "empty" / "loose.png", 0)  # in the root: no class
    with pytest.raises(DataError, match=r"no images \(\*\.png, \*\.jpg, \*\.jpeg\)"):
        open_source(spec(tmp_path / "empty")).scan()


def test_imagefolder_label_outside_the_classes_names_label_and_file(tmp_path: Path) -> None:
    """A device with data the run cannot label must refuse to train, not skip or guess."""
    root = image_tree(tmp_path / "img")
    png(root / "bird" / "000.png", 0)
    with pytest.raises(
        DataError, match=r"bird/000\.png: label 'bird' is not one of the run's classes \(cat, dog\)"
    ):
        open_source(spec(root)).scan()


def test_imagefolder_reads_jpeg_and_nested_directories(tmp_path: Path) -> None:
    root = tmp_path / "img"
    png(root / "cat" / "a.png", 0)
    png(root / "dog" / "2024" / "b.JPG", 0)  # case-insensitive suffix, nested under the class
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(root / "dog" / "c.jpeg", format="JPEG")
    (root / "dog" / ".hidden.png").write_bytes(b"")
    source = open_source(spec(root, eval_fraction=0.0))
    assert source.scan().examples == 3
    assert source.train().identities() == ["cat/a.png", "dog/c.jpeg", "dog/2024/b.JPG"]
    assert source.train().labels().tolist() == [0, 1, 1]


# --- re-scanning -------------------------------------------------------------------------------


def test_rescan_lists_only_changed_directories_and_picks_up_new_files(tmp_path: Path) -> None:
    """Before each job the device re-reads its data; with nothing new that must cost one stat
    per directory, and a new image must still be found."""
    root = image_tree(tmp_path / "img")
    age(root)
    source = open_source(spec(root))
    first = source.scan()
    assert (first.examples, first.listed, first.reused) == (6, 3, 0)
    same = source.scan()
    assert (same.examples, same.listed, same.reused, same.added) == (6, 0, 3, 0)
    png(root / "dog" / "new.png", 7)
    grown = source.scan()
    assert (grown.examples, grown.listed, grown.reused, grown.added) == (7, 1, 2, 1)
    assert source.num_examples == 7
    (root / "cat" / "000.png").unlink()
    shrunk = source.scan()
    # cat changed; dog is listed again too: its last listing fell in its mtime's tick.
    assert (shrunk.examples, shrunk.removed, shrunk.listed, shrunk.reused) == (6, 1, 2, 1)


def test_rescan_does_not_trust_a_directory_listed_in_its_mtime_tick(tmp_path: Path) -> None:
    """A file created in the same clock tick as the listing leaves the mtime unchanged: such
    a directory is listed again rather than trusted."""
    root = image_tree(tmp_path / "img")  # just written: mtimes are now
    source = open_source(spec(root))
    source.scan()
    assert source.scan().listed == 3


def test_examples_handed_out_survive_a_rescan(tmp_path: Path) -> None:
    """A job keeps the examples of its scan even when the next scan sees other data."""
    root = image_tree(tmp_path / "img")
    source = open_source(spec(root, eval_fraction=0.0))
    source.scan()
    examples = source.train()
    png(root / "cat" / "zzz.png", 1)
    source.scan()
    assert len(examples) == 6 and len(source.train()) == 7
    assert examples.to_dataset().y.tolist() == [0, 0, 0, 1, 1, 1]


# --- the dataset type and the registry ---------------------------------------------------------


def test_dataset_accepts_sequences_channels_by_time() -> None:
    """Windows of sensor rows are [N, channels, time], what Conv1d takes."""
    data = Dataset(torch.zeros(3, 2, 8), torch.tensor([0, 1, 0]), 2)
    assert data.example_shape == (2, 8) and data.flatten().x.shape == (3, 16)


def test_registry_serves_local_formats_train_and_test_disjoint(tmp_path: Path) -> None:
    """A simulation loads a user's directory the way a device does: "test" is the split's
    evaluation side, and the two sides partition the examples."""
    root = image_tree(tmp_path / "img", per_class=20)
    assert local_format_names() == ["imagefolder", "csv", "npz", "python"]
    assert dataset_names() == ["digits", "mnist"]  # the names that need no settings
    options = {"classes": list(CLASSES), "eval_fraction": 0.3, "resize": [2, 2], "channels": 1}
    train = load_dataset("imagefolder", root, "train", **options)
    test = load_dataset("imagefolder", str(root), "test", **options)
    assert len(train) + len(test) == 40 and len(test) > 0
    assert train.example_shape == (1, 2, 2)
    check_dataset("imagefolder", root, "train")
    with pytest.raises(DataError, match="does not exist"):
        check_dataset("imagefolder", tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no files"):
        check_dataset("npz", root, "train")
    with pytest.raises(ValueError, match="eval_fraction"):
        load_dataset("imagefolder", root, "train", classes=list(CLASSES), eval_fraction=2.0)
    with pytest.raises(ValueError, match="known: digits, mnist; device-local formats: imagef"):
        load_dataset("parquet", root)

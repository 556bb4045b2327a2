"""On-device inference: the loaded model computes what the dense model does, sparse layers hold
no dense weight, predictions are counted, and ``fleet-device predict`` reads images, CSV and npz."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from device.cli import main as device_main
from device.errors import DataError, NotFoundError
from device.inference import build, load
from device.inference_input import read_examples
from device.model_store import ModelStore
from device.models import create_model
from device.wire.artefact import read_artefact
from tests.deploy.helpers import make_fleet


def _install(models_dir: Path, data: bytes) -> None:
    store = ModelStore(models_dir)
    version = read_artefact(data).manifest.version
    store.write(version, data)
    store.activate(version, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("model", ["mlp", "mnist_cnn"])
def test_sparse_layers_compute_what_dense_ones_do(tmp_path: Path, model: str) -> None:
    """CSR linear and convolution forwards give the dense model's logits (float rounding)."""
    fleet = make_fleet(tmp_path, model=model, versions=1, density=0.1)
    artefact = read_artefact(fleet.export(dataset="mnist" if model != "mlp" else "digits").data)
    dense, _ = build(artefact, plan="dense")
    sparse, _ = build(artefact, plan="sparse")
    assert sparse.sparse_layers == {n for n in artefact.model().pruned}
    x = np.random.default_rng(0).standard_normal((5, *artefact.manifest.input_shape))
    assert np.allclose(dense.logits(x), sparse.logits(x), atol=1e-4)
    # One example takes another kernel (CSR times a vector): the same logits.
    assert np.allclose(dense.logits(x[:1]), sparse.logits(x[:1]), atol=1e-4)
    assert np.allclose(sparse.logits(x[:1]), sparse.logits(x)[:1], atol=1e-5)


def test_a_sparse_layer_keeps_no_dense_weight(tmp_path: Path) -> None:
    """The memory point of sparse inference: a planned layer holds only its CSR matrix."""
    fleet = make_fleet(tmp_path, versions=1, density=0.1)
    model, _ = build(read_artefact(fleet.export().data), plan=frozenset({"fc1.weight"}))
    assert model.module.fc1.weight.numel() == 0
    assert model.module.fc2.weight.numel() == 64 * 10


def test_the_dense_model_and_the_artefact_agree_with_plain_torch(tmp_path: Path) -> None:
    """fp32 export: the loaded model is the checkpoint's model, as torch computes it."""
    fleet = make_fleet(tmp_path, versions=1)
    checkpoint = fleet.store.load_checkpoint("lab")
    reference = create_model("mlp")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.weights.items()})
    model, _ = build(read_artefact(fleet.export(values="fp32").data), plan="sparse")
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    assert np.allclose(model.logits(x), expected, atol=1e-5)


def test_load_serves_the_active_version_and_counts_predictions(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, versions=1)
    models = tmp_path / "models"
    _install(models, fleet.export().data)
    model = load(models)
    prediction = model.predict(np.zeros((4, 1, 8, 8), dtype=np.float32))
    assert prediction.labels == tuple(model.classes[i] for i in prediction.indices)
    assert prediction.logits.shape == (4, 10)
    assert model.predict(np.zeros((1, 8, 8), dtype=np.float32)).logits.shape == (1, 10)
    with pytest.raises(DataError, match="shape"):
        model.predict(np.zeros((2, 3), dtype=np.float32))
    model.close()
    store = ModelStore(models)
    active = store.state().active
    assert active is not None
    assert store.usage(active) == (5, 1)
    assert store.read_plan(active.version) is not None  # measured once, cached


def test_load_refuses_a_file_changed_after_install(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, versions=1)
    models = tmp_path / "models"
    data = fleet.export().data
    _install(models, data)
    path = ModelStore(models).artefact_path(read_artefact(data).manifest.version)
    path.write_bytes(fleet.export(values="fp16", version="lab-r0-int8").data)
    with pytest.raises(DataError, match="changed since it was installed"):
        load(models)


def test_load_with_nothing_deployed_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no active model"):
        load(tmp_path / "empty")


def _png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


def test_images_are_resized_scaled_and_normalised(tmp_path: Path) -> None:
    pixels = np.full((16, 16), 255, dtype=np.uint8)
    _png(tmp_path / "a.png", pixels)
    x = read_examples(tmp_path / "a.png", (1, 8, 8), {"mean": [0.5], "std": [0.25]})
    assert x.shape == (1, 1, 8, 8)
    assert np.allclose(x, (1.0 - 0.5) / 0.25)
    _png(tmp_path / "b.png", np.zeros((8, 8)))
    both = read_examples(tmp_path, (1, 8, 8), None)
    assert both.shape == (2, 1, 8, 8) and both[0].max() == 1.0 and both[1].max() == 0.0


def test_csv_rows_and_numpy_arrays_are_examples(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b,c,d\n1,2,3,4\n5,6,7,8\n")
    assert read_examples(tmp_path / "x.csv", (1, 2, 2)).shape == (2, 1, 2, 2)
    np.savez(tmp_path / "x.npz", x=np.ones((3, 4)))
    assert read_examples(tmp_path / "x.npz", (1, 2, 2)).shape == (3, 1, 2, 2)
    np.save(tmp_path / "x.npy", np.ones((1, 2, 2)))
    assert read_examples(tmp_path / "x.npy", (1, 2, 2)).shape == (1, 1, 2, 2)
    (tmp_path / "bad.csv").write_text("1,2,3,4\n5,x,7,8\n")
    with pytest.raises(DataError, match=r"bad.csv:2"):
        read_examples(tmp_path / "bad.csv", (1, 2, 2))
    with pytest.raises(DataError, match="not examples of shape"):
        read_examples(tmp_path / "x.npz", (1, 3, 3))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(DataError, match="unknown input type"):
        read_examples(tmp_path / "x.txt", (1, 2, 2))


def test_fleet_device_predict_prints_one_label_per_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet(tmp_path, versions=1)
    models = tmp_path / "models"
    _install(models, fleet.export().data)
    np.savez(tmp_path / "batch.npz", x=np.zeros((3, 1, 8, 8), dtype=np.float32))
    code = device_main(
        ["predict", "--input", str(tmp_path / "batch.npz"), "--models-dir", str(models)]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0", "1", "2"]
    code = device_main(
        ["predict", "--input", str(tmp_path / "batch.npz"), "--models-dir", str(models), "--json"]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and len(rows) == 3 and len(rows[0]["logits"]) == 10
    assert rows[0]["version"] == "lab-r0-int8"


def test_fleet_device_predict_without_a_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "batch.npz", x=np.zeros((1, 1, 8, 8)))
    code = device_main(
        ["predict", "--input", str(tmp_path / "batch.npz"), "--models-dir", str(tmp_path / "m")]
    )
    err = capsys.readouterr().err
    assert code == NotFoundError.exit_code
    assert err.startswith("fleet-device: error:") and len(err.strip().splitlines()) == 1

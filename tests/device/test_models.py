"""The model registry: architectures, parameter counts, seeded init, prunable layer names."""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import sys

import pytest
import torch

from device.models import (
    MODELS,
    ModelSpec,
    create_model,
    model_names,
    model_spec,
    num_parameters,
    prunable_names,
)

torch.set_num_threads(1)

# Pinned from the issue (mnist_cnn, femnist_cnn) and computed once by hand (cifar_cnn:
# 456 + 2,416 + 768,120 + 10,164 + 850; mlp: 64*64 + 64 + 64*10 + 10).
PARAMETER_COUNTS = {
    "mnist_cnn": 261_840,
    "femnist_cnn": 6_603_710,
    "cifar_cnn": 782_006,
    "mlp": 4_810,
}

# state_dict name -> shape, the layer-by-layer architecture each paper specifies.
ARCHITECTURES = {
    "mnist_cnn": {
        "conv1.weight": (10, 1, 5, 5),
        "conv1.bias": (10,),
        "conv2.weight": (20, 10, 5, 5),
        "conv2.bias": (20,),
        "fc1.weight": (50, 5120),
        "fc1.bias": (50,),
        "fc2.weight": (10, 50),
        "fc2.bias": (10,),
    },
    "femnist_cnn": {
        "conv1.weight": (32, 1, 5, 5),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 5, 5),
        "conv2.bias": (64,),
        "fc1.weight": (2048, 3136),
        "fc1.bias": (2048,),
        "fc2.weight": (62, 2048),
        "fc2.bias": (62,),
    },
    "cifar_cnn": {
        "conv1.weight": (6, 3, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16,),
        "fc1.weight": (120, 6400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "fc2.bias": (84,),
        "fc3.weight": (10, 84),
        "fc3.bias": (10,),
    },
    "mlp": {
        "fc1.weight": (64, 64),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    },
}


def test_registry_holds_the_models_of_the_issue() -> None:
    """Every model the configs may name is registered, listed sorted."""
    assert model_names() == sorted(PARAMETER_COUNTS) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_pinned(name: str) -> None:
    """The counts the papers report: a changed layer would change every figure we compare."""
    assert num_parameters(create_model(name, seed=0)) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_state_dict_names_and_shapes_follow_the_papers(name: str) -> None:
    """Masks and wire messages are keyed by these state_dict names, in this order."""
    state = create_model(name, seed=0).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == ARCHITECTURES[name]
    assert list(state) == list(ARCHITECTURES[name])


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_models_map_their_input_shape_to_logits(name: str) -> None:
    """A batch of the spec's input shape gives one unnormalised logit per class: no softmax
    inside (values of both signs, rows not summing to one, log-sum-exp not zero)."""
    spec = model_spec(name)
    out = create_model(name, seed=1)(torch.randn(3, *spec.input_shape))
    assert out.shape == (3, spec.num_classes) and out.dtype == torch.float32
    assert (out < 0).any() and (out > 0).any()
    assert not torch.allclose(out.sum(1), torch.ones(3), atol=1e-3)
    assert not torch.allclose(torch.logsumexp(out, 1), torch.zeros(3), atol=1e-3)


def test_model_specs_state_inputs_and_classes() -> None:
    """The metadata the data side checks a dataset against."""
    assert model_spec("mnist_cnn") == ModelSpec("mnist_cnn", (1, 28, 28), 10)
    assert model_spec("femnist_cnn") == ModelSpec("femnist_cnn", (1, 28, 28), 62)
    assert model_spec("cifar_cnn") == ModelSpec("cifar_cnn", (3, 32, 32), 10)
    assert model_spec("mlp") == ModelSpec("mlp", (1, 8, 8), 10)
    with pytest.raises(AttributeError):
        model_spec("mlp").num_classes = 3  # type: ignore[misc]


@pytest.mark.parametrize("call", [create_model, model_spec])
def test_unknown_model_names_list_the_known_ones(call: object) -> None:
    """Registries raise ValueError naming what exists (DESIGN section 10.6)."""
    with pytest.raises(
        ValueError, match="unknown model 'resnet'; known: cifar_cnn, femnist_cnn, mlp, mnist_cnn"
    ):
        call("resnet")  # type: ignore[operator]


def state_digest(model: torch.nn.Module) -> str:
    buffer = io.BytesIO()
    for name, tensor in model.state_dict().items():
        buffer.write(name.encode() + tensor.numpy().tobytes())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_seeded_init_is_reproducible_and_seed_dependent() -> None:
    """The fleet manager creates the initial global model from a seed: the same seed gives
    the same weights, another seed other weights."""
    a, b = create_model("mnist_cnn", seed=7), create_model("mnist_cnn", seed=7)
    c = create_model("mnist_cnn", seed=8)
    assert state_digest(a) == state_digest(b) != state_digest(c)


def test_seeded_init_leaves_the_global_rng_alone() -> None:
    """Creating a model must not shift the random stream of whatever else the process does
    (data shuffling, another device's training in the same simulation)."""
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    create_model("femnist_cnn", seed=1)
    assert torch.equal(torch.rand(5), expected)


def test_seeded_init_is_the_same_in_another_process() -> None:
    """Devices and the fleet manager run in different processes; the seeded weights must not
    depend on process state."""
    code = (
        "import hashlib, io, torch\n"
        "from device.models import create_model\n"
        "torch.manual_seed(999)\n"  # the global stream must not matter
        "m = create_model('mnist_cnn', seed=42)\n"
        "b = io.BytesIO()\n"
        "[b.write(k.encode() + v.numpy().tobytes()) for k, v in m.state_dict().items()]\n"
        "print(hashlib.sha256(b.getvalue()).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == state_digest(create_model("mnist_cnn", seed=42))


def test_seeded_init_follows_pytorch_default_distribution() -> None:
    """Seeded weights are drawn as PyTorch's own reset_parameters draws them: uniform within
    1/sqrt(fan_in) (weights and biases), so training behaves as with unseeded models. Checked
    on femnist's 6.4M-entry fc1, where the spread of a uniform law is bound/sqrt(3)."""
    state = create_model("femnist_cnn", seed=3).state_dict()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        bound = 1 / math.sqrt(weight[0].numel()) * (1 + 1e-6)  # float32 rounding of the bound
        assert float(weight.abs().max()) <= bound and float(bias.abs().max()) <= bound
        assert float(weight.abs().max()) > 0.95 * bound
    fc1 = state["fc1.weight"]
    assert abs(float(fc1.std()) - (1 / math.sqrt(3136)) / math.sqrt(3)) < 1e-3 / math.sqrt(3136)
    assert abs(float(fc1.mean())) < 1e-3 / math.sqrt(3136)


def test_seeded_models_are_ordinary_cpu_models() -> None:
    """Building on the meta device must leave nothing behind: real CPU tensors, finite,
    trainable, with the same state_dict keys as an unseeded model."""
    seeded, plain = create_model("cifar_cnn", seed=0), create_model("cifar_cnn")
    assert list(seeded.state_dict()) == list(plain.state_dict())
    for p in seeded.parameters():
        assert p.device.type == "cpu" and p.requires_grad and bool(torch.isfinite(p).all())


def test_unseeded_init_uses_the_global_rng() -> None:
    """Without a seed, models follow torch.manual_seed like any nn.Module."""
    torch.manual_seed(5)
    a = create_model("mlp")
    torch.manual_seed(5)
    assert state_digest(a) == state_digest(create_model("mlp"))


def test_prunable_names_are_conv_and_linear_weights_in_order() -> None:
    """Masks cover every conv and linear weight, first layer first; biases stay dense."""
    model = create_model("cifar_cnn", seed=0)
    weights = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert prunable_names(model) == weights
    assert prunable_names(model, include_first=False) == weights[1:]
    assert prunable_names(model, include_last=False) == weights[:-1]
    assert prunable_names(model, include_first=False, include_last=False) == weights[1:-1]
    assert set(weights) <= set(model.state_dict())


def test_prunable_names_skip_norm_layers_and_nested_modules_keep_their_prefix() -> None:
    """Normalisation layers stay dense, and nested layers are named as state_dict names them."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.BatchNorm2d(2),
        torch.nn.Sequential(torch.nn.Linear(2, 2)),
    )
    assert prunable_names(model) == ["0.weight", "2.0.weight"]
    assert prunable_names(torch.nn.ReLU()) == []


def test_mlp_accepts_images_or_flat_rows_and_custom_sizes() -> None:
    """The digits mlp takes [N, 1, 8, 8] images and their [N, 64] rows alike; its sizes are
    configurable through create_model."""
    mlp = create_model("mlp", seed=0)
    images = torch.randn(4, 1, 8, 8)
    assert torch.equal(mlp(images), mlp(images.reshape(4, 64)))
    wide = create_model("mlp", seed=0, in_features=784, hidden=32, out_features=10)
    assert num_parameters(wide) == 784 * 32 + 32 + 32 * 10 + 10
    with pytest.raises(ValueError, match="hidden must be at least 1"):
        create_model("mlp", hidden=0)

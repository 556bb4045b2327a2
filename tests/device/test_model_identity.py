"""Model identity: references, the registry of names (entry points), factories, digests.

A run names its model as a built-in, a registered name or a factory (DESIGN section 12); every
ModelSnapshot carries the architecture digest, and a device refuses a model it builds
differently. These tests pin what that rests on: the digest is a pure function of the layout
and the reference, registered names are found through installed metadata, and every way a
user's factory can fail is one ``ConfigError`` naming it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from device.errors import ConfigError
from device.model_id import (
    ArchitectureCheck,
    ArchitectureMismatchError,
    architecture,
    architecture_digest,
    check_model,
    digest_of,
    offers,
    snapshot_ref,
)
from device.model_ref import ModelOffer, ModelRef
from device.model_registry import (
    BUILTIN,
    GROUP,
    ModelFactoryError,
    lookup,
    model_names,
    registered,
)
from device.models import create_model, empty_model, find_model_spec, model_spec, prunable_names
from device.wire.messages import ModelSnapshot
from tests.model_packages import make_package, unique_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's model package on sys.path (not installed: no metadata)."""
    name = unique_name()
    monkeypatch.syspath_prepend(str(make_package(tmp_path, name)))
    return name


# -- references ------------------------------------------------------------------------------


def test_a_reference_text_round_trips_and_is_the_identity() -> None:
    """The text form is what model_name holds everywhere; it must rebuild the same model."""
    ref = ModelRef(factory="pkg.models:build", kwargs={"width": 8, "dims": (1, 2)})
    assert ref.text == 'pkg.models:build{"dims":[1,2],"width":8}'
    assert ModelRef.parse(ref.text) == ref
    assert ModelRef.parse("mlp") == ModelRef(name="mlp")
    assert ModelRef.of("mlp").text == "mlp"  # a plain name stays a plain name
    shaped = ModelRef(name="mlp", input_shape=(1, 8, 8), num_classes=10)
    assert shaped.same_model(ModelRef(name="mlp")) and shaped != ModelRef(name="mlp")
    assert ModelRef.from_json(shaped.to_json()) == shaped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of name"),
        ({"name": "a", "factory": "b:c"}, "exactly one of name"),
        ({"name": "has space"}, "not a model name"),
        ({"factory": "no_colon"}, "is not 'package.module:callable'"),
        ({"factory": "pkg:build", "kwargs": {"x": float("nan")}}, "not a finite number"),
        ({"factory": "pkg:build", "kwargs": {"x": object()}}, "object is not a JSON value"),
        ({"factory": "pkg:build", "kwargs": {1: 2}}, "key 1 is not a string"),
        ({"name": "mlp", "input_shape": (1, 0)}, "dimensions >= 1"),
        ({"name": "mlp", "num_classes": 0}, "integer >= 1"),
    ],
)
def test_malformed_references_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelRef(**kwargs)  # type: ignore[arg-type]


def test_kwargs_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="kwargs are not JSON"):
        ModelRef.parse("mlp{hidden: 3}")


# -- the registry ----------------------------------------------------------------------------


def test_pyproject_registers_exactly_the_builtin_fallback_table() -> None:
    """A source checkout (no metadata) and an installed wheel must know the same built-ins."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["entry-points"][GROUP] == dict(BUILTIN)
    assert set(BUILTIN) <= set(model_names())


def test_entry_points_of_an_installed_package_are_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package registering `sensor_net` makes `model: sensor_net` work, with kwargs."""
    name = unique_name()
    make_package(tmp_path, name, entry_points={"sensor_net": f"{name}:build"})
    assert "sensor_net" not in model_names()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "sensor_net" in model_names()
    entry = lookup("sensor_net")
    assert (entry.target, entry.origin) == (f"{name}:build", f"{name} 1.0")
    model = create_model(ModelRef(name="sensor_net", kwargs={"width": 5}), seed=0)
    assert model.state_dict()["fc1.weight"].shape == (5, 64)
    assert model_spec("sensor_net").input_shape == (1, 8, 8)  # the factory's own attributes


def test_two_packages_registering_one_name_make_it_ambiguous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = unique_name(), unique_name()
    make_package(tmp_path / "a", a, entry_points={"clash": f"{a}:build"})
    make_package(tmp_path / "b", b, entry_points={"clash": f"{b}:build"})
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=rf"'clash' is registered by more than one.*{a}:build"):
        create_model("clash")


def test_a_package_cannot_take_over_a_builtin_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique_name()
    make_package(tmp_path, name, entry_points={"mlp": f"{name}:build_custom"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lookup("mlp").target == "device.models:MLP"
    with caplog.at_level(logging.WARNING, logger="device.model_registry"):
        assert [e.target for e in registered()["mlp"]] == ["device.models:MLP"]
    assert "is a built-in model name" in caplog.text  # said where the table is listed


def test_a_builtin_name_is_looked_up_without_reading_installed_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device looks its model up once per job: a built-in needs no 3 ms metadata scan."""

    def scan(**_: object) -> object:
        raise AssertionError("entry points scanned for a built-in name")

    monkeypatch.setattr(importlib.metadata, "entry_points", scan)
    assert lookup("femnist_cnn").target == BUILTIN["femnist_cnn"]


# -- factories and their errors --------------------------------------------------------------


def test_a_factory_reference_builds_the_users_model(package: str) -> None:
    ref = ModelRef(factory=f"{package}:build", kwargs={"width": 7})
    model = create_model(ref, seed=3)
    assert type(model).__name__ == "TinyNet" and model.fc1.out_features == 7
    assert find_model_spec(ref) is not None  # build.input_shape / num_classes


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("{pkg}_missing.models:build", r"cannot import module '{pkg}_missing.models'"),
        ("{pkg}:no_such_function", r"module '{pkg}' has no 'no_such_function'"),
        ("{pkg}:ODD_THREAD_PREFIX", r"'ODD_THREAD_PREFIX' is not callable"),
        ("{pkg}:broken_raises", r"raised RuntimeError: no GPU here"),
        ("{pkg}:broken_not_module", r"returned dict, not a torch.nn.Module"),
    ],
)
def test_every_factory_failure_is_one_config_error_naming_it(
    package: str, factory: str, message: str
) -> None:
    """Import fails, the callable is missing or not callable, raises, returns no Module."""
    target = factory.format(pkg=package)
    for build in (create_model, empty_model, digest_of):
        with pytest.raises(
            ConfigError, match=rf"model factory '{target}'.*" + message.format(pkg=package)
        ):
            build(target)


def test_unknown_names_stay_value_errors_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; known: .*mlp"):
        digest_of("resnet")


def test_builtin_refusing_its_kwargs_is_a_factory_error_naming_the_model() -> None:
    with pytest.raises(ModelFactoryError, match=r"model 'mlp' raised ValueError: .*hidden"):
        create_model(ModelRef(name="mlp", kwargs={"hidden": 0}))


def test_seeded_users_layers_are_reproducible_and_leave_the_global_rng_alone(package: str) -> None:
    """A layer with its own nn.Parameter (unknown to _initialise) is built under a forked,
    seeded RNG: the same seed gives the same weights and the caller's RNG does not move."""
    ref = f"{package}:build_custom"
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = create_model(ref, seed=9), create_model(ref, seed=9)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.fc.weight, create_model(ref, seed=10).fc.weight)
    assert torch.equal(a.scale, torch.full((10,), 0.5))  # the user's own initial value


def test_embeddings_and_non_persistent_buffers_build_correctly(package: str) -> None:
    """Seeded embeddings are drawn from the generator (N(0, 1)); an empty model keeps the
    factory's non-persistent buffer (no state_dict ever restores it)."""
    ref = f"{package}:build_norm_embed"
    model = create_model(ref, seed=1)
    assert torch.equal(model.embed.weight, create_model(ref, seed=1).embed.weight)
    assert 0.5 < float(model.embed.weight.detach().std()) < 1.5
    empty = empty_model(ref)
    assert torch.equal(empty.edges, torch.linspace(-1.5, 1.5, 15))
    assert "edges" not in empty.state_dict()


def test_prunable_patterns_select_parameters_by_full_match() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert prunable_names(model) == ["1.weight"]
    assert prunable_names(model, patterns=[r"0\.weight", r"1\..*"]) == [
        "0.weight",
        "1.weight",
        "1.bias",
    ]
    with pytest.raises(
        ValueError, match=r"matches no parameter of the model \(only buffers: 2\.running_mean\)"
    ):
        prunable_names(model, patterns=[r"2\.running_mean"])
    with pytest.raises(ValueError, match="not a regular expression"):
        prunable_names(model, patterns=["("])


# -- the architecture digest -----------------------------------------------------------------


def test_the_digest_is_the_same_in_another_process() -> None:
    """Devices and the fleet manager are different processes: the digest must not depend on
    hash seeds, dict order or memory addresses."""
    code = (
        "from device.model_id import digest_of; from device.model_ref import ModelRef; "
        "print(digest_of(ModelRef(name='mlp', kwargs={'hidden': 24, 'in_features': 64})).hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert out == digest_of(ModelRef(name="mlp", kwargs={"in_features": 64, "hidden": 24})).hex()


def test_the_digest_does_not_depend_on_how_the_model_was_built() -> None:
    """meta (devices' check), seeded CPU (the fleet manager) and empty (load) agree."""
    ref = ModelRef(name="mnist_cnn")
    expected = digest_of(ref)
    for model in (create_model(ref, seed=0), create_model(ref), empty_model(ref)):
        assert architecture_digest(model, ref) == expected


class _Net(nn.Module):
    def __init__(
        self, width: int = 4, dtype: torch.dtype = torch.float32, norm: bool = False
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width, dtype=dtype)
        self.norm = nn.BatchNorm1d(width, track_running_stats=norm) if norm else None


def test_the_digest_changes_with_any_shape_dtype_buffer_or_kwarg() -> None:
    ref = ModelRef(factory="pkg:net")
    base = architecture_digest(_Net(), ref)
    assert architecture_digest(_Net(), ref) == base
    variants = {
        "shape": architecture_digest(_Net(width=5), ref),
        "dtype": architecture_digest(_Net(dtype=torch.float64), ref),
        "buffers": architecture_digest(_Net(norm=True), ref),
        "kwarg": architecture_digest(_Net(), ModelRef(factory="pkg:net", kwargs={"width": 4})),
        "factory": architecture_digest(_Net(), ModelRef(factory="pkg:other")),
        "name": architecture_digest(_Net(), ModelRef(name="net")),
    }
    assert len({base, *variants.values()}) == 1 + len(variants)
    described = architecture(_Net(norm=True), ref)
    assert described["buffers"] == [
        ["norm.num_batches_tracked", [], "int64"],
        ["norm.running_mean", [4], "float32"],
        ["norm.running_var", [4], "float32"],
    ]
    assert ["fc.weight", [4, 3], "float32"] in described["parameters"]


def test_the_digest_ignores_declared_shapes_which_are_not_identity() -> None:
    assert digest_of(ModelRef(name="mlp", input_shape=(1, 8, 8), num_classes=10)) == digest_of(
        "mlp"
    )


# -- a device's refusal ----------------------------------------------------------------------


def _snapshot(ref: ModelRef, digest: bytes) -> ModelSnapshot:
    weights = {
        k: v.numpy().astype(np.float32) for k, v in create_model(ref, seed=0).state_dict().items()
    }
    return ModelSnapshot(ref.text, 0, b"\0" * 32, 0, weights, {}, ref, digest)


def test_a_device_refuses_a_snapshot_it_builds_differently_naming_both_digests() -> None:
    ref = ModelRef(name="mlp", kwargs={"hidden": 8})
    theirs = digest_of(ModelRef(name="mlp", kwargs={"hidden": 9}))
    ours = digest_of(ref)
    snapshot = _snapshot(ref, theirs)
    reason = ArchitectureCheck().problem(snapshot)
    assert reason is not None
    assert ours.hex()[:16] in reason and theirs.hex()[:16] in reason
    with pytest.raises(ArchitectureMismatchError, match=theirs.hex()[:16]):
        check_model(empty_model(ref), snapshot)
    assert ArchitectureCheck().problem(_snapshot(ref, ours)) is None
    assert ArchitectureCheck().problem(_snapshot(ref, b"")) is None  # an older fleet manager


def test_a_device_names_the_layout_difference_it_sees(package: str) -> None:
    ref = ModelRef(factory=f"{package}:build")
    wider = create_model(ModelRef(factory=f"{package}:build", kwargs={"width": 17}), seed=0)
    weights = {k: v.numpy() for k, v in wider.state_dict().items()}
    snapshot = ModelSnapshot(ref.text, 0, b"", 0, weights, {}, ref, b"\1" * 32)
    reason = ArchitectureCheck().problem(snapshot)
    assert reason is not None and "fc1.weight [17, 64] vs [16, 64] here" in reason


def test_a_model_the_device_cannot_build_is_a_refusal_not_a_crash(package: str) -> None:
    ref = ModelRef(factory=f"{package}_gone:build")
    snapshot = ModelSnapshot(ref.text, 0, b"", 0, {}, {}, ref, b"\1" * 32)
    reason = ArchitectureCheck().problem(snapshot)
    assert reason is not None and "cannot be built on this device" in reason
    assert f"cannot import module '{package}_gone'" in reason


def test_an_older_snapshot_is_built_from_its_model_name() -> None:
    snapshot = ModelSnapshot('mlp{"hidden":5}', 0, b"", 0, {}, {})
    assert snapshot_ref(snapshot) == ModelRef(name="mlp", kwargs={"hidden": 5})


def test_offers_carry_each_reference_with_its_digest(package: str) -> None:
    found = offers(["mlp", f"{package}:build"])
    assert [o.model.text for o in found] == ["mlp", f"{package}:build"]
    assert found[1].architecture_digest == digest_of(f"{package}:build")
    assert ModelOffer.from_json(found[1].to_json()) == found[1]
    with pytest.raises(ConfigError, match=f"model factory '{package}:broken_raises'"):
        offers([f"{package}:broken_raises"])

"""The device profile: structure, what it measures, and that measuring leaves the model alone.

The figures are times and vary run to run, so these tests check structure and the bookkeeping
(which layers, which densities, which kernels, the skip rule), not speeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import device.profile as profile_module
from device.errors import ConfigError
from device.model_ref import ModelRef
from device.models import create_model, prunable_names
from device.profile import DEFAULT_DENSITIES, measure_profile
from device.settings import load_device_config
from device.sparse.kernels import choose_plan
from tests.model_packages import make_package, unique_name

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvAndGroups(nn.Module):
    """A supported conv, a grouped conv (no sparse kernel) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.grouped(F.relu(self.conv(x))))
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]


def test_profile_of_a_registered_model_covers_every_prunable_layer_and_density() -> None:
    """The server's cost model and the chooser look layers up by state_dict name and density."""
    profile = measure_profile("mlp", batch_size=8, repeats=1, warmup=0)
    model = create_model("mlp", seed=0)
    params = dict(model.named_parameters())
    assert profile.model_name == "mlp"
    assert profile.batch_size == 8
    assert [layer.name for layer in profile.layers] == prunable_names(model)
    for layer in profile.layers:
        assert layer.numel == params[layer.name].numel()
        assert [p.density for p in layer.points] == sorted(DEFAULT_DENSITIES, reverse=True)
        for point in layer.points:
            assert point.dense_s > 0 and point.sparse_s > 0  # linear layers have a kernel
    assert profile.step_overhead_s >= 0.0


def test_layers_without_a_kernel_report_no_sparse_time() -> None:
    """sparse_s = 0 means 'no kernel', so the chooser can never pick one for that layer."""
    model = ConvAndGroups()
    profile = measure_profile(
        model, input_shape=(2, 6, 6), batch_size=2, densities=(1.0, 0.1), repeats=1, warmup=0
    )
    by_name = {layer.name: layer for layer in profile.layers}
    assert set(by_name) == {"conv.weight", "grouped.weight", "fc.weight"}
    assert all(p.sparse_s == 0.0 for p in by_name["grouped.weight"].points)
    assert all(p.sparse_s > 0.0 for p in by_name["conv.weight"].points)
    assert profile.model_name == "ConvAndGroups"
    plan = choose_plan(profile, {name: 0.1 for name in by_name}, margin=1.0)
    assert "grouped.weight" not in plan


def test_measuring_leaves_the_callers_model_untouched() -> None:
    """Profiling runs at several densities; it must not prune or train the device's model."""
    model = ConvAndGroups()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_profile(
        model, input_shape=(2, 6, 6), batch_size=2, densities=(0.5,), repeats=1, warmup=0
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_model_instance_needs_its_input_shape() -> None:
    """Without a registry entry the profile cannot know what one example looks like."""
    with pytest.raises(ConfigError, match="needs input_shape"):
        measure_profile(ConvAndGroups(), repeats=1, warmup=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"densities": ()}, "at least one density"),
        ({"densities": (0.0,)}, r"in \(0, 1\]"),
        ({"densities": (0.5, 0.5)}, "distinct"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"skip_factor": 1.0}, "skip_factor"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    """A misconfigured profile command fails with the offending argument in the message."""
    with pytest.raises(ConfigError, match=message):
        measure_profile("mlp", **kwargs)  # type: ignore[arg-type]


def test_unknown_model_names_list_the_known_ones() -> None:
    """Registry convention: the error says what would have been accepted."""
    with pytest.raises(ValueError, match="unknown model 'resnet'; known: "):
        measure_profile("resnet", repeats=1, warmup=0)


def test_sparse_runs_stop_above_the_density_where_they_lose_by_skip_factor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a Pi the dense-ish sparse runs are the slowest part of profiling; once sparse takes
    skip_factor x the dense time, denser points reuse that (lower-bound) time instead of running.
    """
    calls: list[int] = []

    def fake(runs: Sequence[Callable[[], float]], repeats: int, warmup: int) -> list[float]:
        calls.append(len(runs))
        return [1.0, 3.0][: len(runs)]  # sparse always 3x dense

    monkeypatch.setattr(profile_module, "_median_interleaved", fake)
    profile = measure_profile("mlp", batch_size=4, repeats=1, warmup=0, skip_factor=2.0)
    layer = profile.layers[0]
    # Sparsest density measured with both kernels; the four denser ones with dense only.
    assert calls[:5] == [2, 1, 1, 1, 1]
    assert [p.sparse_s for p in layer.points] == [3.0] * len(DEFAULT_DENSITIES)
    assert choose_plan(profile, {layer.name: 1.0}) == set()


def test_a_users_factory_is_profiled_under_its_reference_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device whose fleet trains a user's model profiles that model: the profile names it as
    the run's snapshot does (the reference text), so the agent's kernel plan and PruneFL's time
    model find its layers."""
    name = unique_name()
    monkeypatch.syspath_prepend(str(make_package(tmp_path, name)))
    ref = ModelRef(factory=f"{name}:build", kwargs={"width": 8}, input_shape=(1, 8, 8))
    profile = measure_profile(ref, repeats=1, warmup=0, densities=(1.0, 0.5))
    assert profile.model_name == ref.text
    assert [layer.name for layer in profile.layers] == prunable_names(create_model(ref))


def test_a_device_config_may_profile_a_factory_that_declares_its_input(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "device_id: d1\ndata: {dataset: digits}\n"
        "profile_model: {factory: 'pkg.models:build', kwargs: {width: 8}, input_shape: [1, 8, 8]}\n"
    )
    assert ModelRef.of(load_device_config(good).profile_model).factory == "pkg.models:build"
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: d1\ndata: {dataset: digits}\nprofile_model: 'pkg.models:build'\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: profile_model: .*needs input_shape"):
        load_device_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("device_id: d1\ndata: {dataset: digits}\nprofile_model: no_such_model\n")
    with pytest.raises(ConfigError, match=r"profile_model: unknown model 'no_such_model'"):
        load_device_config(unknown)

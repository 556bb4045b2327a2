"""Building on the meta device skips the initialisers for meta tensors only."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.nn import init

from device.meta import on_meta
from device.models import empty_model


def test_a_model_built_on_meta_runs_no_initialiser(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.Size] = []
    original = init.kaiming_uniform_

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tensor.shape)
        return original(tensor, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(init, "kaiming_uniform_", counting)
    with on_meta():
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(8, 2))
    assert all(p.is_meta for p in model.parameters())
    assert calls == []
    nn.Linear(8, 2)  # outside: the initialiser runs again
    assert calls == [torch.Size([2, 8])]


def test_a_real_tensor_is_initialised_as_usual_while_a_meta_build_is_open() -> None:
    torch.manual_seed(7)
    expected = nn.Linear(16, 4).weight.detach().clone()
    with on_meta():
        torch.manual_seed(7)
        real = nn.Linear(16, 4, device="cpu")
    assert torch.equal(real.weight.detach(), expected)


def test_nn_init_is_restored_after_nested_and_concurrent_builds() -> None:
    before = {name: getattr(init, name) for name in ("kaiming_uniform_", "normal_", "zeros_")}
    barrier = threading.Barrier(4)

    def build() -> None:
        with on_meta():
            barrier.wait()
            with on_meta():
                nn.Linear(4, 4)
            barrier.wait()

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {name: getattr(init, name) for name in before} == before


def test_an_empty_model_still_gets_every_tensor_allocated() -> None:
    model = empty_model("mnist_cnn")
    assert not any(t.is_meta for t in model.state_dict().values())

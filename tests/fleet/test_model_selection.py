"""Selection by capability: a round goes only to devices that can build the run's model.

A device announces the models it can build with their architecture digests; one that
announces nothing is an older agent and builds the built-ins. Selecting a device that cannot
build the model would only cost the round a straggler, so it is never selected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.errors import NotFoundError
from device.model_id import digest_of
from device.model_ref import ModelOffer, ModelRef
from device.wire.messages import DeviceStatus
from fleet.ops.registry import DeviceRegistry
from fleet.runtime.selection import Selection, can_build
from fleet.runtime.spec import RunSpec
from fleet.state.store import Store
from fleet.strategies import create_strategy

MLP = ModelRef(name="mlp")
USER = ModelRef(factory="my_pkg.models:build", kwargs={"width": 8})
GOOD = b"\1" * 32
OTHER = b"\2" * 32


@pytest.mark.parametrize(
    ("offers", "model", "expected"),
    [
        ((), MLP, True),  # an older agent: the built-ins
        ((), ModelRef(name="mlp", kwargs={"hidden": 3}), True),
        ((), USER, False),
        ((ModelOffer(USER, GOOD),), USER, True),
        ((ModelOffer(USER, OTHER),), USER, False),  # it would refuse the round
        ((ModelOffer(USER, b""),), USER, True),  # digest not computed: the device checks
        # Same factory, other kwargs: the device has the code; the round's check decides.
        ((ModelOffer(ModelRef(factory=USER.factory), OTHER),), USER, True),
        ((ModelOffer(MLP, GOOD),), USER, False),
        ((ModelOffer(USER, GOOD),), MLP, False),  # announcing replaces the built-in default
    ],
)
def test_the_capability_rule(
    offers: tuple[ModelOffer, ...], model: ModelRef, expected: bool
) -> None:
    assert can_build(offers, model, GOOD) is expected


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DeviceRegistry]:
    with Store(tmp_path / "state") as store:
        yield DeviceRegistry(store)


def _birth(registry: DeviceRegistry, device_id: str, *offers: ModelOffer) -> None:
    registry.apply_status(
        device_id, DeviceStatus(online=True, session_epoch=1, agent_version="1", models=offers)
    )


def _selection(registry: DeviceRegistry, model: str, timeout_s: float = 0.0) -> Selection:
    spec = RunSpec(
        run_id="r",
        model_name=model,
        strategy="fedavg",
        rounds=1,
        clients_per_round=1,
        round_timeout_s=timeout_s or 0.01,
    )
    return Selection(
        spec,
        registry,
        create_strategy("fedavg", clients_per_round=1),
        drain=lambda _s: None,
        clock=iter(range(10**6)).__next__,
    )


def test_offers_persist_in_the_registry_and_filter_the_candidates(
    registry: DeviceRegistry,
) -> None:
    wide = 'mlp{"hidden":8}'
    _birth(registry, "old")  # announces nothing
    _birth(registry, "user", ModelOffer(ModelRef.parse(wide), digest_of(wide)))
    _birth(registry, "stale", ModelOffer(ModelRef.parse(wide), OTHER))
    assert registry.get("user").models == (ModelOffer(ModelRef.parse(wide), digest_of(wide)),)
    ids = [c.device_id for c in _selection(registry, wide).candidates()]
    assert ids == ["old", "user"]  # "stale" builds another layout of the same model
    assert [c.device_id for c in _selection(registry, "cifar_cnn").candidates()] == ["old"]


def test_no_capable_device_says_that_devices_are_online_but_cannot_build_it(
    registry: DeviceRegistry,
) -> None:
    _birth(registry, "old")
    with pytest.raises(NotFoundError, match=r"1 online device\(s\) cannot build model 'a.b:c'"):
        _selection(registry, "a.b:c").wait_for_candidates(1)

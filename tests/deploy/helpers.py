"""What the deployment tests share: a store holding a run's model, the signing key, an exported
artefact, and device agents that follow deployments over the in-memory broker."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.agent import AgentOptions, DeviceAgent
from device.deploy import DeployOptions, LocalSample
from device.models import create_model, prunable_names
from device.trust import TrustedKeys
from device.wire.memory import MemoryBroker, MemoryTransport
from fleet.deploy.export import Exported, export_run
from fleet.deploy.signing import DeployKey, generate_key
from fleet.state.store import Store

RUN = "lab"
MODEL = "mlp"  # 64 -> 64 -> 10: small, so that every test is quick


def pruned_weights(
    model: str = MODEL, density: float = 0.3, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A model's seeded weights with every prunable tensor magnitude-pruned to ``density``."""
    module = create_model(model, seed=seed)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    masks = {}
    for name in prunable_names(module):
        w = weights[name]
        keep = max(1, round(density * w.size))
        threshold = np.sort(np.abs(w).ravel())[-keep]
        masks[name] = np.abs(w) >= threshold
        weights[name] = np.where(masks[name], w, 0.0).astype(np.float32)
    return weights, masks


def store_with_run(
    root: Path, *, model: str = MODEL, versions: int = 2, density: float = 0.3
) -> Store:
    """A store with run ``RUN`` of ``model``: checkpoints 0..versions-1, each a different
    pruned model (version v seeded with v), and closed rounds 1..versions-1 with metrics."""
    store = Store(root)
    store.create_run(RUN, config={}, strategy="feddst", model_name=model)
    store.set_run_status(RUN, "running")
    for version in range(versions):
        weights, masks = pruned_weights(model, density, seed=version)
        store.save_checkpoint(
            RUN,
            version,
            weights,
            masks,
            meta={"mask_version": version},
            round=version or None,
        )
        if version:
            store.open_round(RUN, version, selected=[], deadline=0.0, model_version_in=version - 1)
            store.close_round(
                RUN,
                version,
                model_version_out=version,
                metrics={"accuracy": 0.5 + version / 100, "federated_accuracy": 0.4},
            )
    return store


@dataclass
class Fleet:
    """An in-memory broker, a store with a run, the deployment key and some devices."""

    root: Path
    store: Store
    key: DeployKey
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    agents: dict[str, DeviceAgent] = field(default_factory=dict)

    def export(self, **kwargs: object) -> Exported:
        kwargs.setdefault("dataset", "digits")
        return export_run(self.store, RUN, self.key, **kwargs)  # type: ignore[arg-type]

    def trusted(self) -> TrustedKeys:
        return TrustedKeys([self.key.public_raw])

    def device(
        self,
        device_id: str,
        *,
        sample: LocalSample | None = None,
        classes: tuple[str, ...] | None = None,
        trusted: TrustedKeys | None = None,
        download_timeout_s: float = 5.0,
        retries: int = 2,
        remote_inference: bool = False,
        pin: str | None = None,
        start: bool = True,
    ) -> DeviceAgent:
        """A device agent (not yet started unless ``start``) with its models directory."""
        options = DeployOptions(
            models_dir=self.root / "devices" / device_id / "models",
            trusted=trusted or self.trusted(),
            classes=classes,
            remote_inference=remote_inference,
            download_timeout_s=download_timeout_s,
            retries=retries,
            status_interval_s=0.2,
            local_data=lambda: sample,
            pin=pin,
        )
        agent = DeviceAgent(
            MemoryTransport(self.broker, device_id),
            lambda partition: None,  # type: ignore[arg-type,return-value]
            AgentOptions(device_id=device_id, deploy=options),
        )
        self.agents[device_id] = agent
        if start:
            agent.start()
        return agent

    def fleet_transport(self) -> MemoryTransport:
        transport = MemoryTransport(self.broker, "fleet-manager-deploy", session_expiry_s=0)
        transport.connect()
        return transport

    def stop(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):  # a test's teardown stops what it can
                agent.stop(timeout_s=5)


def make_fleet(tmp_path: Path, **store_kwargs: object) -> Fleet:
    store = store_with_run(tmp_path / "state", **store_kwargs)  # type: ignore[arg-type]
    return Fleet(tmp_path, store, generate_key(tmp_path / "pki"))


def digits_sample(n: int = 32) -> LocalSample:
    """Digits-shaped examples (random values) labelled 0..9."""
    rng = np.random.default_rng(1)
    return LocalSample(
        x=rng.standard_normal((n, 1, 8, 8)).astype(np.float32),
        y=(np.arange(n) % 10).astype(np.int64),
        num_classes=10,
        example_shape=(1, 8, 8),
    )


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)

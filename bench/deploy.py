"""Deployment figures (issue 20; docs/benchmarks.md, "Deployment"): artefact size, accuracy of
the quantised model, inference latency and memory against dense torch, fan-out to 100 devices.

1. **Train** ``femnist_cnn`` with FedDST at density 0.1 on MNIST (a short run: ``--rounds``
   rounds of ``--devices`` simulated devices, iid; evaluation at the end), or reuse the run in
   ``--work`` (the runner resumes).
2. **Size**: the int8 artefact (``fleet model export``) against ``torch.save`` of the dense fp32
   state_dict of the same model.
3. **Accuracy**: top-1 on the 10,000 MNIST test images of the fp32 sparse model and of the int8
   artefact, and how often their predictions agree.
4. **Latency**: the int8 artefact loaded with ``device.inference.load`` (kernel plan measured
   and cached at install) against dense torch (``load_state_dict`` of the dense weights), one
   example and a batch of 32, the same inputs, median of many calls.
5. **Memory**: peak RSS (``ru_maxrss``) of a fresh process that loads and predicts a batch of 32,
   each way; also its RSS after the imports alone.
6. **Fan-out**: over a local mosquitto, the time to publish the artefact once (retained, QoS 1,
   acknowledged), the fleet manager's publishing of a deployment addressed to 100 devices
   (artefact and notice, once), the time until all 100 device connections (in 4 worker
   processes) hold the whole artefact, and the whole ``Rollout.deploy`` call (which also listens
   0.5 s for retained statuses and records the deployment in the store).

    python bench/deploy.py --work /tmp/deploy-bench --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"
RUN = "femnist-deploy"


def train(args: argparse.Namespace) -> Path:
    """The FedDST run (resumed or finished when it already exists); returns the state dir."""
    import torch

    from fleet.runtime.runner import RunSpec
    from fleet.sim import SimSpec, simulate
    from fleet.state.store import Store

    state = args.work / "state"
    if state.exists():
        with Store(state) as store:
            runs = {r.run_id: r for r in store.list_runs()}
            if RUN in runs and runs[RUN].status.value == "finished":
                return state
    torch.set_num_threads(1)
    run = RunSpec(
        run_id=RUN,
        model_name="femnist_cnn",
        strategy="feddst",
        rounds=args.rounds,
        clients_per_round=args.per_round,
        strategy_options={
            "clients_per_round": args.per_round,
            "density": 0.1,
            "readjust_every": 2,
            "total_rounds": args.rounds,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.05, "max_steps": args.steps},
        },
        round_timeout_s=3600.0,
        eval_every=args.rounds,
        seed=0,
    )
    sim = SimSpec(devices=args.devices, dataset="mnist", data_dir=args.data_dir, partition="iid")
    start = time.time()
    reports = simulate(run, sim, state)
    print(f"trained {len(reports)} rounds in {time.time() - start:.0f} s", flush=True)
    return state


def export(state: Path, values: str, work: Path) -> bytes:
    from fleet.deploy.export import export_run
    from fleet.deploy.signing import ensure_key
    from fleet.state.store import Store

    key, _ = ensure_key(work / "pki")
    with Store(state) as store:
        return export_run(store, RUN, key, values=values, dataset="mnist", now=0.0).data


def dense_file(state: Path, path: Path) -> int:
    """``torch.save`` of the checkpoint's dense fp32 state_dict (zeros outside the masks)."""
    import torch

    from fleet.state.store import Store

    with Store(state) as store:
        weights = store.load_checkpoint(RUN).weights
    torch.save(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}, path
    )
    return path.stat().st_size


def accuracy(fp32: bytes, int8: bytes, data_dir: Path) -> dict[str, float]:
    from device.data import load_mnist
    from device.inference import build
    from device.wire.artefact import read_artefact

    test = load_mnist(data_dir, split="test")
    out: dict[str, Any] = {}
    predictions = {}
    for name, data in (("fp32", fp32), ("int8", int8)):
        model, _ = build(read_artefact(data), plan="dense")
        pred = np.concatenate(
            [model.predict(test.x[i : i + 500].numpy()).indices for i in range(0, len(test), 500)]
        )
        predictions[name] = pred
        out[f"top1_{name}"] = float((pred == test.y.numpy()).mean())
    out["agreement"] = float((predictions["fp32"] == predictions["int8"]).mean())
    return out


def install(models: Path, data: bytes) -> None:
    from device.inference import load
    from device.model_store import ModelStore
    from device.wire.artefact import read_artefact

    store = ModelStore(models)
    version = read_artefact(data).manifest.version
    store.write(version, data)
    store.activate(version, hashlib.sha256(data).hexdigest())
    load(models).close()  # measures and caches the kernel plan, as a device's install does


def latency(models: Path, dense_path: Path, repeats: int) -> dict[str, Any]:
    import torch

    from device.inference import load
    from device.models import create_model

    ours = load(models)
    dense = create_model("femnist_cnn")
    dense.load_state_dict(torch.load(dense_path))
    dense.eval()
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"sparse_layers": sorted(ours.sparse_layers)}
    for batch in (1, 32):
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        xt = torch.from_numpy(x)
        times: dict[str, list[float]] = {"ours": [], "dense": []}
        with torch.no_grad():
            for _ in range(5):
                ours.logits(x, count=False)
                dense(xt)
            for _ in range(repeats if batch == 1 else max(10, repeats // 4)):
                start = time.perf_counter()
                ours.logits(x, count=False)
                times["ours"].append(time.perf_counter() - start)
                start = time.perf_counter()
                dense(xt)
                times["dense"].append(time.perf_counter() - start)
        for k, v in times.items():
            out[f"{k}_ms_batch{batch}"] = 1000 * statistics.median(v)
    return out


# Peak RSS is the kernel's high-water mark of the process's own memory (VmHWM; ru_maxrss would
# carry the parent's high-water mark over fork and exec). Both import torch and the model code
# first ("imports"), then load and predict a batch of 32 ("peak").
_HWM = "int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1])"
_RSS_OURS = """
import sys, numpy as np, torch
sys.path.insert(0, {repo!r})
from device.inference import load
base = {hwm}
m = load({models!r})
m.predict(np.zeros((32, 1, 28, 28), dtype=np.float32))
print(base, {hwm})
"""
_RSS_DENSE = """
import sys, numpy as np, torch
sys.path.insert(0, {repo!r})
import device.inference
from device.models import create_model
base = {hwm}
m = create_model("femnist_cnn")
m.load_state_dict(torch.load({dense!r}))
m.eval()
with torch.no_grad():
    m(torch.zeros((32, 1, 28, 28)))
print(base, {hwm})
"""


def peak_rss(models: Path, dense_path: Path) -> dict[str, float]:
    out = {}
    for name, code in (("ours", _RSS_OURS), ("dense", _RSS_DENSE)):
        script = code.format(repo=str(REPO), models=str(models), dense=str(dense_path), hwm=_HWM)
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        base, peak = map(int, result.stdout.split())
        out[f"{name}_imports_mib"] = base / 1024
        out[f"{name}_peak_mib"] = peak / 1024
    return out


def _receivers(
    host: str, port: int, first: int, count: int, ready: Any, done: Any, topic: str
) -> None:  # a worker process: ``count`` device connections waiting for the artefact
    from device.wire.mqtt import MqttTransport

    clients = []
    for i in range(first, first + count):
        t = MqttTransport(f"dev-{i:03d}", host=host, port=port, session_expiry_s=0)
        t.connect()
        t.subscribe(topic)
        clients.append(t)
    ready.put(count)
    pending = set(range(len(clients)))
    last = 0.0
    while pending:
        for i in list(pending):
            message = clients[i].get(timeout_s=0.01)
            if message is not None and message.payload:
                pending.discard(i)
                last = time.time()
    done.put(last)
    for t in clients:
        t.close()


def fan_out(data: bytes, devices: int, work: Path) -> dict[str, float]:
    from device.wire import envelope
    from device.wire.artefact import read_artefact
    from device.wire.broker import MosquittoBroker
    from device.wire.messages import DeployArtefact, Envelope
    from device.wire.mqtt import MqttTransport
    from device.wire.topics import Topics
    from fleet.deploy.rollout import Rollout, RolloutOptions
    from fleet.deploy.targets import Targets
    from fleet.state.store import Store

    topics = Topics()
    out: dict[str, float] = {}
    with MosquittoBroker() as broker:
        fleet = MqttTransport(
            "fleet-manager-deploy", host=broker.host, port=broker.port, session_expiry_s=0
        )
        fleet.connect()
        payload = envelope.encode(Envelope(body=DeployArtefact(data)))
        once = []
        for i in range(5):
            start = time.perf_counter()
            fleet.publish(f"bench/once/{i}", payload, qos=1, retain=True)
            once.append(time.perf_counter() - start)
        out["publish_once_ms"] = 1000 * statistics.median(once)
        ctx = mp.get_context("spawn")
        ready, done = ctx.Queue(), ctx.Queue()
        workers = min(4, devices)
        per = devices // workers
        procs = [
            ctx.Process(
                target=_receivers,
                args=(
                    broker.host,
                    broker.port,
                    k * per,
                    per,
                    ready,
                    done,
                    f"{topics.prefix}/deploy/+/artefact",
                ),
            )
            for k in range(workers)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        with Store(work / "fanout-state") as store:
            rollout = Rollout(store, fleet, topics)
            targets = Targets(tuple(f"dev-{i:03d}" for i in range(devices)), False, "bench")
            record = rollout._record(
                "deploy",
                read_artefact(data),
                data,
                targets,
                dict.fromkeys(targets.devices, "target"),
                0.0,
            )
            start_wall, start = time.time(), time.perf_counter()
            rollout._publish(record, data, targets.devices, False)  # artefact, then the notice
            out[f"deploy_{devices}_publish_ms"] = 1000 * (time.perf_counter() - start)
            last = max(done.get(timeout=300) for _ in procs)
            begin = time.perf_counter()
            rollout.deploy(data, targets, RolloutOptions(wait_s=0))
            out[f"deploy_command_{devices}_ms"] = 1000 * (time.perf_counter() - begin)
        out[f"delivered_{devices}_ms"] = 1000 * (last - start_wall)
        for p in procs:
            p.join(30)
        fleet.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deploy-bench")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="local SGD steps per round")
    parser.add_argument("--repeats", type=int, default=200, help="latency samples")
    parser.add_argument("--fan-out", type=int, default=100, help="devices for the fan-out")
    parser.add_argument("--skip", nargs="*", default=(), help="accuracy latency rss fanout")
    parser.add_argument(
        "--artefact",
        type=Path,
        help="with --dense: only latency and memory, of this int8 artefact (another machine)",
    )
    parser.add_argument("--dense", type=Path, help="the dense state_dict file for --artefact")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    if args.artefact is not None:
        models = args.work / "models"
        if not models.exists():
            install(models, args.artefact.read_bytes())
        results.update(latency(models, args.dense, args.repeats))
        results.update(peak_rss(models, args.dense))
        print(json.dumps(results, indent=1, default=str), flush=True)
        return 0
    state = train(args)
    int8, fp32 = export(state, "int8", args.work), export(state, "fp32", args.work)
    dense_path = args.work / "dense_state_dict.pt"
    results["dense_state_dict_bytes"] = dense_file(state, dense_path)
    results["artefact_int8_bytes"] = len(int8)
    results["artefact_fp32_bytes"] = len(fp32)
    results["size_ratio"] = results["dense_state_dict_bytes"] / len(int8)
    print(json.dumps(results, indent=1), flush=True)
    if "accuracy" not in args.skip:
        results.update(accuracy(fp32, int8, args.data_dir))
        print(json.dumps(results, indent=1), flush=True)
    models = args.work / "models"
    if not models.exists():
        install(models, int8)
    if "latency" not in args.skip:
        results.update(latency(models, dense_path, args.repeats))
    if "rss" not in args.skip:
        results.update(peak_rss(models, dense_path))
    if "fanout" not in args.skip:
        results.update(fan_out(int8, args.fan_out, args.work))
    results["self_rusage_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=1, default=str), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
   acknowledged) against a whole deployment to 1 and to 100 simulated devices (in 4 worker
   processes, one thread each) that follow the protocol on the wire: from the fleet manager's
   publish until its store records every device ``active``, and until every device holds the
   artefact; with the CPU time of the fleet manager, the broker and the devices apart.

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


def _device(
    transport: Any, device_id: str, prefix: str, go: Any, held: dict[str, float]
) -> None:  # one simulated device on its own thread: the device side of the protocol, on the wire
    import hashlib as _hashlib

    from device.wire import envelope
    from device.wire.messages import (
        DeployedModel,
        DeployEvent,
        DeployNotice,
        DeployState,
        DeviceStatus,
        Envelope,
    )
    from device.wire.topics import TopicKind, Topics

    topics = Topics(prefix)
    go.wait()
    notice: DeployNotice | None = None
    deployment = ""

    def report(state: DeployState) -> None:
        event = DeployEvent(state=state, version=notice.version, timestamp_unix_s=time.time())
        env = Envelope(body=event, device_id=device_id, correlation_id=deployment)
        transport.publish(topics.dev_events(device_id), envelope.encode(env), wait=False)

    while True:
        message = transport.get(timeout_s=1.0)
        if message is None or not message.payload:
            continue
        parsed = topics.parse(message.topic)
        body = envelope.decode(message.payload).body
        if parsed.kind == TopicKind.DEPLOY_NOTICE and isinstance(body, DeployNotice):
            if notice is None and body.addresses(device_id):
                notice, deployment = body, parsed.deployment_id
                report(DeployState.DOWNLOADING)
                transport.subscribe(topics.deploy_artefact(deployment))
        elif parsed.kind == TopicKind.DEPLOY_ARTEFACT and notice is not None:
            data = body.data  # type: ignore[union-attr]
            held[device_id] = time.time()
            if _hashlib.sha256(data).digest() != notice.artefact_sha256:
                raise SystemExit(f"{device_id}: artefact digest differs from the notice")
            report(DeployState.VERIFIED)
            report(DeployState.ACTIVE)
            deployed = DeployedModel(
                version=notice.version,
                artefact_sha256=notice.artefact_sha256,
                deployment_id=deployment,
                since_unix_s=time.time(),
                last_deployment_id=deployment,
                last_state=DeployState.ACTIVE,
                last_event_unix_s=time.time(),
            )
            status = DeviceStatus(
                online=True, session_epoch=1, agent_version="bench", deployed=deployed
            )
            env = Envelope(body=status, device_id=device_id)
            transport.publish(
                topics.dev_status(device_id), envelope.encode(env), retain=True, wait=False
            )
            return


def _devices(
    host: str, port: int, ids: list[str], prefix: str, ready: Any, go: Any, done: Any
) -> None:  # a worker process: simulated devices that follow deployments (no install)
    import threading

    from device.wire.mqtt import MqttTransport
    from device.wire.topics import Topics

    transports, threads, held = [], [], {}
    barrier = threading.Event()
    for device_id in ids:
        t = MqttTransport(device_id, host=host, port=port, session_expiry_s=0)
        t.connect()
        t.subscribe(Topics(prefix).all_deploy_notices())
        transports.append(t)
        thread = threading.Thread(target=_device, args=(t, device_id, prefix, barrier, held))
        thread.start()
        threads.append(thread)
    ready.put(len(ids))
    go.get()
    before = resource.getrusage(resource.RUSAGE_SELF)
    barrier.set()
    for thread in threads:
        thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    time.sleep(0.5)  # let the last events go out before the connections close
    done.put((max(held.values()), cpu))
    for t in transports:
        t.close()


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of another process so far (/proc/PID/stat)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _deploy_to(
    broker: Any, fleet: Any, data: bytes, count: int, work: Path, label: str
) -> dict[str, float]:
    """One deployment to ``count`` simulated devices (4 worker processes at most): from the
    fleet manager's publish until its store records every device active."""
    from device.wire.artefact import read_artefact
    from device.wire.topics import Topics
    from fleet.deploy.rollout import Rollout
    from fleet.deploy.targets import Targets
    from fleet.state.store import Store

    topics = Topics()
    ids = [f"{label}-{i:03d}" for i in range(count)]
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    workers = min(4, count)
    gos = [ctx.Queue() for _ in range(workers)]
    procs = [
        ctx.Process(
            target=_devices,
            args=(broker.host, broker.port, ids[k::workers], topics.prefix, ready, gos[k], done),
        )
        for k in range(workers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    out: dict[str, float] = {}
    with Store(work / f"fanout-{label}") as store:
        rollout = Rollout(store, fleet, topics)
        rollout.listen()
        rollout.pump(0.5)  # as `fleet model deploy` does (presence), whatever the fleet's size
        targets = Targets(tuple(ids), False, "bench")
        roles = dict.fromkeys(ids, "target")
        record = rollout._record("deploy", read_artefact(data), data, targets, roles, 0.0)
        for g in gos:
            g.put(True)
        time.sleep(0.2)  # the workers' CPU counters start before the publish
        broker_cpu, fleet_cpu = _cpu_s(broker.pid), time.process_time()
        start_wall, start = time.time(), time.perf_counter()
        rollout._publish(record, data, ids, False)  # artefact, then the notice
        out[f"publish_{count}_ms"] = 1000 * (time.perf_counter() - start)
        rows = rollout.wait(record.deployment_id, ids, 300.0)
        out[f"deploy_{count}_ms"] = 1000 * (time.perf_counter() - start)
        out[f"fleet_cpu_{count}_ms"] = 1000 * (time.process_time() - fleet_cpu)
        out[f"broker_cpu_{count}_ms"] = 1000 * (_cpu_s(broker.pid) - broker_cpu)
        assert all(r.state == "active" for r in rows.values()) and len(rows) == count, rows
    results = [done.get(timeout=300) for _ in procs]
    out[f"held_{count}_ms"] = 1000 * (max(r[0] for r in results) - start_wall)
    out[f"devices_cpu_{count}_ms"] = 1000 * sum(r[1] for r in results)
    for p in procs:
        p.join(30)
    return out


def fan_out(data: bytes, devices: int, work: Path) -> dict[str, float]:
    """Publishing the artefact once (no subscriber) against whole deployments to 1 and to
    ``devices`` simulated devices that follow the protocol on the wire (notice, fresh
    subscription to the artefact, SHA-256 against the notice, events and retained status) but
    do not install (their install runs on their own CPUs on a real fleet; docs/benchmarks.md).
    CPU seconds of the fleet manager, the broker and the simulated devices are reported
    apart, since on this machine they share the same cores."""
    from device.wire import envelope
    from device.wire.broker import MosquittoBroker
    from device.wire.messages import DeployArtefact, Envelope
    from device.wire.mqtt import MqttTransport

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
        out.update(_deploy_to(broker, fleet, data, 1, work, "one"))
        out.update(_deploy_to(broker, fleet, data, devices, work, "many"))
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
        help="no training: latency and memory (with --dense) and the fan-out of this artefact",
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
        if "latency" not in args.skip:
            results.update(latency(models, args.dense, args.repeats))
        if "rss" not in args.skip:
            results.update(peak_rss(models, args.dense))
        if "fanout" not in args.skip:
            results.update(fan_out(args.artefact.read_bytes(), args.fan_out, args.work))
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

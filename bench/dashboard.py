"""The dashboard with 1,000 devices in the store, and what it costs a running run (figures only).

Part 1 (a store of ``--devices`` devices, a finished run of ``--rounds`` rounds with
``--per-round`` devices each, late and rejected updates, and a running run with an open round;
written through the public Store API as a runner writes it). The dashboard runs as its own
process (``fleet dashboard`` would); with ``--baseline-src DIR`` (a source tree of another
version, e.g. ``git archive COMMIT fleet device | tar -x -C DIR``) a second dashboard process
runs that version over the same store, and every figure is measured on both, alternating request
by request and page load by page load (the order flipping each time), so both see the same load
of a shared machine. This script measures:

- fleet page data: ``GET /api/devices`` (every device, as the fleet page asks for it), timed by
  an HTTP client here and by the browser's resource timing inside the page;
- fleet page interactive: headless Chromium (Debian's, through Playwright) from navigation start
  to the table drawn with every row (the page's ``SFDashboard.readyAt``);
- ``/metrics`` scrape: HTTP round trip, and the collector alone in this process;
- live update latency: a round closed in the store (commit time here) until the open run page
  has redrawn its "closed" counter (the page's clock; same machine).
- the HTTP floor: ``GET /healthz`` (no store read), alternating with the others: what the
  machine's load alone does to a request's time.

Part 2 (``--pairs`` groups, each one trial per mode back to back, the order rotating): the same
simulated run over a throw-away mosquitto (``--sim-devices`` devices, half of them per round,
``--sim-epochs`` local epochs, ``--sim-rounds`` rounds of FedDST, ``mlp`` on the bundled digits)

- ``alone``: with no dashboard;
- ``server``: with the dashboard process watching it for an operator whose browser runs
  elsewhere: the requests of an open run page and fleet page (two event streams and the
  refetches they cause, with the pages' gaps) and a Prometheus scrape every second, replayed by
  a small client process;
- ``browser``: with the dashboard and headless Chromium on this same machine, the fleet page
  and the run page open, and the scrape every second: the worst case, a browser competing with
  the run for the cores;
- ``browser-baseline`` (with ``--baseline-src``): as ``browser``, with the baseline's dashboard
  (its server, and the scripts and styles its pages load).

The machine is shared, so each watched trial is compared with the ``alone`` trial of its own
group; the figure is the median of those ratios, for the whole ``simulate`` call and for the
span from the first round's opening to the last round's closing (which leaves out starting the
device processes). Also reported: the CPU time the dashboard and the watcher used during the
run, as a share of the run's own CPU time (the run's processes and the simulated devices).

    python bench/dashboard.py --json /tmp/dashboard.json
    python bench/dashboard.py --baseline-src /tmp/sf-base --json /tmp/dashboard.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.runtime.runner import RunSpec  # noqa: E402
from fleet.state.store import Store  # noqa: E402
from fleet.web.metrics import exposition, make_registry  # noqa: E402
from fleet.web.reader import FleetReader  # noqa: E402
from tests.web.storefill import Clock, add_devices, add_run  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


# -- the dashboard as its own process ---------------------------------------------------------


def serve(state_dir: Path) -> None:
    """``--serve``: run the dashboard on a free loopback port; print its URL; SIGTERM stops it."""
    from fleet.web import DashboardServer, DashboardSettings

    server = DashboardServer(DashboardSettings(state_dir), host="127.0.0.1", port=0)
    print(server.url, flush=True)
    server.run()


SERVE_OTHER = """
import sys
from pathlib import Path
import fleet
from fleet.web import DashboardServer, DashboardSettings
src = Path(sys.argv[2]).resolve()
if not Path(fleet.__file__).resolve().is_relative_to(src):
    raise SystemExit(f"the baseline imported fleet from {fleet.__file__}, not from {src}")
server = DashboardServer(DashboardSettings(Path(sys.argv[1])), host="127.0.0.1", port=0)
print(server.url, flush=True)
server.run()
"""
"""``serve`` for a dashboard of another source tree (``--baseline-src``): argv state_dir, src."""


class DashboardProcess:
    """The dashboard in its own process; ``src``: another version's source tree (None: this)."""

    def __init__(self, state_dir: Path, src: Path | None = None) -> None:
        if src is None:
            command = [sys.executable, __file__, "--serve", str(state_dir)]
        else:
            command = [sys.executable, "-c", SERVE_OTHER, str(state_dir), str(src)]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            text=True,
            cwd=src,
            env=None if src is None else {**os.environ, "PYTHONPATH": str(src)},
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise RuntimeError(f"the dashboard process did not start: {command[:3]}")
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its live descendants."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, used in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += used
    return total / os.sysconf("SC_CLK_TCK")


def get(url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - start, body


# -- part 1 -----------------------------------------------------------------------------------


def build_store(root: Path, devices: int, rounds: int, per_round: int) -> dict[str, Any]:
    start = time.perf_counter()
    clock = Clock(time.time() - 3600)
    with Store(root, clock=clock) as store:
        ids = add_devices(store, devices, at=time.time() - 60)
        add_run(store, clock, "finished", ids, rounds=rounds, per_round=per_round,
                late_every=3, reject_every=4)  # fmt: skip
        add_run(store, clock, "live", ids, rounds=5, per_round=per_round, leave_open=True,
                planned=1000)  # fmt: skip
    return {"devices": devices, "rounds": rounds, "per_round": per_round,
            "fill_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def close_and_open(root: Path, round_: int) -> float:
    """Close the live run's open round ``round_`` (its updates dropped), open the next; returns
    the Unix time the close committed."""
    with Store(root, create=False) as store:
        open_round = store.get_round("live", round_)
        keys = [(round_, u.device_id) for u in store.updates_for_round("live", round_)]
        store.close_round("live", round_, dropped=keys, metrics={"accuracy": 0.6})
        closed = time.time()
        store.open_round(
            "live",
            round_ + 1,
            selected=list(open_round.selected),
            deadline=time.time() + 600,
            model_version_in=open_round.model_version_in,
        )
    return closed


def _alternate(names: list[str], i: int) -> list[str]:
    """``names`` in the order of turn ``i`` (flipping), so neither side always goes first."""
    return names if i % 2 == 0 else names[::-1]


def _page_load(browser: Any, url: str) -> tuple[float, float, int]:
    """One fleet page load: (interactive s, in-page ``/api/devices`` fetch s, rows drawn)."""
    page = browser.new_page()
    try:
        page.goto(f"{url}/fleet")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        ready = page.evaluate("window.SFDashboard.readyAt") / 1000
        fetch = (
            page.evaluate(
                "performance.getEntriesByType('resource')"
                ".filter(e => e.name.includes('/api/devices'))[0].duration"
            )
            / 1000
        )
        return ready, fetch, page.locator("#fleet-table tbody tr").count()
    finally:
        page.close()


WATCH_CLOSED = (
    "window.__changed = null; new MutationObserver(() => {"
    " window.__changed = window.__changed || Date.now(); })"
    ".observe(document.querySelector('#rounds-closed'),"
    " {childList: true, characterData: true, subtree: true})"
)


def part1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    root = work / "store"
    out: dict[str, Any] = {"store": build_store(root, args.devices, args.rounds, args.per_round)}
    reader = FleetReader(root)
    registry = make_registry(reader)
    collector = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        exposition(registry)
        collector.append(time.perf_counter() - start)
    out["collector"] = ms(collector)
    reader.close()
    servers = {"ours": DashboardProcess(root)}
    if args.baseline_src is not None:
        servers["baseline"] = DashboardProcess(root, args.baseline_src.resolve())
        out["baseline_src"] = str(args.baseline_src)
    names = list(servers)
    try:
        times: dict[str, dict[str, list[float]]] = {
            path: {name: [] for name in names} for path in ("/api/devices", "/metrics", "/healthz")
        }
        for name in names:  # the first requests open the store and fill the caches
            get(f"{servers[name].url}/api/devices")
            get(f"{servers[name].url}/metrics")
        size = len(get(f"{servers['ours'].url}/api/devices")[1])
        for i in range(args.repeat):
            for path in times:
                for name in _alternate(names, i):
                    times[path][name].append(get(f"{servers[name].url}{path}")[0])
        out["fleet_api"] = {name: ms(times["/api/devices"][name]) for name in names}
        out["fleet_api"]["bytes"] = size
        out["metrics_http"] = {name: ms(times["/metrics"][name]) for name in names}
        out["healthz_http"] = {name: ms(times["/healthz"][name]) for name in names}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            ready: dict[str, list[float]] = {name: [] for name in names}
            fetch: dict[str, list[float]] = {name: [] for name in names}
            rows: dict[str, int] = {}
            for name in names:
                _page_load(browser, servers[name].url)  # the browser's caches, once per server
            for i in range(args.page_repeat):
                for name in _alternate(names, i):
                    t_ready, t_fetch, rows[name] = _page_load(browser, servers[name].url)
                    ready[name].append(t_ready)
                    fetch[name].append(t_fetch)
            out["fleet_page_interactive"] = {name: ms(ready[name]) for name in names}
            out["fleet_page_fetch_in_browser"] = {name: ms(fetch[name]) for name in names}
            out["fleet_page_rows"] = rows
            pages = {}
            for name in names:
                pages[name] = browser.new_page()
                pages[name].goto(f"{servers[name].url}/runs/live")
                pages[name].wait_for_selector("body[data-ready='1']", timeout=30_000)
            latency: dict[str, list[float]] = {name: [] for name in names}
            round_ = 6
            for _ in range(args.page_repeat):
                for page in pages.values():
                    page.evaluate(WATCH_CLOSED)
                closed = close_and_open(root, round_)
                for name, page in pages.items():
                    deadline = time.monotonic() + 10
                    while page.evaluate("window.__changed") is None:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the {name} run page did not show the closed round")
                        time.sleep(0.02)
                    latency[name].append(page.evaluate("window.__changed") / 1000 - closed)
                round_ += 1
                time.sleep(0.5)
            out["update_latency"] = {name: ms(latency[name]) for name in names}
            browser.close()
    finally:
        for server in servers.values():
            server.stop()
    return out


# -- part 2 -----------------------------------------------------------------------------------


class StopFlag:
    """Set by a SIGTERM handler. Unlike ``threading.Event`` it takes no lock: the handler runs in
    the main thread, which may be holding the Event's lock inside ``Event.wait`` at that moment,
    and would then wait for itself forever (a watcher that never stopped)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (in steps of 20 ms); True once set."""
        deadline = time.monotonic() + seconds
        while not self._set and time.monotonic() < deadline:
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return self._set


def observe(url: str, run_id: str, stats_file: Path) -> None:
    """``--observe``: what an operator leaves open during a run (see the module doc)."""
    from playwright.sync_api import sync_playwright

    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scrapes = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        fleet = browser.new_page()
        fleet.goto(f"{url}/fleet")
        fleet.wait_for_selector("body[data-ready='1']", timeout=60_000)
        run_page = browser.new_page()
        run_page.goto(f"{url}/runs")  # the operator waits on the runs list for the run to appear
        run_page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        stats_file.with_suffix(".ready").touch()
        watching = False
        scraped = 0.0
        while not stop.is_set():
            if time.monotonic() - scraped >= 1.0:  # Prometheus at a 1 s scrape interval
                scraped = time.monotonic()
                try:
                    get(f"{url}/metrics")
                    scrapes += 1
                except OSError:
                    pass
            if not watching:
                try:
                    get(f"{url}/api/runs/{run_id}")
                    run_page.goto(f"{url}/runs/{run_id}")
                    watching = True
                except OSError:
                    pass
            stop.wait(0.2)
        events = run_page.evaluate("window.SFDashboard ? window.SFDashboard.events : 0")
        renders = run_page.evaluate("window.SFDashboard ? window.SFDashboard.renders : 0")
        browser.close()
    stats_file.write_text(json.dumps({"scrapes": scrapes, "events": events, "renders": renders}))


def sim_run(run_id: str, rounds: int, devices: int, epochs: int) -> RunSpec:
    per_round = max(2, devices // 2)
    return RunSpec(
        run_id=run_id,
        model_name="mlp",
        strategy="feddst",
        rounds=rounds,
        clients_per_round=per_round,
        strategy_options={
            "clients_per_round": per_round,
            "training": {"epochs": epochs, "batch_size": 32, "lr": 0.05},
            "total_rounds": rounds,
            "readjust_every": 2,
            "density": 0.3,
        },
        round_timeout_s=120.0,
    )


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the simulated devices, the
    throw-away broker); the watchers are still running while this is read."""
    used = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(u.ru_utime + u.ru_stime for u in used)


class Gap:
    """At most one call per ``seconds``, like the page's refresh gaps (dashboard.js)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -1e9

    def due(self) -> bool:
        if time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True


def replay(url: str, run_id: str, stats_file: Path) -> None:
    """``--replay``: the requests the open run page and fleet page make, without a browser.

    Two event streams (the run page's ``?run=RUN`` and the fleet page's ``?fleet=1``); on each
    event the refetch the page would make, with the page's gaps (run data 1 s, layers 5 s,
    devices 5 s); ``/metrics`` every second. This is what watching costs the fleet manager's
    machine when the browser runs elsewhere (an operator's laptop).
    """
    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts = {"events": 0, "fetches": 0, "scrapes": 0}
    pending = {"run": threading.Event(), "fleet": threading.Event()}

    def follow(query: str, kind: str) -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{url}/api/events?{query}", timeout=60) as stream:
                    for line in stream:
                        if stop.is_set():
                            return
                        if line.startswith(b"event: "):
                            counts["events"] += 1
                            pending[kind].set()
            except OSError:
                stop.wait(0.5)

    def fetch(path: str) -> None:
        try:
            get(f"{url}{path}")
            counts["fetches"] += 1
        except OSError:
            pass

    for query, kind in ((f"run={run_id}", "run"), ("fleet=1", "fleet")):
        threading.Thread(target=follow, args=(query, kind), daemon=True).start()
    run_gap, layers_gap, fleet_gap, scrape_gap = Gap(1.0), Gap(5.0), Gap(5.0), Gap(1.0)
    while not stop.wait(0.05):
        if pending["run"].is_set() and run_gap.due():
            pending["run"].clear()
            fetch(f"/api/runs/{run_id}")
            if layers_gap.due():
                fetch(f"/api/runs/{run_id}/layers")
        if pending["fleet"].is_set() and fleet_gap.due():
            pending["fleet"].clear()
            fetch("/api/devices")
        if scrape_gap.due():
            fetch("/metrics")
            counts["scrapes"] += 1
    stats_file.write_text(json.dumps(counts))


MODES = ("alone", "server", "browser")
"""alone: no dashboard; server: the dashboard and the pages' requests replayed (``replay``);
browser: the dashboard and headless Chromium with the pages open on this machine (``observe``).
With ``--baseline-src``, also ``browser-baseline``: the same as browser, the dashboard (its
server and its pages' scripts and styles) being the baseline's."""


def modes(args: argparse.Namespace) -> tuple[str, ...]:
    return MODES + (("browser-baseline",) if args.baseline_src is not None else ())


def trial(work: Path, name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from fleet.sim import SimSpec, simulate

    state = work / name
    server: DashboardProcess | None = None
    watcher: subprocess.Popen[bytes] | None = None
    stats_file = work / f"{name}.stats.json"
    if mode != "alone":
        baseline = mode.endswith("-baseline")
        server = DashboardProcess(state, args.baseline_src.resolve() if baseline else None)
        browser = mode.startswith("browser")
        flag = "--observe" if browser else "--replay"
        watcher = subprocess.Popen(
            [sys.executable, __file__, flag, server.url, name, str(stats_file)]
        )
        if browser:
            ready = stats_file.with_suffix(".ready")
            deadline = time.monotonic() + 120
            while not ready.exists():
                if time.monotonic() > deadline or watcher.poll() is not None:
                    raise RuntimeError("the observing browser did not start")
                time.sleep(0.1)
        time.sleep(2.0)  # the run starts with the watchers settled
    try:
        pids = [server.proc.pid, watcher.pid] if server and watcher else []
        cpu_before = [tree_cpu_s(pid) for pid in pids]
        own_before = _own_cpu_s()
        start = time.perf_counter()
        simulate(
            sim_run(name, args.sim_rounds, args.sim_devices, args.sim_epochs),
            SimSpec(devices=args.sim_devices, dataset="digits", processes=2),
            state,
            transport="mqtt",
        )
        wall = time.perf_counter() - start
        run_cpu = _own_cpu_s() - own_before
        watch_cpu = [tree_cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        with Store(state, create=False) as store:
            rounds = store.rounds(name)
        span = max(r.closed_at or 0.0 for r in rounds) - min(r.opened_at for r in rounds)
    finally:
        result: dict[str, Any] = {"mode": mode}
        if watcher is not None:
            watcher.send_signal(signal.SIGTERM)
            try:
                watcher.wait(60)
            except subprocess.TimeoutExpired:  # a stuck watcher must not outlive the trial
                watcher.kill()
                watcher.wait()
            if stats_file.exists():
                result.update(json.loads(stats_file.read_text()))
        if server is not None:
            server.stop()
    result.update(wall_s=round(wall, 2), rounds_s=round(span, 2), run_cpu_s=round(run_cpu, 2))
    if watch_cpu:
        result["dashboard_cpu_s"] = round(watch_cpu[0], 2)
        result["watcher_cpu_s"] = round(watch_cpu[1], 2)
    return result


def part2(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--pairs`` groups of one trial per mode, back to back, the order rotating per group."""
    groups: list[dict[str, dict[str, Any]]] = []
    order = modes(args)
    for i in range(args.pairs):
        group: dict[str, dict[str, Any]] = {}
        for k in range(len(order)):
            mode = order[(i + k) % len(order)]
            group[mode] = trial(work, f"{mode}-{i}", mode, args)
            print(json.dumps({f"{mode}-{i}": group[mode]}), flush=True)
        groups.append(group)
    out: dict[str, Any] = {"groups": groups}
    for mode in order[1:]:
        figures: dict[str, Any] = {}
        for key in ("wall_s", "rounds_s"):
            # A group ran back to back, so its ratio cancels the load the machine had then.
            ratios = [g[mode][key] / g["alone"][key] for g in groups]
            figures[key] = {
                "alone_median": statistics.median(g["alone"][key] for g in groups),
                "watched_median": statistics.median(g[mode][key] for g in groups),
                "ratios": [round(r, 3) for r in ratios],
                "overhead_pct": round(100 * (statistics.median(ratios) - 1), 1),
            }
        run_cpu = sum(g[mode]["run_cpu_s"] for g in groups)
        figures["cpu_pct_of_run"] = {
            key: round(100 * sum(g[mode][key] for g in groups) / run_cpu, 1)
            for key in ("dashboard_cpu_s", "watcher_cpu_s")
        }
        out[mode] = figures
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=60, help="HTTP requests per figure")
    parser.add_argument("--page-repeat", type=int, default=40, help="page loads per figure")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="part 1 also on this source tree's dashboard (a directory holding fleet/, device/)",
    )
    parser.add_argument("--pairs", type=int, default=5, help="groups of simulated runs")
    parser.add_argument("--sim-devices", type=int, default=8)
    parser.add_argument("--sim-rounds", type=int, default=80)
    parser.add_argument("--sim-epochs", type=int, default=10, help="local epochs per round")
    parser.add_argument("--skip-run", action="store_true", help="part 1 only")
    parser.add_argument("--only-run", action="store_true", help="part 2 only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--observe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--replay", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    if args.observe is not None:
        observe(args.observe[0], args.observe[1], Path(args.observe[2]))
        return
    if args.replay is not None:
        replay(args.replay[0], args.replay[1], Path(args.replay[2]))
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        figures: dict[str, Any] = {"cores": os.cpu_count()}
        if not args.only_run:
            figures.update(part1(args, work))
            print(json.dumps(figures, indent=2), flush=True)
        if not args.skip_run:
            figures["run_overhead"] = part2(args, work)
            print(json.dumps(figures["run_overhead"], indent=2), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

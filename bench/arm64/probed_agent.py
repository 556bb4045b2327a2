"""``fleet-device run`` with two additions for measurements: memory probes and forced kernels.

    python probed_agent.py --config device.yaml [--probe-fd N] [--force-kernels]

Runs the installed agent's own ``device.cli.main(["run", "--config", ...])``, unchanged, in the
interpreter it is started with (the arm64 virtualenv under qemu, or natively on x86 for the
check of the memory method). Copied next to the job's files before it runs, so that nothing of
this repository is on sys.path: the device code is the installed wheel's.

``--probe-fd N``: a daemon thread writes ``b"MAPS <size>\\n"`` + this process's
``/proc/self/maps`` to file descriptor N every ``--probe-interval`` seconds (0.2). Under
qemu-user that text lists the emulated program's mappings only; the host side
(``memory.ProbeReader``) pairs each frame with the host's smaps of the process.

``--force-kernels``: the device computes every prunable layer that has a sparse kernel with it,
as if its measured profile had shown a gain everywhere (the config must say
``profile_on_start: true`` with the run's model as ``profile_model``; the measurement itself is
replaced by that profile). Without it the agent trains masked dense, as without a profile.

``--chunk-bytes N``: the largest MQTT chunk the device sends (the transport's
``max_chunk_bytes``; the agent's config has no such setting, its default is 4 MiB).

``--phases``: prints the resident set before and after each step of a job (decode, load,
train, build the update, encode) to stderr, :func:`trace_phases`.
``--no-meta-init``: the layers' initialisation skipped on the meta device
(:func:`skip_meta_initialisation`; the before/after of the sympy import on torch 2.7.1). The
device code now does this itself (``device.meta.on_meta``), so with the current code the option
changes nothing; it stays to reproduce the settings table measured before that change.

At exit it prints one line ``LOADED <json>`` to stderr: which heavy modules the process imported
(torch._dynamo, sympy, ...), how many modules in all, and the 25 packages with the most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HEAVY_MODULES = ("torch._dynamo", "torch.fx.experimental.symbolic_shapes", "sympy", "networkx")


def probe_loop(fd: int, interval_s: float) -> None:
    """Write maps frames to ``fd`` until the reader goes away."""
    while True:
        with open("/proc/self/maps", "rb") as maps:
            text = maps.read()
        frame = b"MAPS %d\n" % len(text) + text
        try:
            while frame:
                frame = frame[os.write(fd, frame) :]
        except OSError:  # the reader closed its end: stop probing, keep the agent running
            return
        time.sleep(interval_s)


def forced_profile(model_name: str, batch_size: int = 20, repeats: int = 5) -> object:
    """A profile in which the sparse kernel of every layer that has one is 100 times faster
    than masked dense at every density (what ``choose_plan`` then picks: all of them)."""
    del repeats
    from device.models import empty_model, prunable_names
    from device.sparse.kernels import supports_sparse
    from device.wire.messages import DeviceProfile, LayerProfile, ProfilePoint

    model = empty_model(model_name)  # torch.empty: no page of the weights is touched
    modules = dict(model.named_modules())
    layers = []
    for name in prunable_names(model):
        owner, _, attribute = name.rpartition(".")
        module = modules[owner]
        sparse_s = 0.001 if supports_sparse(module) else 0.0
        points = tuple(ProfilePoint(d, 0.1, sparse_s) for d in (0.01, 0.1, 0.5, 1.0))
        numel = int(getattr(module, attribute).numel())
        layers.append(LayerProfile(name, numel, points))
    return DeviceProfile(model_name, batch_size, 0.0, tuple(layers))


def skip_meta_initialisation() -> None:
    """Make ``reset_parameters`` of ``nn.Linear`` and ``nn.Conv*`` a no-op on meta tensors.

    The candidate fix for torch 2.7.1: ``device.models.empty_model`` builds the model on the
    meta device, where the layers' own initialisation (``kaiming_uniform_`` on a meta tensor)
    runs torch's Python reference implementation, which imports
    ``torch.fx.experimental.symbolic_shapes`` and sympy (torch 2.13 does not). The values are
    never used (the weights are materialised empty and then loaded), so skipping it changes
    nothing else.
    """
    from torch import nn

    for cls in (nn.Linear, nn.modules.conv._ConvNd):
        original = cls.reset_parameters

        def reset_parameters(self: nn.Module, _original: object = original) -> None:
            if not self.weight.is_meta:
                _original(self)  # type: ignore[operator]

        cls.reset_parameters = reset_parameters  # type: ignore[method-assign]


#: (module, attribute) of the steps of a job, wrapped by ``--phases``: where they are looked
#: up (``device.agent`` imported ``run_round_job`` by name, ``device.job`` ``train_round``).
PHASES = (
    ("device.wire.envelope", "decode"),
    ("device.agent", "run_round_job"),
    ("device.job", "load_model"),
    ("device.job", "train_round"),
    ("device.trainer", "_readjust"),
    ("device.trainer", "readjust_mask"),
    ("device.trainer", "drop_scores_magnitude_active"),
    ("device.trainer", "_prepare_gradients"),
    ("device.trainer", "move_to_support"),
    ("device.trainer", "grow_scores_gradient"),
    ("device.job", "to_update"),
    ("device.wire.envelope", "encode"),
)


def _status_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB (under qemu: emulator included)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]


def trace_phases() -> None:
    """Wrap each of :data:`PHASES` to print ``PHASE name enter|exit rss_kb hwm_kb seconds``
    to stderr (only calls that take over 10 ms or move the peak: envelopes of status and event
    messages are many and small)."""
    import functools
    import importlib

    def wrap(name: str, function: object) -> object:
        @functools.wraps(function)  # type: ignore[arg-type]
        def traced(*args: object, **kwargs: object) -> object:
            rss0, hwm0 = _status_kb()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)  # type: ignore[operator]
            finally:
                seconds = time.perf_counter() - start
                rss1, hwm1 = _status_kb()
                if seconds > 0.01 or hwm1 > hwm0:
                    print(
                        f"PHASE {name} rss {rss0} -> {rss1} kB, peak {hwm0} -> {hwm1} kB, "
                        f"{seconds:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )

        return traced

    for module_name, attribute in PHASES:
        module = importlib.import_module(module_name)
        original = getattr(module, attribute, None)
        if original is not None:
            setattr(module, attribute, wrap(f"{module_name}.{attribute}", original))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--probe-fd", type=int, default=-1)
    parser.add_argument("--probe-interval", type=float, default=0.2)
    parser.add_argument("--force-kernels", action="store_true")
    parser.add_argument("--chunk-bytes", type=int, default=0)
    parser.add_argument("--no-meta-init", action="store_true")
    parser.add_argument("--phases", action="store_true")
    args = parser.parse_args()
    if args.probe_fd >= 0:
        threading.Thread(
            target=probe_loop, args=(args.probe_fd, args.probe_interval), daemon=True
        ).start()
    if args.force_kernels:
        import device.profile

        device.profile.measure_profile = forced_profile  # type: ignore[assignment]
    if args.chunk_bytes:
        import device.cli

        make_transport = device.cli.make_transport

        def with_chunks(config: object) -> object:
            transport = make_transport(config)  # type: ignore[arg-type]
            transport.max_chunk_bytes = args.chunk_bytes
            return transport

        device.cli.make_transport = with_chunks  # type: ignore[assignment]
    if args.no_meta_init:
        skip_meta_initialisation()
    if args.phases:
        trace_phases()
    from device.cli import main as device_main

    status = device_main(["run", "--config", args.config])
    loaded: dict[str, object] = {name: name in sys.modules for name in HEAVY_MODULES}
    loaded["modules"] = len(sys.modules)
    packages: dict[str, int] = {}
    for name in sys.modules:
        top = name.partition(".")[0]
        packages[top] = packages.get(top, 0) + 1
    loaded["packages"] = dict(sorted(packages.items(), key=lambda kv: -kv[1])[:25])
    print("LOADED " + json.dumps(loaded), file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

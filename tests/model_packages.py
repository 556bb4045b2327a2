"""Throw-away model packages: a user's model code, written at test time, never in the repo.

``make_package(root, name)`` writes ``root/NAME/__init__.py`` with the models below and, with
``entry_points``, a ``root/NAME-VERSION.dist-info`` whose ``entry_points.txt`` registers them
in the group ``sparsefleet.models``: with ``root`` on ``sys.path`` (``monkeypatch.syspath_prepend``)
the package imports and ``importlib.metadata`` finds its registrations, exactly as for an
installed wheel. Names must be unique per test (modules stay in ``sys.modules``):
``unique_name()``.

The models, as a user would write them:

* ``build(width=16, in_features=64, classes=10)``: a two-layer MLP for 8x8 digits. A thread
  whose name starts with ``ODD_THREAD_PREFIX`` builds it one unit wider: an agent's worker thread
  is named ``{device_id}-worker``, so a device whose id starts with ``odd-`` builds another
  architecture for the same reference in the same process (what a device with another version
  of the package installed would do);
* ``build_norm_embed(levels=16, dim=2)``: a convolution with BatchNorm (running statistics:
  buffers, one of them int64) and an Embedding of the quantised pixels, for 8x8 digits, with a
  non-persistent buffer (the quantisation edges, never in the state_dict);
* ``build_custom()``: a layer with its own ``nn.Parameter`` (no known initialisation);
* ``broken_raises``, ``broken_not_module``: factories that raise, or return no Module.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

ODD_THREAD_PREFIX = "odd-"

SOURCE = textwrap.dedent(
    '''
    """A user's model package (written by tests/model_packages.py)."""
    import threading

    import torch
    from torch import nn

    ODD_THREAD_PREFIX = "odd-"


    class TinyNet(nn.Module):
        input_shape = (1, 8, 8)
        num_classes = 10

        def __init__(self, width=16, in_features=64, classes=10):
            super().__init__()
            self.fc1 = nn.Linear(in_features, width)
            self.fc2 = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


    def build(width=16, in_features=64, classes=10):
        if threading.current_thread().name.startswith(ODD_THREAD_PREFIX):
            width += 1
        return TinyNet(width=width, in_features=in_features, classes=classes)


    build.input_shape = (1, 8, 8)
    build.num_classes = 10


    class NormEmbedNet(nn.Module):
        def __init__(self, levels=16, dim=2):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.embed = nn.Embedding(levels, dim)
            self.fc = nn.Linear(4 * 64 + 64 * dim, 10)
            self.register_buffer(
                "edges", torch.linspace(-1.5, 1.5, levels - 1), persistent=False
            )

        def forward(self, x):
            x = x.reshape(-1, 1, 8, 8)
            a = torch.relu(self.bn(self.conv(x))).flatten(1)
            levels = torch.bucketize(x.flatten(1).contiguous(), self.edges)
            e = self.embed(levels).flatten(1)
            return self.fc(torch.cat([a, e], 1))


    def build_norm_embed(levels=16, dim=2):
        return NormEmbedNet(levels=levels, dim=dim)


    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.scale = nn.Parameter(torch.full((10,), 0.5))

        def forward(self, x):
            return self.fc(torch.flatten(x, 1)) * self.scale


    def build_custom():
        return Scaled()


    def broken_raises(**kwargs):
        raise RuntimeError("no GPU here")


    def broken_not_module():
        return {"not": "a module"}
    '''
)


def unique_name(prefix: str = "usermodels") -> str:
    """A package name no other test uses (modules stay imported for the whole session)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def make_package(
    root: Path,
    name: str,
    *,
    entry_points: dict[str, str] | None = None,
    version: str = "1.0",
    source: str = SOURCE,
) -> Path:
    """Write the package ``name`` (and, with ``entry_points``, its installed metadata) under
    ``root``; returns ``root``. ``entry_points`` maps model names to ``module:callable``."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source, encoding="utf-8")
    if entry_points is not None:
        info = root / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
        )
        lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[sparsefleet.models]\n{lines}", encoding="utf-8")
    return root

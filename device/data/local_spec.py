"""The settings of a device's own data (the device config's ``data:``), as one frozen spec.

:class:`LocalDataSpec` is a schema :mod:`device.config` builds directly (``data: LocalDataSpec``
in a settings dataclass, or :meth:`LocalDataSpec.from_mapping`): every invalid setting raises
:class:`~device.config.SettingError` from ``__post_init__``, which the loader reports at that
setting's line (``device.yaml:9: data.window: must be at least 1``). Constructed in Python, the
same problems raise ``SettingError``, a ``ValueError`` naming the setting.

The options are flat (``data: {format: csv, path: log.csv, label_column: activity}``); each
belongs to one format, and setting one of another format's options is an error, so a typo'd
format cannot silently ignore the options meant for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from device.config import SettingError, from_mapping
from device.data.spool import DEFAULT_IN_MEMORY_MB, Spool

__all__ = ["FORMATS", "FORMAT_OPTIONS", "IMAGE_SUFFIXES", "LocalDataSpec", "LocalFormat"]

LocalFormat = Literal["imagefolder", "csv", "npz", "python"]
#: The device-local data formats, in the order the docs list them.
FORMATS: tuple[str, ...] = get_args(LocalFormat)
#: File name endings an image folder reads (compared lower-cased).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: format -> the options only it takes (the common ones: path, classes, eval_fraction, seed).
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "imagefolder": ("resize", "channels", "mean", "std"),
    "csv": (
        "label_column",
        "feature_columns",
        "timestamp_column",
        "window",
        "stride",
        "window_label",
        "delimiter",
    ),
    "npz": (),
    "python": ("function", "kwargs"),
}

_FUNCTION = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_SIDE = 65535  # pixels: far beyond any image a device trains on; catches a units slip


@dataclass(frozen=True)
class LocalDataSpec:
    """Where a device's own examples are, how to read them, and how to split them.

    Common settings:
        format: ``imagefolder``, ``csv``, ``npz`` or ``python``.
        path: the data (a directory; for csv and npz also a single file). Required except for
            ``python``, where it is passed to the function as ``root=`` when set.
        classes: the run's label space; class ``i`` is ``classes[i]``. At least 2 distinct,
            non-empty names. May be left out of a device's config when the run supplies it
            (:meth:`with_classes`); :func:`~device.data.local.open_source` needs it.
        eval_fraction: share of examples held out for evaluation, in [0, 1) (default 0.2). An
            example's side is a function of its identity and ``seed`` alone
            (:mod:`device.data.local_split`), so it never changes as data grows.
        seed: the split's seed, an integer in [0, 2**64).
        in_memory_mb: a side (train or evaluation) whose decoded examples (float32) are larger
            than this many MiB is decoded into a file in ``spool_dir`` and read from it one
            minibatch at a time (:mod:`device.data.spool`); default 256, 0 always.
        spool_dir: where such files go (nameless, gone with the process); default the system's
            temporary directory. Put it on disk, not on a RAM-backed tmpfs.

    imagefolder: ``resize`` ``[H, W]`` pixels (default: keep the size; every image must then
    have the first image's size); ``channels`` 1 (greyscale) or 3 (RGB, the default);
    ``mean``/``std`` per channel (one value, or one per channel), applied as
    ``(pixel / 255 - mean) / std``; without them pixels are ``pixel / 255`` in [0, 1].

    csv: ``label_column`` (required), ``feature_columns`` (default: every other column but the
    timestamp), ``timestamp_column`` (rows are ordered by it), ``window`` rows per example
    (default: one row per example), ``stride`` rows between window starts (default: the window,
    i.e. no overlap), ``window_label`` ``last`` (default: the label of the window's last row)
    or ``majority``, ``delimiter`` (one character, default ``,``).

    python: ``function`` ``"module:function"`` returning a map-style torch Dataset of
    ``(tensor, int)``; ``kwargs`` passed to it.
    """

    format: LocalFormat
    path: Path | None = None
    classes: tuple[str, ...] | None = None
    eval_fraction: float = 0.2
    seed: int = 0
    in_memory_mb: float = DEFAULT_IN_MEMORY_MB
    spool_dir: Path | None = None
    # imagefolder
    resize: tuple[int, ...] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # csv
    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = None
    timestamp_column: str | None = None
    window: int | None = None
    stride: int | None = None
    window_label: Literal["last", "majority"] | None = None
    delimiter: str | None = None
    # python
    function: str | None = None
    kwargs: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SettingError(
                "format", f"unknown format {self.format!r}; known: {', '.join(FORMATS)}"
            )
        # Friendly to Python callers: a str path and list options become the declared types.
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.spool_dir, str):
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        for name in ("classes", "resize", "mean", "std", "feature_columns"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_common()
        self._check_options_belong()
        if self.format == "imagefolder":
            self._check_imagefolder()
        elif self.format == "csv":
            self._check_csv()
        elif self.format == "python":
            self._check_python()

    # -- the checks, one per group of settings ------------------------------------------------

    def _check_common(self) -> None:
        if self.path is None and self.format != "python":
            raise SettingError("path", f"required for format {self.format}")
        if self.classes is not None:
            if len(self.classes) < 2:
                raise SettingError("classes", f"needs at least 2 classes, got {len(self.classes)}")
            for name in self.classes:
                if not isinstance(name, str) or not name.strip():
                    raise SettingError("classes", f"class names must be non-empty text: {name!r}")
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise SettingError("classes", f"listed more than once: {', '.join(repeated)}")
        if not (0.0 <= self.eval_fraction < 1.0 and math.isfinite(self.eval_fraction)):
            raise SettingError(
                "eval_fraction",
                f"must be in [0, 1) (a share of examples), got {self.eval_fraction}",
            )
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise SettingError("seed", f"must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.in_memory_mb, bool) or not (
            math.isfinite(self.in_memory_mb) and self.in_memory_mb >= 0
        ):
            raise SettingError(
                "in_memory_mb", f"must be a size in MiB, 0 or more, got {self.in_memory_mb!r}"
            )

    @property
    def spool(self) -> Spool:
        """When and where a side is decoded into a file instead of memory."""
        return Spool(in_memory_mb=self.in_memory_mb, directory=self.spool_dir)

    def _check_options_belong(self) -> None:
        own = set(FORMAT_OPTIONS[self.format])
        for fmt, options in FORMAT_OPTIONS.items():
            for name in options:
                if name not in own and getattr(self, name) is not None:
                    raise SettingError(
                        name, f"is a setting of format {fmt}, and this data is format {self.format}"
                    )

    def _check_imagefolder(self) -> None:
        if self.resize is not None and (
            len(self.resize) != 2 or not all(1 <= side <= _MAX_SIDE for side in self.resize)
        ):
            raise SettingError(
                "resize", f"must be [height, width] in pixels, 1..{_MAX_SIDE}, got {self.resize}"
            )
        if self.channels is not None and self.channels not in (1, 3):
            raise SettingError("channels", f"must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.std is None else ("std", "mean")
            raise SettingError(missing, f"needed with {given} (normalisation takes both)")
        channels = self.image_channels
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) not in (1, channels):
                raise SettingError(
                    name, f"needs 1 or {channels} values (one per channel), got {len(values)}"
                )
            if not all(math.isfinite(v) for v in values):
                raise SettingError(name, f"values must be finite, got {values}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise SettingError("std", f"values must be more than 0, got {self.std}")

    def _check_csv(self) -> None:
        if not self.label_column:
            raise SettingError("label_column", "required for format csv (the column of labels)")
        if self.timestamp_column is not None and self.timestamp_column == self.label_column:
            raise SettingError("timestamp_column", "must differ from label_column")
        if self.feature_columns is not None:
            if not self.feature_columns:
                raise SettingError("feature_columns", "must name at least one column")
            clash = {self.label_column, self.timestamp_column} & set(self.feature_columns)
            if clash:
                raise SettingError(
                    "feature_columns", f"must not include {', '.join(sorted(map(str, clash)))}"
                )
            if len(set(self.feature_columns)) != len(self.feature_columns):
                raise SettingError("feature_columns", "a column is listed more than once")
        if self.window is not None and self.window < 1:
            raise SettingError("window", f"must be at least 1 row, got {self.window}")
        for name in ("stride", "window_label"):
            if getattr(self, name) is not None and self.window is None:
                raise SettingError(name, "only applies with window")
        if self.stride is not None and self.stride < 1:
            raise SettingError("stride", f"must be at least 1 row, got {self.stride}")
        if self.window_label not in (None, "last", "majority"):
            raise SettingError(
                "window_label", f"must be 'last' or 'majority', got {self.window_label!r}"
            )
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in "\r\n"):
            raise SettingError("delimiter", f"must be one character, got {self.delimiter!r}")

    def _check_python(self) -> None:
        if self.function is None:
            raise SettingError("function", "required for format python ('module:function')")
        if not _FUNCTION.match(self.function):
            raise SettingError(
                "function",
                f"must be 'module:function' (e.g. my_pkg.data:build), got {self.function!r}",
            )
        if self.kwargs is not None:
            if not isinstance(self.kwargs, Mapping) or not all(
                isinstance(k, str) for k in self.kwargs
            ):
                raise SettingError("kwargs", "must be a mapping of argument names to values")
            if self.path is not None and "root" in self.kwargs:
                raise SettingError("kwargs", "sets root, which path already passes")

    # -- derived values -------------------------------------------------------------------------

    @property
    def image_channels(self) -> int:
        """Channels an image folder decodes to (1 or 3; default 3)."""
        return 3 if self.channels is None else self.channels

    @property
    def window_stride(self) -> int:
        """Rows between window starts (default: the window, windows do not overlap)."""
        if self.window is None:
            return 1
        return self.window if self.stride is None else self.stride

    def with_classes(self, classes: tuple[str, ...] | list[str]) -> LocalDataSpec:
        """The same spec with the run's label space (validated like ``classes``)."""
        return dataclasses.replace(self, classes=tuple(classes))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "data") -> LocalDataSpec:
        """Build a spec from parsed YAML/JSON; problems raise ``ConfigError`` naming the
        setting, e.g. ``data: window: must be at least 1 row, got 0``; ``source`` prefixes it."""
        return from_mapping(data, cls, source=source)

"""The ``data`` section of a run file: the fleet manager's test set and the simulated devices'
data, a bundled dataset (digits, mnist) or a user's dataset in a device-local format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.config import SettingError
from device.data import FORMATS, LocalDataSpec, dataset_names, partitioner_names

__all__ = ["DataConfig"]


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: the dataset the fleet manager evaluates on (its test split) and,
    in a simulation, the one partitioned over the simulated devices.

    ``data_dir`` is relative to the YAML file (mnist needs one; digits is bundled).
    ``evaluate``: evaluate the global model on the test split after rounds (``run.eval_every``).

    A user's dataset in a device-local format (``dataset: imagefolder|csv|npz|python``,
    ``data_dir`` its path) also takes ``classes`` (required: the run's class names, in order),
    ``options`` (the format's own ``LocalDataSpec`` settings, e.g. ``{resize: [28, 28],
    channels: 1}`` or ``{label_column: activity, window: 32}``), and ``eval_fraction`` in
    (0, 1) with ``seed``: the share of examples held out as the fleet manager's test set when
    ``evaluate`` is true (``fleet.sim.userdata``).
    """

    dataset: str = "digits"
    data_dir: Path | None = None
    partition: str = "iid"
    partition_options: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = True
    classes: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    eval_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in dataset_names() and self.dataset not in FORMATS:
            raise ValueError(
                f"dataset: unknown dataset {self.dataset!r}; known: {', '.join(dataset_names())}"
                f"; device-local formats: {', '.join(FORMATS)}"
            )
        if self.partition not in partitioner_names():
            raise ValueError(
                f"partition: unknown partitioner {self.partition!r}; "
                f"known: {', '.join(partitioner_names())}"
            )
        if self.dataset not in FORMATS:
            for name in ("classes", "options"):
                if getattr(self, name):
                    raise SettingError(name, f"only for the local formats ({', '.join(FORMATS)})")
            return
        if self.classes is None:
            raise SettingError(
                "classes", f"required for dataset {self.dataset}: the run's class names, in order"
            )
        if self.evaluate and self.eval_fraction <= 0:
            raise SettingError(
                "eval_fraction",
                "must be above 0 while evaluate is true (that share is the test set)",
            )
        try:
            LocalDataSpec(format=self.dataset, path=self.data_dir, **self.loader_options())  # type: ignore[arg-type]
        except SettingError as exc:
            own = {"path": "data_dir", "classes": "classes", "eval_fraction": "eval_fraction"}
            if exc.setting in own or exc.setting == "seed":
                raise SettingError(own.get(exc.setting, exc.setting), exc.reason) from None
            raise SettingError("options", f"{exc.setting}: {exc.reason}") from None
        except TypeError as exc:  # an option no format has
            raise SettingError(
                "options", str(exc).removeprefix("LocalDataSpec.__init__() ")
            ) from None

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments ``load_dataset`` takes for this dataset (a local format's
        ``LocalDataSpec`` settings; none for a bundled dataset)."""
        if self.dataset not in FORMATS:
            return {}
        return {
            **self.options,
            "classes": list(self.classes or ()),
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
        }

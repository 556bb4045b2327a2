"""The data a device agent trains and evaluates on, re-read before each job.

A :class:`DeviceData` is what the device config's ``data:`` section opens to
(:func:`open_device_data`): a bundled dataset (``dataset: digits|mnist``, :class:`BundledData`)
or the device's own data in a local format (``format: imagefolder|csv|npz|python``,
:class:`LocalData`, over :mod:`device.data.local`). Before each job the agent calls
:func:`data_for_job`, which calls :meth:`DeviceData.refresh` (a cheap re-scan: images or rows
recorded since the last job are used) and hands the job its side of the split: the training side
for a round, the evaluation side for an ``EvaluateCommand``. Bad data (a missing or empty
directory, a corrupt image, a CSV problem, a label outside the run's classes, npz arrays of
different lengths) raises one :class:`~device.errors.DataError` naming the file or setting; the
agent turns it into a failed job, never a crash.

The label space is the run's: every model snapshot carries the run's ``classes``
(:meth:`DeviceData.use_classes`, called by :func:`data_for_job`). A device config may leave
``classes`` out and take them from the run; one that sets them must list the run's, in the run's
order (a device whose labels mean something else must not train). A bundled dataset's classes
are its ten digits, so a run over it may declare ten classes or none.

:class:`DataCounts` is what the device reports in its status: ``train`` examples (the round
updates' ``num_examples``, which weight aggregation) and ``evaluation`` examples (the most an
evaluation reply may claim; the fleet manager rejects a reply that claims more).

Agents built with a plain callable ``partition -> Dataset`` (tests, older callers) keep working:
:func:`data_for_job` calls it with the command's partition, for every kind of job.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from device.data import Dataset, LocalSource, load_dataset, open_source
from device.data.local_spec import LocalDataSpec
from device.data.local_split import SplitMemo
from device.errors import DataError
from device.settings import DataConfig
from device.wire.messages import EvaluateCommand, InitialPruneCommand, RoundCommand

__all__ = [
    "BundledData",
    "DataCounts",
    "DeviceData",
    "LocalData",
    "check_class_count",
    "data_for_job",
    "open_device_data",
]

log = logging.getLogger(__name__)

DataSource = Callable[[str], Dataset]
"""A plain data source: the command's partition ("" on a real device) -> the dataset."""


@dataclass(frozen=True)
class DataCounts:
    """Examples on each side of a device's split (both >= 0): ``train`` is what a round trains
    on; ``evaluation`` is what an evaluation is computed on."""

    train: int
    evaluation: int


class DeviceData(abc.ABC):
    """A device's data: :meth:`refresh` before each job, then :meth:`train` or
    :meth:`evaluation` (as of that refresh). One job at a time (not thread-safe)."""

    @abc.abstractmethod
    def use_classes(self, classes: tuple[str, ...]) -> None:
        """Take the run's label space (non-empty: class ``i`` is logit ``i``) before a job.

        Raises:
            DataError: the data's own classes disagree with the run's (naming both).
        """

    @abc.abstractmethod
    def refresh(self) -> DataCounts:
        """Re-read the data (cheaply); the counts the device reports. ``DataError`` if bad."""

    @abc.abstractmethod
    def train(self) -> Dataset:
        """The training side, decoded. ``DataError`` if it cannot be read or is empty."""

    @abc.abstractmethod
    def evaluation(self) -> Dataset:
        """The evaluation side, decoded. ``DataError`` if it cannot be read or is empty."""


class BundledData(DeviceData):
    """A dataset loaded once (the bundled digits or MNIST), split by example index.

    With ``eval_fraction`` 0 every example trains and an evaluation uses the training examples
    (what a device did before local formats). Otherwise example ``i`` is held out when
    ``split_point(str(i), seed) < eval_fraction`` (``device.data.local_split``): the same
    examples on every start.
    """

    def __init__(self, dataset: Dataset, *, eval_fraction: float = 0.0, seed: int = 0) -> None:
        self._all = dataset
        if eval_fraction > 0:
            memo = SplitMemo(seed=seed, eval_fraction=eval_fraction)
            is_eval, _, _ = memo.sides(str(i) for i in range(len(dataset)))
            self._train = dataset.subset(np.flatnonzero(~is_eval))
            self._evaluation = dataset.subset(np.flatnonzero(is_eval))
        else:
            self._train = self._evaluation = dataset

    def use_classes(self, classes: tuple[str, ...]) -> None:
        check_class_count(classes, self._all.num_classes)

    def refresh(self) -> DataCounts:
        return DataCounts(train=len(self._train), evaluation=len(self._evaluation))

    def train(self) -> Dataset:
        if not len(self._train):
            raise DataError("the training split holds no examples")
        return self._train

    def evaluation(self) -> Dataset:
        if not len(self._evaluation):
            raise DataError("the evaluation split holds no examples (data.eval_fraction)")
        return self._evaluation


class LocalData(DeviceData):
    """The device's own data in a local format (``device.data.local``): re-scanned at every
    :meth:`refresh`; each side is decoded once per change (a scan that added or removed no
    example keeps the decoded tensors of the previous one; an example edited in place keeps its
    identity and is read again only once examples are added or removed).

    ``spec.classes`` may be None (the device config leaves them to the run): the source opens
    at the first :meth:`use_classes`, and reading before that raises ``DataError``.
    """

    def __init__(self, spec: LocalDataSpec) -> None:
        self.configured = spec.classes  # the device config's own classes; None: the run's
        self.spec = spec
        self._source = open_source(spec) if spec.classes is not None else None
        self._decoded: dict[str, Dataset] = {}

    @property
    def source(self) -> LocalSource:
        """The open source. ``DataError`` while the label space is unknown (no ``classes`` in
        the device config and no run has given its own yet)."""
        if self._source is None:
            raise DataError(
                "data.classes is not set and no run has declared its classes yet: set "
                "`classes:` in the run file's run section (or in the device config's data "
                "section)"
            )
        return self._source

    def use_classes(self, classes: tuple[str, ...]) -> None:
        if self.configured is not None:
            if tuple(self.configured) != tuple(classes):
                raise DataError(
                    f"data.classes in the device config ({_listed(self.configured)}) differ "
                    f"from the run's classes ({_listed(classes)}); they must be the same "
                    "names in the same order, or left out of the device config"
                )
            return
        if self.spec.classes != tuple(classes):
            try:
                spec = self.spec.with_classes(classes)
            except ValueError as exc:  # SettingError: the run's list is not a label space
                raise DataError(f"the run's classes: {exc}") from None
            self.spec, self._source = spec, open_source(spec)
            self._decoded.clear()

    def refresh(self) -> DataCounts:
        result = self.source.scan()
        if result.added or result.removed:
            self._decoded.clear()
        if result.added or result.removed or not self._decoded:
            log.info(
                "data %s: %d examples (%d train, %d evaluation; %d new, %d gone)",
                self.source.where,
                result.examples,
                result.train,
                result.evaluation,
                result.added,
                result.removed,
            )
        return DataCounts(train=result.train, evaluation=result.evaluation)

    def train(self) -> Dataset:
        if "train" not in self._decoded:
            self._decoded["train"] = self.source.train().to_dataset(spool=self.spec.spool)
        return self._decoded["train"]

    def evaluation(self) -> Dataset:
        if "evaluation" not in self._decoded:
            side = self.source.evaluation()
            if not len(side):
                raise DataError(
                    f"{self.source.where}: the evaluation split holds no examples "
                    f"(data.eval_fraction is {self.spec.eval_fraction}; set it above 0 to "
                    "take part in federated evaluation)"
                )
            self._decoded["evaluation"] = side.to_dataset(spool=self.spec.spool)
        return self._decoded["evaluation"]


def open_device_data(config: DataConfig | LocalDataSpec) -> DeviceData:
    """The device data a config's ``data:`` section describes. A bundled dataset is loaded
    here (``DataError`` when its files are missing); a local source reads nothing yet (its
    first :meth:`~DeviceData.refresh` does)."""
    if isinstance(config, LocalDataSpec):
        return LocalData(config)
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, split="train")
    return BundledData(dataset, eval_fraction=config.eval_fraction, seed=config.seed)


def data_for_job(
    source: DeviceData | DataSource,
    command: RoundCommand | InitialPruneCommand | EvaluateCommand,
    classes: Sequence[str] = (),
) -> tuple[Dataset, DataCounts | None]:
    """The dataset a job reads, and the counts to report (None from a plain callable).

    ``classes`` is the run's label space (its model snapshot's; empty: not declared), given
    to ``DeviceData.use_classes`` first. ``DeviceData`` is refreshed next; an
    ``EvaluateCommand`` gets its evaluation side, every other job its training side. A plain
    callable gets the command's partition.

    Raises:
        DataError: the data cannot be read (naming the file or setting), or the side is empty.
    """
    evaluating = isinstance(command, EvaluateCommand)
    if isinstance(source, DeviceData):
        if classes:
            source.use_classes(tuple(classes))
        counts = source.refresh()
        return (source.evaluation() if evaluating else source.train()), counts
    partition = "" if isinstance(command, EvaluateCommand) else command.partition
    return source(partition), None


def check_class_count(classes: Sequence[str], num_classes: int) -> None:
    """A dataset whose labels are indices ``0..num_classes-1`` (a bundled one) can take the
    run's ``classes`` only if there are as many; ``DataError`` otherwise."""
    if len(classes) != num_classes:
        raise DataError(
            f"the run declares {len(classes)} classes ({_listed(classes)}) but the data has "
            f"{num_classes}"
        )


def _listed(classes: Sequence[str], most: int = 8) -> str:
    """Class names for a message: the first ``most``, then how many more."""
    shown = ", ".join(classes[:most])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > most else "")

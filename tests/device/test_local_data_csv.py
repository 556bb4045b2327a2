"""``format: csv``: rows, time-series windows, appended rows, and every bad-input error.

CSV text is written into ``tmp_path`` at test time. File mtimes are set into the past where a
test needs a file to count as settled (a last line without a newline is then read).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from device.data import LocalDataSpec, LocalSource, open_source
from device.data.csvsource import window_labels
from device.errors import DataError

CLASSES = ("walk", "run", "sit")


def sensor_log(rows: int, *, start: int = 0) -> str:
    """Rows ``t, ax, ay, activity`` with ax = t, ay = -t; walk below t=10, run from 10, sit
    from 20 (no header)."""
    out = []
    for t in range(start, start + rows):
        label = "walk" if t < 10 else "run" if t < 20 else "sit"
        out.append(f"{t},{t},{-t},{label}\n")
    return "".join(out)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def source(path: Path, **options: object) -> LocalSource:
    settings: dict[str, object] = {
        "format": "csv",
        "path": path,
        "classes": CLASSES,
        "label_column": "activity",
        "eval_fraction": 0.0,
    }
    return open_source(LocalDataSpec(**{**settings, **options}))  # type: ignore[arg-type]


def settle(path: Path) -> None:
    past = time.time() - 60
    os.utime(path, (past, past))


def test_rows_are_examples_with_every_other_column_as_features(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "t,ax,ay,activity\n" + sensor_log(12))
    data = source(log, timestamp_column="t").train().to_dataset()
    assert data.x.shape == (12, 2) and data.x.dtype == torch.float32
    assert data.x[11].tolist() == [11.0, -11.0]
    assert data.y.tolist() == [0] * 10 + [1] * 2
    chosen = source(log, feature_columns=("ay", "t")).train().to_dataset()
    assert chosen.x[3].tolist() == [-3.0, 3.0]  # the listed columns, in the listed order


def test_windows_are_channels_by_time_with_the_last_rows_label(tmp_path: Path) -> None:
    """A window of W rows of F features is [F, W]; its label is the activity at its end."""
    log = write(tmp_path / "log.csv", "t,ax,ay,activity\n" + sensor_log(14))
    examples = source(log, timestamp_column="t", window=4, stride=3).train()
    data = examples.to_dataset()
    assert data.x.shape == (4, 2, 4)  # starts 0, 3, 6, 9; 12 would need rows 12..15
    assert data.x[1].tolist() == [[3, 4, 5, 6], [-3, -4, -5, -6]]
    assert data.y.tolist() == [0, 0, 0, 1]  # only window 9..12 ends in "run" (t >= 10)
    assert examples.identities() == ["log.csv:2", "log.csv:5", "log.csv:8", "log.csv:11"]


def test_majority_window_label_and_its_tie_rule() -> None:
    labels = np.array([0, 1, 1, 2, 2, 0], dtype=np.int64)
    starts = np.array([0, 2], dtype=np.int64)
    assert window_labels(labels, starts, 3, "majority", 3).tolist() == [1, 2]
    assert window_labels(labels, starts, 4, "majority", 3).tolist() == [1, 2]  # ties: lowest
    assert window_labels(labels, starts, 3, "last", 3).tolist() == [1, 2]
    assert window_labels(labels, np.array([3]), 3, "last", 3).tolist() == [0]


def test_rows_are_ordered_by_timestamp_numeric_or_iso(tmp_path: Path) -> None:
    numeric = write(tmp_path / "a.csv", "t,ax,activity\n3,30,run\n1,10,walk\n2,20,walk\n")
    data = source(numeric, timestamp_column="t", window=3).train().to_dataset()
    assert data.x.tolist() == [[[10, 20, 30]]] and data.y.tolist() == [1]
    iso = write(
        tmp_path / "b.csv",
        "when,ax,activity\n"
        "2024-05-01T10:00:02Z,3,run\n2024-05-01T10:00:00,1,walk\n2024-05-01T10:00:01+00:00,2,sit\n",
    )
    data = source(iso, timestamp_column="when", window=3).train().to_dataset()
    assert data.x.tolist() == [[[1, 2, 3]]]


def test_windows_never_span_two_files_of_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "logs" / "day1.csv", "t,ax,ay,activity\n" + sensor_log(5))
    write(tmp_path / "logs" / "day2.csv", "t,ax,ay,activity\n" + sensor_log(5, start=20))
    examples = source(tmp_path / "logs", window=4, stride=1).train()
    assert examples.identities() == ["day1.csv:2", "day1.csv:3", "day2.csv:2", "day2.csv:3"]
    assert examples.to_dataset().x[2, 0].tolist() == [20, 21, 22, 23]


def test_appended_rows_are_parsed_alone_and_keep_the_split(tmp_path: Path) -> None:
    """A sensor logger appends rows; the re-scan before a job must parse only those, and the
    windows seen before must keep their identity (and so their side of the split)."""
    log = write(tmp_path / "log.csv", "t,ax,ay,activity\n" + sensor_log(40))
    src = source(log, window=4, eval_fraction=0.3, seed=1)
    first = src.scan()
    assert (first.examples, first.rows_read, first.listed) == (10, 40, 1)
    evaluation = set(src.evaluation().identities())
    unchanged = src.scan()
    assert (unchanged.rows_read, unchanged.listed, unchanged.reused) == (0, 0, 1)
    with log.open("a") as f:
        f.write(sensor_log(8, start=40))
    grown = src.scan()
    assert (grown.examples, grown.added, grown.rows_read) == (12, 2, 8)
    assert evaluation <= set(src.evaluation().identities())


def test_a_line_being_written_waits_until_the_file_settles(tmp_path: Path) -> None:
    """A logger may be mid-line: a last line without newline is not a row yet, unless the
    file has stopped changing (then it is simply a file without a final newline)."""
    log = write(tmp_path / "log.csv", "t,ax,activity\n0,1,walk\n1,2,wa")
    src = source(log)
    assert src.scan().examples == 1
    with log.open("a") as f:
        f.write("lk\n2,3,run")
    assert src.scan().examples == 2
    settle(log)
    result = src.scan()
    assert result.examples == 3 and src.train().to_dataset().y.tolist() == [0, 0, 1]


def test_a_rewritten_file_is_parsed_again_from_the_start(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "t,ax,activity\n0,1,walk\n1,2,walk\n")
    src = source(log)
    src.scan()
    log.write_text("t,ax,activity\n0,5,run\n1,6,run\n2,7,run\n")  # longer, other content
    result = src.scan()
    assert (result.examples, result.rows_read) == (3, 3)
    assert src.train().to_dataset().x[:, 1].tolist() == [5, 6, 7]  # features: t, ax


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("t,ax,label\n0,1,walk\n", {}, r"log.csv: no column 'activity' \(data.label_column\); "),
        (
            "t,ax,activity\n0,1,walk\n1,fast,walk\n",
            {},
            r"log.csv:3: column 'ax': 'fast' is not a number",
        ),
        ("t,ax,activity\n0,nan,walk\n", {}, r"log.csv:2: column 'ax': nan is not a finite"),
        (
            "t,ax,activity\n0,1,walk\n1,2,swim\n",
            {},
            r"log.csv:3: label 'swim' is not one of the run's classes \(walk, run, sit\)",
        ),
        ("t,ax,activity\n0,1\n", {}, r"log.csv:2: 2 fields, the header has 3"),
        (
            "t,ax,activity\n0,1,walk\nnoon,2,walk\n",
            {"timestamp_column": "t"},
            r"log.csv:3: column 't': 'noon' is neither a number nor an ISO 8601 time",
        ),
        (
            "t,ax,activity\n0,1,walk\n",
            {"feature_columns": ("ax", "az")},
            r"no column 'az' \(data.feature_columns\)",
        ),
        ("t,ax,activity\n", {}, r"no data rows \(0 rows in 1 file\(s\)"),
        ("t,ax,activity\n0,1,walk\n1,1,walk\n", {"window": 3}, "no complete window of 3 rows"),
    ],
)
def test_bad_csv_is_one_data_error_naming_file_and_row(
    tmp_path: Path, text: str, options: dict[str, object], message: str
) -> None:
    log = write(tmp_path / "log.csv", text)
    with pytest.raises(DataError, match=message):
        source(log, **options).scan()


def test_spreadsheet_exports_with_bom_crlf_and_quotes_are_read(tmp_path: Path) -> None:
    """What Excel writes: a UTF-8 byte order mark, CRLF line ends, quoted cells."""
    log = tmp_path / "export.csv"
    log.write_bytes('\ufefft,"ax",activity\r\n0,"1.5",walk\r\n1,2,"run"\r\n'.encode())
    data = source(log, timestamp_column="t").train().to_dataset()
    assert data.x.tolist() == [[1.5], [2.0]] and data.y.tolist() == [0, 1]


def test_text_that_is_not_utf8_or_overflows_float32_is_named(tmp_path: Path) -> None:
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"t,ax,activity\n0,1,walk\n1,2,caf\xe9\n")
    with pytest.raises(DataError, match=rf"{latin}:3: not UTF-8 text"):
        source(latin).scan()
    huge = write(tmp_path / "huge.csv", "t,ax,activity\n0,1e39,walk\n")
    with pytest.raises(DataError, match=r"huge.csv:2: column 'ax': inf is not a finite float32"):
        source(huge).scan()


def test_missing_path_and_empty_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data.path {tmp_path / 'nope.csv'} does not exist"):
        source(tmp_path / "nope.csv").scan()
    (tmp_path / "logs").mkdir()
    with pytest.raises(DataError, match=r"no \*\.csv files"):
        source(tmp_path / "logs").scan()


def test_a_file_fixed_after_an_error_is_read_again(tmp_path: Path) -> None:
    """The error must not stick: once the user fixes the row, the next scan succeeds."""
    log = write(tmp_path / "log.csv", "t,ax,activity\n0,x,walk\n")
    src = source(log)
    with pytest.raises(DataError, match="'x' is not a number"):
        src.scan()
    log.write_text("t,ax,activity\n0,1,walk\n")
    assert src.scan().examples == 1

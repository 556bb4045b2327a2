"""The JSON form of how a run was launched, so that ``fleet run resume`` launches it the same way.

``fleet run start``, ``fleet simulate`` and ``fleet demo`` write a launch record
(``RunFiles.write_launch``): ``kind`` "broker" with the broker settings and the evaluation data,
or ``kind`` "simulate" with the simulation. Paths are stored absolute (resolved when written), so
a resume from another working directory finds the same files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet.cli.context import path_or_none
from fleet.cli.runfile import BrokerConfig, DataConfig, TlsConfig
from fleet.sim import Faults, SimSpec


def sim_to_json(sim: SimSpec) -> dict[str, Any]:
    data = dataclasses.asdict(sim)
    data["data_dir"] = None if sim.data_dir is None else str(Path(sim.data_dir).resolve())
    return data


def sim_from_json(data: Mapping[str, Any]) -> SimSpec:
    values = dict(data)
    values["data_dir"] = None if values.get("data_dir") is None else Path(values["data_dir"])
    values["faults"] = Faults(**values.get("faults", {}))
    return SimSpec(**values)


def broker_to_json(broker: BrokerConfig, url: str) -> dict[str, Any]:
    tls = broker.tls
    return {
        "url": url,
        "username": broker.username,
        "password_file": None if broker.password_file is None else str(broker.password_file),
        "tls": None if tls is None else {k: _str_or_none(v) for k, v in vars(tls).items()},
        "prefix": broker.prefix,
    }


def _str_or_none(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def broker_from_json(data: Mapping[str, Any]) -> BrokerConfig:
    tls = data.get("tls")
    return BrokerConfig(
        url=data.get("url"),
        username=data.get("username"),
        password_file=None if data.get("password_file") is None else Path(data["password_file"]),
        tls=None
        if tls is None
        else TlsConfig(
            ca_file=path_or_none(tls.get("ca_file")),
            cert_file=path_or_none(tls.get("cert_file")),
            key_file=path_or_none(tls.get("key_file")),
            insecure=bool(tls.get("insecure", False)),
        ),
        prefix=data.get("prefix", "fl/v1"),
    )


def data_to_json(data: DataConfig | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {
        "dataset": data.dataset,
        "data_dir": None if data.data_dir is None else str(data.data_dir.resolve()),
        "evaluate": data.evaluate,
        "options": data.loader_options(),  # a local format's settings (empty for bundled data)
    }

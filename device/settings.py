"""The device agent's configuration file (YAML), as a typed schema.

Example (``examples/device.yaml``)::

    device_id: pi-kitchen-01
    broker:
      url: mqtts://broker.example.org:8883
      password_file: /etc/sparsefleet/password     # or tls client certificate below
      tls:
        ca_file: /etc/sparsefleet/ca.crt
        cert_file: /etc/sparsefleet/device.crt
        key_file: /etc/sparsefleet/device.key
    data:
      dataset: mnist
      data_dir: /var/lib/sparsefleet/data
    tags: [site=kitchen]

or, for the device's own data in one of the local formats (``device.data.local_spec``: options
of each format, e.g. ``resize`` for images, ``label_column``/``window`` for CSV)::

    data:
      format: imagefolder              # imagefolder | csv | npz | python
      path: /var/lib/sparsefleet/images
      classes: [cat, dog]              # optional: the run's classes, in the run's order
                                       # (left out: taken from the run, whose model carries them)
      resize: [28, 28]
      channels: 1
      eval_fraction: 0.2               # held out for federated evaluation
      seed: 0

Relative paths are relative to the file. Secrets are read from files (mode 0600), never from the
YAML itself, so the YAML can be world-readable and logged.

Everything that can be checked without touching the network is checked when the file loads, and
reported as a ``ConfigError`` at the setting's line: the device id (``device.identity``: the
same rule the fleet manager enrols with, so a device can never connect as the fleet manager),
the broker URL, the topic prefix, tags and ranges.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from device.config import SettingError, load
from device.data.local_spec import LocalDataSpec
from device.errors import ConfigError
from device.identity import device_id_problem
from device.model_feed import DEFAULT_LINGER_S
from device.model_ref import ModelRef
from device.wire.endpoint import parse_broker_url
from device.wire.topics import validate_prefix

MAX_KEEPALIVE_S = 65535  # MQTT's Keep Alive is a two-byte number of seconds
MAX_SESSION_EXPIRY_S = 2**32 - 1  # a four-byte number of seconds ("never expires")

OneDnn = Literal["auto", "enabled", "disabled"]
"""``torch_onednn``: oneDNN for convolutions; ``auto`` is off below 768 MB (device.torch_setup)."""


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path
    cert_file: Path | None = None  # client certificate (CN = device id)
    key_file: Path | None = None
    insecure: bool = False  # skip host name verification (tests only)


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None  # default: the device id
    password_file: Path | None = None
    tls: TlsConfig | None = None
    session_expiry_s: int = 3600  # how long the broker keeps commands for an offline device
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0  # how long run and check wait for the broker at start

    def __post_init__(self) -> None:
        try:
            parse_broker_url(self.url)
        except ValueError as exc:
            raise SettingError("url", str(exc)) from None
        if self.username is not None and not self.username.strip():
            raise SettingError("username", "must not be empty (leave it out for the device id)")
        if not 0 <= self.session_expiry_s <= MAX_SESSION_EXPIRY_S:
            raise SettingError("session_expiry_s", f"must be in 0..{MAX_SESSION_EXPIRY_S} seconds")
        if not 1 <= self.keepalive_s <= MAX_KEEPALIVE_S:
            # 0 would switch keep-alive off: the broker would never notice a dead device.
            raise SettingError("keepalive_s", f"must be in 1..{MAX_KEEPALIVE_S} seconds")
        if not self.connect_timeout_s > 0:
            raise SettingError("connect_timeout_s", "must be more than 0 seconds")


@dataclass(frozen=True)
class DataConfig:
    """A bundled dataset (``dataset: digits|mnist``), the data section before local formats.

    ``eval_fraction`` in [0, 1): share of the examples held out for federated evaluation, by
    example index and ``seed`` (``device.local_data``); 0 (the default) trains on every example
    and evaluates on the training examples, as before local formats existed.
    """

    dataset: Literal["mnist", "digits"] = "mnist"
    data_dir: Path | None = None  # IDX files for mnist (see docs/data.md)
    split: Literal["train"] = "train"
    eval_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise SettingError(
                "eval_fraction",
                f"must be in [0, 1) (a share of examples), got {self.eval_fraction}",
            )
        if not 0 <= self.seed < 2**64:
            raise SettingError("seed", f"must be an integer in [0, 2**64), got {self.seed}")


@dataclass(frozen=True)
class DeployConfig:
    """Model deployments (docs/deployment.md); without this section the agent ignores them.

    ``trusted_keys``: PEM public keys of the fleet manager's deployment key (``fleet model
    keygen`` writes ``deploy-signing.pub``); an artefact no trusted key signed is refused.
    ``models_dir``: the deployed versions (the active one and ``keep_versions - 1`` before it).
    ``remote_inference``: answer requests on ``{prefix}/dev/{id}/infer/req`` (off by default).
    ``download_timeout_s``: one attempt to receive an artefact; ``retries``: attempts after it.
    ``pin``: a version label the device serves and keeps serving: the agent activates it from
    ``models_dir`` at start and refuses deployments of any other version (a ``failed`` event
    saying so); None follows the fleet's deployments.
    """

    trusted_keys: tuple[Path, ...]
    models_dir: Path = Path("/var/lib/sparsefleet/models")
    remote_inference: bool = False
    keep_versions: int = 3
    download_timeout_s: float = 300.0
    retries: int = 3
    pin: str | None = None

    def __post_init__(self) -> None:
        if not self.trusted_keys:
            raise SettingError("trusted_keys", "name at least one deployment public key file")
        if self.keep_versions < 2:
            raise SettingError("keep_versions", "must be at least 2 (active and previous)")
        if not self.download_timeout_s > 0:
            raise SettingError("download_timeout_s", "must be more than 0 seconds")
        if self.retries < 0:
            raise SettingError("retries", "must be 0 or more")
        if self.pin is not None:
            from device.wire.artefact import version_label

            try:
                version_label(self.pin)
            except ValueError as exc:
                raise SettingError("pin", str(exc)) from None


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    # A bundled dataset, or the device's own data (told apart by their keys: ``format``).
    data: DataConfig | LocalDataSpec = field(default_factory=DataConfig)
    tags: tuple[str, ...] = ()
    topics_prefix: str = "fl/v1"
    torch_threads: int = 0  # 0 = torch's default (all cores)
    torch_onednn: OneDnn = "auto"  # convolutions with oneDNN (device.torch_setup)
    profile_on_start: bool = False  # measure the device profile before announcing
    # The model the profile measures: the one this fleet's runs train. With a profile of the
    # run's model, the agent computes each layer with a sparse kernel where that is faster.
    # A registered name, or a factory ("pkg.mod:build" or a mapping with kwargs and
    # input_shape) as the run names it, so a user's model gets a profile of its own layers.
    profile_model: str | ModelRef = "mnist_cnn"
    model_wait_s: float = 60.0
    # Seconds a run's models keep arriving after the device's last job of it (device.model_feed).
    model_linger_s: float = DEFAULT_LINGER_S
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The models this device offers (device.model_ref: a registered name, a "pkg.mod:build"
    # factory, or a mapping with kwargs); None: the built-ins. Built when the agent starts.
    models: tuple[str | ModelRef, ...] | None = None
    deploy: DeployConfig | None = None  # model deployments; None: not followed

    def __post_init__(self) -> None:
        from device.models import model_names  # lazy: torch is only needed once validated

        problem = device_id_problem(self.device_id)
        if problem is not None:
            raise SettingError("device_id", f"{self.device_id!r} {problem}")
        try:
            validate_prefix(self.topics_prefix)
        except ValueError as exc:
            raise SettingError("topics_prefix", str(exc)) from None
        for tag in self.tags:
            if not tag.partition("=")[0].strip():
                raise SettingError("tags", f"tag {tag!r} has no key; use 'key' or 'key=value'")
        if self.torch_threads < 0:
            raise SettingError("torch_threads", "must be 0 (torch's default) or more")
        if not self.model_wait_s > 0:
            raise SettingError("model_wait_s", "must be more than 0 seconds")
        if not self.model_linger_s >= 0:
            raise SettingError("model_linger_s", "must be 0 seconds or more")
        try:
            profile_ref = ModelRef.of(self.profile_model)
        except ValueError as exc:
            raise SettingError("profile_model", str(exc)) from None
        if profile_ref.name and profile_ref.name not in model_names():
            raise SettingError(
                "profile_model",
                f"unknown model {profile_ref.name!r}; known: {', '.join(model_names())}",
            )
        if profile_ref.factory and profile_ref.input_shape is None:
            raise SettingError(
                "profile_model",
                f"factory {profile_ref.factory!r} needs input_shape (one example's shape) to "
                "be profiled",
            )
        for item in self.models or ():
            try:
                ref = ModelRef.of(item)
            except ValueError as exc:
                raise SettingError("models", str(exc)) from None
            if ref.name and ref.name not in model_names():
                raise SettingError(
                    "models", f"unknown model {ref.name!r}; known: {', '.join(model_names())}"
                )

    def model_refs(self) -> tuple[ModelRef, ...]:
        """The models this device offers: ``models``, or the built-ins when not set."""
        if self.models is None:
            from device.model_registry import BUILTIN

            return tuple(ModelRef(name=name) for name in sorted(BUILTIN))
        return tuple(ModelRef.of(item) for item in self.models)


def load_device_config(path: str | Path) -> DeviceConfig:
    """Load and validate a device config; ``ConfigError`` names the file, line and field."""
    return load(path, DeviceConfig)


def read_secret(path: Path, what: str) -> str:
    """The first line of a secrets file; refuses files that others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and os.name == "posix":
        raise ConfigError(f"{what} {path} is readable by others (mode {mode & 0o777:o}); chmod 600")
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{what} {path} is empty")
    return secret

"""How an aggregator worker logs in to the broker: account, password file and TLS files, as
options of ``python -m fleet.runtime.aggregator run`` and as transport settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device.errors import ConfigError
from device.wire.mqtt import TlsSettings, parse_broker_url


@dataclass(frozen=True)
class BrokerLogin:
    """How a worker logs in to the broker: an account (the password read from a file, never
    put on a command line) and TLS files. All None: anonymous, plain MQTT (a local mosquitto).
    """

    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    def argv(self) -> list[str]:
        """These settings as ``fleet.runtime.aggregator run`` options."""
        out: list[str] = []
        for flag, value in (
            ("--username", self.username),
            ("--password-file", self.password_file),
            ("--ca-file", self.ca_file),
            ("--cert-file", self.cert_file),
            ("--key-file", self.key_file),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out + (["--insecure"] if self.insecure else [])

    def password(self) -> str | None:
        """The first line of ``password_file`` (None without one); ``ConfigError`` if unreadable
        or empty."""
        if self.password_file is None:
            return None
        try:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"password file {self.password_file}: {exc.strerror}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"password file {self.password_file} is empty")
        return lines[0].strip()

    def tls(self, url: str) -> TlsSettings | None:
        """TLS settings for ``url``: the files given, or the system's CAs for ``mqtts://``."""
        if any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            return TlsSettings(
                ca_file=None if self.ca_file is None else str(self.ca_file),
                cert_file=None if self.cert_file is None else str(self.cert_file),
                key_file=None if self.key_file is None else str(self.key_file),
                insecure=self.insecure,
            )
        return TlsSettings(insecure=self.insecure) if parse_broker_url(url).tls else None

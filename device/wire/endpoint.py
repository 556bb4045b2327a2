"""Where the MQTT broker is and how to reach it: broker URLs and TLS settings.

Kept apart from the MQTT client (``device.wire.mqtt``) and free of paho, so that a device config
can check its broker URL when it loads, before anything connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEMES = ("mqtt", "mqtts", "tcp", "ssl")
"""Accepted URL schemes; ``mqtts`` and ``ssl`` mean TLS."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the broker connection: ``ca_file`` verifies the broker, ``cert_file`` and
    ``key_file`` are the client certificate (its CN is the device id). ``insecure`` skips the
    host-name check (test certificates only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (default 1883) or ``mqtts://host[:port]`` (default 8883).

    A bare ``host[:port]`` means ``mqtt://``. Raises ``ValueError`` naming the URL otherwise.
    """
    text = url if "://" in url else f"mqtt://{url}"
    try:
        parts = urlsplit(text)
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:  # a bad port or a malformed IPv6 address
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    if port == 0:
        raise ValueError(f"broker URL {url!r}: port must be in 1..65535")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(hostname, port or (8883 if tls else 1883), tls)
